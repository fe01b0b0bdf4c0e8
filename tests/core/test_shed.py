"""Which pages a shed asks back (the persistent last-access order) and admin sheds with their
escalation, on a fixed clock (broker/core/restore.py, broker/core/pressure.py)."""

from __future__ import annotations

import tracemalloc

import pytest

from broker.core import CoreConfig, Tmem
from broker.core.errors import BadRequest, UnknownGuest
from broker.core.pressure import PressurePolicy, PressureSettings
from schemas.batch import STATUS_DONE, STATUS_QUOTA
from tests.core.conftest import PAGE, page

pytestmark = pytest.mark.timeout(60)


def core(capacity_pages: int = 1000) -> Tmem:
    t = Tmem(CoreConfig(capacity_bytes=capacity_pages * PAGE))
    t.add_guest(1, name="a")
    t.add_guest(2, name="b")
    for gid in (1, 2):
        assert t.create_pool(gid, "persistent") == 0
        assert t.create_pool(gid, "ephemeral") == 1
    return t


# -- candidates -------------------------------------------------------------------------------


def test_candidates_are_the_coldest_by_last_access_put_or_get() -> None:
    t = core()
    for i in range(5):
        assert t.put(1, 0, 7, i, page(i)) == STATUS_DONE
    assert t.shed_candidates(1, 10) == [(0, 7, i) for i in range(5)]
    assert t.get(1, 0, 7, 0) == page(0)  # a get makes a page the newest
    assert t.put(1, 0, 7, 1, page(11)) == STATUS_DONE  # so does a put replacing it
    assert t.shed_candidates(1, 3) == [(0, 7, 2), (0, 7, 3), (0, 7, 4)]
    assert t.shed_candidates(1, 10) == [(0, 7, i) for i in (2, 3, 4, 0, 1)]
    # a miss, another guest's operations and ephemeral pages change nothing
    assert t.get(1, 0, 9, 9) is None
    t.put(2, 0, 7, 2, page(2))
    t.get(2, 0, 7, 2)
    t.put(1, 1, 7, 3, page(3))
    assert t.shed_candidates(1, 10) == [(0, 7, i) for i in (2, 3, 4, 0, 1)]
    assert t.shed_candidates(2, 10) == [(0, 7, 2)]
    assert t.shed_candidates(1, 0) == []


def test_pages_taken_back_leave_the_order_and_the_next_call_names_the_next() -> None:
    t = core()
    second = t.create_pool(1, "persistent")
    exclusive = t.create_pool(1, "persistent", exclusive_gets=True)
    t.put(1, 0, 1, 0, page(1))
    t.put(1, second, (1 << 191) + 5, (1 << 32) - 1, page(2))  # the largest handles
    t.put(1, exclusive, 3, 3, page(3))
    t.put(1, 0, 4, 4, bytes(PAGE))  # zero pages are pages too
    assert t.shed_candidates(1, 10) == [
        (0, 1, 0),
        (second, (1 << 191) + 5, (1 << 32) - 1),
        (exclusive, 3, 3),
        (0, 4, 4),
    ]
    assert t.flush_page(1, 0, 1, 0)
    assert t.get(1, exclusive, 3, 3) == page(3)  # exclusive: the page left
    assert t.shed_candidates(1, 1) == [(second, (1 << 191) + 5, (1 << 32) - 1)]
    t.flush_object(1, second, (1 << 191) + 5)
    assert t.shed_candidates(1, 10) == [(0, 4, 4)]
    t.destroy_pool(1, 0)
    assert t.shed_candidates(1, 10) == []
    # a destroyed persistent pool's ref is reused without confusing the order
    again = t.create_pool(1, "persistent")
    t.put(1, again, 5, 5, page(5))
    assert t.shed_candidates(1, 10) == [(again, 5, 5)]
    t.flush_guest(1)
    assert t.shed_candidates(1, 10) == []


def test_restored_pages_are_in_the_order_and_bad_limits_are_refused() -> None:
    t = core()
    assert t.restore_pages(1, 0, [(1, i, page(i)) for i in range(3)]) == 3
    assert t.shed_candidates(1, 5) == [(0, 1, 0), (0, 1, 1), (0, 1, 2)]
    for bad in (-1, 1.5, "3"):
        with pytest.raises(BadRequest):
            t.shed_candidates(1, bad)  # type: ignore[arg-type]
    with pytest.raises(UnknownGuest):
        t.shed_candidates(99, 1)


