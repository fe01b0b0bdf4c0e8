"""The simulator's adapter to the real agent shims, against the agent tests' fake broker."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from guest_agent.shims import Cleancache, Frontswap
from guest_agent.sim.agent import AgentBackend, RecordingClient, StepClock
from guest_agent.sim.images import Image
from guest_agent.sim.model import GuestModel, GuestSpec
from guest_agent.sim.workloads import make_workload
from tests.agent.fake_broker import FakeBroker

pytestmark = pytest.mark.timeout(60)


def page(i: int) -> bytes:
    return i.to_bytes(4, "big") * 1024


Make = Callable[..., AgentBackend]


@pytest.fixture
def backend() -> Iterator[Make]:
    made: list[AgentBackend] = []

    def make(fake: FakeBroker, clock: StepClock | None = None) -> AgentBackend:
        client = RecordingClient("http://fake", fake.token, transport=fake.transport())
        fs = Frontswap(client, clock=clock or StepClock())
        fs.init(0)
        made.append(AgentBackend(client, fs, Cleancache(client)))
        return made[-1]

    yield make
    for b in made:
        b.frontswap.close()  # the fallback file


def test_swap_round_trip_and_sources(backend: Make) -> None:
    fake = FakeBroker()
    b = backend(fake)
    assert b.swap_store([(i, page(i)) for i in range(10)]) == [None] * 10
    assert b.swap_load([3, 4]) == [("tmem", page(3)), ("tmem", page(4))]
    assert b.swap_at_broker([3, 99]) == [True, False]
    assert fake.persistent_pages() == 10


def test_declines_carry_the_broker_reason_then_the_agent_withholds(backend: Make) -> None:
    fake = FakeBroker()
    b = backend(fake)
    fake.cap_pages = 4  # lowered after the agent read its quota: only the broker knows
    first = b.swap_store([(i, page(i)) for i in range(6)])
    assert first == [None] * 4 + ["quota", "quota"]
    # Now the agent knows it is at its quota: it does not even offer the next pages.
    batches = len(fake.batch_sizes)
    assert b.swap_store([(10, page(10))]) == ["quota (agent)"]
    assert len(fake.batch_sizes) == batches
    # Declined pages went to the fallback file and load from "disk", byte for byte.
    assert b.swap_load([5, 10]) == [("disk", page(5)), ("disk", page(10))]


def test_a_cap_the_agent_knows_is_never_exceeded(backend: Make) -> None:
    fake = FakeBroker(cap_pages=4)
    b = backend(fake)
    assert b.swap_store([(i, page(i)) for i in range(6)]) == [None] * 4 + ["quota (agent)"] * 2
    assert fake.persistent_pages() == 4


def test_frozen_declines_say_frozen(backend: Make) -> None:
    fake = FakeBroker()
    b = backend(fake)
    fake.frozen = True
    assert b.swap_store([(1, page(1))]) == ["frozen"]
    assert b.swap_store([(2, page(2))]) == ["frozen (agent)"]


def test_invalidate_is_one_batch(backend: Make) -> None:
    fake = FakeBroker()
    b = backend(fake)
    b.swap_store([(i, page(i)) for i in range(50)])
    n = len(fake.batch_sizes)
    b.swap_invalidate(list(range(0, 50, 2)))
    assert len(fake.batch_sizes) == n + 1 and fake.batch_sizes[-1] == 25
    assert fake.persistent_pages() == 25
    assert b.swap_at_broker([0, 1]) == [False, True]


def test_cleancache_batches_are_exclusive_and_safe_when_the_broker_is_down(backend: Make) -> None:
    fake = FakeBroker()
    b = backend(fake)
    assert b.cache_put([(7, i, page(i)) for i in range(20)]) == [None] * 20
    got = b.cache_get([(7, 1), (7, 2), (8, 0)])
    assert got == [page(1), page(2), None]
    assert b.cache_get([(7, 1)]) == [None]  # private pool: the hit took the page away
    fake.down = True
    assert b.cache_put([(7, 30, page(30))]) == ["unreachable"]
    assert b.cache_get([(7, 3)]) == [None]
    fake.down = False
    # The put that may have landed is settled before anything is read again.
    assert b.cache_get([(7, 30)]) == [None]
    assert b.cache_get([(7, 4)]) == [page(4)]


def test_a_guest_model_on_the_agent_shims_sees_only_correct_pages(
    backend: Make, image_tree: Path
) -> None:
    fake = FakeBroker(cap_pages=60, capacity_pages=300)
    clock = StepClock()
    b = backend(fake, clock)
    image = Image.scan(image_tree)
    model = GuestModel(0, GuestSpec(64, 300, 300), image, b, seed=3)
    wl = make_workload("mix", model.space, seed=3, accesses_per_step=32)
    for step in range(60):
        clock.set_step(step)
        model.step(wl.step(step))
    c = model.counters
    assert c.corrupt_pages == 0 and c.swap_lost == 0
    assert c.swap_tmem_hits > 0 and c.swap_disk_reads > 0 and c.cache_hits > 0
    assert c.declines  # the cap and the capacity were both felt
