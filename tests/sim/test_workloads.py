from __future__ import annotations

import itertools
from collections import Counter

import pytest

from guest_agent.sim.errors import WorkloadError
from guest_agent.sim.workloads import WORKLOADS, PageSpace, derive_seed, make_workload

pytestmark = pytest.mark.timeout(30)

SPACE = PageSpace(anon_pages=1000, file_pages=3000)


def run(name: str, seed: int, steps: int = 20, k: int = 64) -> list[list[tuple[int, bool]]]:
    wl = make_workload(name, SPACE, seed=seed, accesses_per_step=k)
    return [wl.step(s) for s in range(steps)]


@pytest.mark.parametrize("name", WORKLOADS)
def test_same_seed_same_stream_other_seed_other_stream(name: str) -> None:
    assert run(name, 3) == run(name, 3)
    assert run(name, 3) != run(name, 4)


@pytest.mark.parametrize("name", WORKLOADS)
def test_accesses_are_in_range_and_only_anon_pages_are_written(name: str) -> None:
    steps = run(name, 1, k=100)
    for accesses in steps:
        assert len(accesses) == 100
        for page, write in accesses:
            assert 0 <= page < SPACE.total
            if write:
                assert page < SPACE.anon_pages
    writes = sum(w for acc in steps for _, w in acc)
    assert writes > 0


def test_hotcold_concentrates_on_few_pages() -> None:
    counts = Counter(p for acc in run("hotcold", 5, steps=50, k=200) for p, _ in acc)
    top = sum(n for _, n in counts.most_common(SPACE.total // 10))
    assert top > 0.5 * sum(counts.values())


def test_scan_is_sequential_and_wraps() -> None:
    steps = run("scan", 2, steps=100, k=64)
    pages = [p for acc in steps for p, _ in acc]
    assert all((b - a) % SPACE.total == 1 for a, b in itertools.pairwise(pages))
    assert len(set(pages)) == SPACE.total  # 6400 accesses over 4000 pages: wrapped


def test_phases_move_the_hot_set() -> None:
    wl = make_workload("phases", SPACE, seed=9, accesses_per_step=200, phase_steps=10)
    first = Counter(p for s in range(10) for p, _ in wl.step(s))
    second = Counter(p for s in range(10, 20) for p, _ in wl.step(s))
    hot1 = {p for p, _ in first.most_common(20)}
    hot2 = {p for p, _ in second.most_common(20)}
    assert len(hot1 & hot2) < 5


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(WorkloadError):
        make_workload("nope", SPACE, seed=1, accesses_per_step=1)
    with pytest.raises(WorkloadError):
        make_workload("scan", SPACE, seed=1, accesses_per_step=0)
    with pytest.raises(WorkloadError):
        make_workload("scan", SPACE, seed=1, accesses_per_step=1, write_fraction=2)


def test_derive_seed_is_stable() -> None:
    # A fixed value: seeds must not depend on PYTHONHASHSEED or the process.
    assert derive_seed(1, "guest", 0) == derive_seed(1, "guest", 0)
    assert derive_seed(1, "guest", 0) != derive_seed(1, "guest", 1)
    assert derive_seed("a") == int.from_bytes(
        __import__("hashlib").blake2b(b"('a',)", digest_size=8).digest(), "big"
    )