def test_the_order_costs_a_bounded_number_of_bytes_per_page() -> None:
    """What ``Guest.recency`` holds per persistent page (its dict slots and int keys),
    measured with tracemalloc: the memory freed when a filled order is cleared."""
    n = 20_000
    t = core(capacity_pages=2 * n)
    tracemalloc.start()
    try:
        for i in range(n):
            t.put(1, 0, i & 0xF, i >> 4, bytes(PAGE))  # zero pages: no content bytes
        for i in range(0, n, 2):
            t.get(1, 0, i & 0xF, i >> 4)  # half the pages touched again: a used order
        full, _ = tracemalloc.get_traced_memory()
        t._reg.guest(1).recency.clear()
        empty, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_page = (full - empty) / n
    print(f"recency: {per_page:.0f} B/page")
    assert 30 <= per_page <= 120


# -- admin sheds and the escalation -------------------------------------------------------------


def _policy(t: Tmem) -> PressurePolicy:
    return PressurePolicy(t, PressureSettings(shed_deadline_s=30.0), now=0.0)


def test_admin_shed_holds_then_clamps_then_releases_and_never_drops_a_page() -> None:
    t = core()
    policy = _policy(t)
    for i in range(10):
        t.put(1, 0, 1, i, page(i))
    intents = policy.admin_shed(0.0, 1, 4, deadline_s=20.0)
    assert [(i.kind, i.cap_pages, i.pages, i.deadline) for i in intents] == [
        ("quota", 6, None, None),
        ("shed", None, 4, 20.0),
    ]
    policy.shed_sent(1, 77)
    assert t.quota_of(1) == 6
    # before the deadline: it keeps what it holds (a replace is fine) but cannot grow
    assert t.put(1, 0, 1, 0, page(100)) == STATUS_DONE
    assert t.put(1, 0, 1, 10, page(10)) == STATUS_QUOTA
    assert policy.step(10.0, {}) == [] and not policy.sheds[1].overdue
    # the other guest is not touched
    assert t.put(2, 0, 1, 0, page(5)) == STATUS_DONE and t.quota_of(2) is None
    # the deadline passes with the guest still over: the quota binds, the guest hears it, its
    # weight falls to the floor; every page it holds is still there
    intents = policy.step(25.0, {})
    assert [(i.kind, i.guest_id, i.cap_pages) for i in intents] == [("quota", 1, 6)]
    assert policy.sheds[1].overdue and policy.figures().guests_overdue == 1
    assert policy.step(26.0, {}) == []  # (the weights are set at the start of a step)
    assert t._reg.guest(1).account.bias == pytest.approx(0.5)
    assert t.put(1, 0, 1, 0, page(101)) == STATUS_QUOTA  # over its quota: even a replace
    assert [t.get(1, 0, 1, i) for i in range(1, 10)] == [page(i) for i in range(1, 10)]
    assert t.get(1, 0, 1, 0) is None  # the declined put flushed its handle (the contract)
    # the guest takes back the candidates it is told: met once down by 4 (one went above)
    assert policy.acked(1, 77, 3)
    for _pid, oid, index in t.shed_candidates(1, 3):
        t.flush_page(1, 0, oid, index)
    policy.step(30.0, {})
    assert 1 not in policy.sheds and policy.admin_targets == {}
    assert t.quota_of(1) is None
    policy.step(31.0, {})
    assert t._reg.guest(1).account.bias == 1.0
    f = policy.figures()
    assert (f.admin_sheds, f.sheds_issued, f.sheds_overdue, f.sheds_acked) == (1, 1, 1, 1)
    assert f.pages_returned == 3


def test_admin_shed_met_in_time_stands_through_a_release_and_is_bounded_by_what_is_held() -> None:
    t = core()
    policy = _policy(t)
    assert policy.admin_shed(0.0, 1, 5) == []  # holds nothing: nothing to ask
    for i in range(4):
        t.put(1, 0, 1, i, page(i))
    intents = policy.admin_shed(0.0, 1, 100)  # more than it holds: all of it
    assert [i.pages for i in intents if i.kind == "shed"] == [4]
    assert intents[1].deadline == 30.0  # the setting's deadline
    policy._release({1: (4, 100, None)}, [])  # pressure eased: an admin's shed stands
    assert t.quota_of(1) == 0 and 1 in policy.sheds
    for _pid, oid, index in t.shed_candidates(1, 4):
        t.flush_page(1, 0, oid, index)
    policy.step(5.0, {})
    f = policy.figures()
    assert (f.sheds_met, f.sheds_overdue, f.sheds_open) == (1, 0, 0)
    assert t.quota_of(1) is None
    with pytest.raises(UnknownGuest):
        policy.admin_shed(0.0, 99, 1)
