from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from guest_agent.sim.backends import MemoryBackend, MemoryBroker
from guest_agent.sim.errors import WorkloadError
from guest_agent.sim.images import ZERO_PAGE, Image
from guest_agent.sim.model import (
    KIND_FILECOPY,
    KIND_PATTERN,
    KIND_RANDOM,
    KIND_ZERO,
    GuestModel,
    GuestSpec,
    anon_kind,
    anon_page,
)
from guest_agent.sim.workloads import make_workload

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def image(image_tree: Path) -> Image:
    return Image.scan(image_tree)


def test_anon_contents_are_pure_and_mixed(image: Image) -> None:
    kinds = Counter(anon_kind(7, p) for p in range(2000))
    assert set(kinds) == {KIND_ZERO, KIND_PATTERN, KIND_FILECOPY, KIND_RANDOM}
    assert all(n > 200 for n in kinds.values())
    for p in range(50):
        assert anon_page(7, 0, p, 0, image) == anon_page(7, 0, p, 0, image)
        assert len(anon_page(7, 0, p, 3, image)) == 4096


def test_version_zero_is_shared_across_guests_and_writes_make_it_private(image: Image) -> None:
    for p in range(300):
        kind = anon_kind(7, p)
        v0 = [anon_page(7, g, p, 0, image) for g in range(3)]
        v1 = [anon_page(7, g, p, 1, image) for g in range(3)]
        if kind == KIND_RANDOM:
            assert len(set(v0)) == 3
        else:
            assert len(set(v0)) == 1
        if kind == KIND_ZERO:
            assert v0[0] == ZERO_PAGE
        if kind == KIND_FILECOPY:
            image_pages = {image.read_page(image.locate(n)) for n in range(image.total_pages)}
            assert v0[0] in image_pages
        assert len(set(v1)) == 3
        assert v1[0] != v0[0]


def make(
    image: Image,
    broker: MemoryBroker,
    *,
    guest: int = 1,
    ram: int = 128,
    anon: int = 400,
    files: int = 400,
    cap: int | None = None,
) -> GuestModel:
    broker.add_guest(guest, cap_pages=cap)
    spec = GuestSpec(ram_pages=ram, anon_pages=anon, file_pages=min(files, image.total_pages))
    return GuestModel(guest, spec, image, MemoryBackend(broker, guest), seed=5)


def drive(model: GuestModel, steps: int, *, name: str = "mix", k: int = 64) -> None:
    wl = make_workload(name, model.space, seed=model.guest_no, accesses_per_step=k)
    for s in range(steps):
        model.step(wl.step(s))
        assert len(model.resident) <= model.spec.ram_pages


def test_pages_round_trip_and_the_ledger_is_what_the_broker_holds(image: Image) -> None:
    broker = MemoryBroker()
    model = make(image, broker)
    drive(model, 80)
    c = model.counters
    assert c.corrupt_pages == 0 and c.swap_lost == 0
    assert c.swap_tmem_hits > 0 and c.cache_hits > 0 and c.swap_invalidates > 0
    assert c.faults == c.first_touch + c.swap_ins + c.cache_gets
    assert c.cache_gets == c.cache_hits + c.cache_misses
    held = broker.keys(1)
    swap_held = {oid for _, kind, oid, _ in held if kind == "swap"}
    cache_held = {(oid, index) for _, kind, oid, index in held if kind == "cache"}
    assert swap_held == set(model.broker_swap_pages())
    assert cache_held == {model.file_key(p) for p in model.broker_cache_pages()}
    ledger = swap_held | cache_held
    assert ledger  # something is swapped out at the end


def test_declined_stores_go_to_the_fallback_and_come_back_from_disk(image: Image) -> None:
    broker = MemoryBroker()
    model = make(image, broker, cap=20)
    drive(model, 80)
    c = model.counters
    assert c.declines.get("quota", 0) == c.swap_disk_writes > 0
    assert c.swap_stored + c.swap_disk_writes == c.swap_puts
    assert c.swap_disk_reads > 0
    assert c.corrupt_pages == 0 and c.swap_lost == 0
    assert len(model.broker_swap_pages()) <= 20


def test_broker_evictions_turn_cache_hits_into_misses(image: Image) -> None:
    roomy, tight = MemoryBroker(), MemoryBroker(capacity_pages=40)
    a = make(image, roomy)
    b = make(image, tight)
    drive(a, 80)
    drive(b, 80)
    assert tight.evictions > 0
    assert b.counters.cache_misses > a.counters.cache_misses
    assert b.counters.corrupt_pages == 0 and b.counters.swap_lost == 0


def test_wrong_bytes_from_a_backend_are_counted_as_corrupt(image: Image) -> None:
    class Flipping(MemoryBackend):
        def cache_get(self, keys):  # type: ignore[no-untyped-def]
            return [None if d is None else b"\xff" * 4096 for d in super().cache_get(keys)]

    broker = MemoryBroker()
    broker.add_guest(1)
    spec = GuestSpec(ram_pages=64, anon_pages=10, file_pages=200)
    model = GuestModel(1, spec, image, Flipping(broker, 1), seed=1)
    drive(model, 40, name="scan", k=32)
    assert model.counters.cache_hits > 0
    assert model.counters.corrupt_pages == model.counters.cache_hits


def test_a_step_larger_than_ram_is_refused(image: Image) -> None:
    model = make(image, MemoryBroker(), ram=8)
    with pytest.raises(WorkloadError):
        model.step([(p, False) for p in range(9)])


def test_pressure_reflects_faults_and_swap(image: Image) -> None:
    model = make(image, MemoryBroker(), ram=64)
    drive(model, 30, name="hotcold", k=32)
    p = model.pressure()
    assert 0 < p["psi_some_avg10"] <= 100
    assert 0 <= p["psi_full_avg10"] <= p["psi_some_avg10"]
    assert p["swap_used_bytes"] == len(model.swapped) * 4096 > 0
    assert 0 <= p["mem_available_bytes"] <= 64 * 4096
