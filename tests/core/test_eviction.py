"""Capacity and eviction: LRU, weight-fair victims, persistent pages never evicted."""

from __future__ import annotations

import pytest

from broker.core import Status, Tmem
from schemas.batch import MAX_INDEX, MAX_OID
from tests.core.conftest import PAGE, SHARED_UUID, MakeTmem, page, soft_page


def fill(tmem: Tmem, guest_id: int, pool_id: int, n: int, base: int) -> None:
    for i in range(n):
        assert tmem.put(guest_id, pool_id, 0, i, page(base + i)) == Status.DONE


def test_lru_within_an_account(make_tmem: MakeTmem) -> None:
    tmem = make_tmem(capacity_pages=3)
    a = tmem.create_pool(1, "ephemeral")
    b = tmem.create_pool(1, "ephemeral")  # one account for both of the guest's pools
    tmem.put(1, a, 0, 0, page(1))
    tmem.put(1, b, 0, 0, page(2))
    tmem.put(1, a, 0, 1, page(3))
    tmem.put(1, b, 0, 1, page(4))  # evicts the oldest: (a, 0, 0)
    assert tmem.get(1, a, 0, 0) is None
    assert tmem.get(1, b, 0, 0) == page(2)
    stats = tmem.guest_stats(1)
    assert stats.ops.evictions == 1 and tmem.drain_evicted(1) == 1 and tmem.drain_evicted(1) == 0


@pytest.mark.parametrize(
    ("pages_1", "weight_1", "pages_2", "weight_2", "victim"),
    [
        (4, 100, 4, 100, 1),  # equal shares: the older account
        (4, 100, 6, 300, 1),  # guest 2 holds more pages but less per weight: take from 1
        (6, 300, 4, 100, 2),  # and the other way round
        (2, 100, 6, 100, 2),  # equal weights: the one with more pages
        (3, 1, 6, 100, 1),
    ],
)
def test_weight_fair_victim(
    make_tmem: MakeTmem, pages_1: int, weight_1: int, pages_2: int, weight_2: int, victim: int
) -> None:
    # Xen's check was inverted (it took from the guest *under* its share); the victim is
    # the account with the largest ephemeral_pages / weight.
    tmem = make_tmem(capacity_pages=pages_1 + pages_2)
    tmem.update_guest(1, weight=weight_1)
    tmem.update_guest(2, weight=weight_2)
    p1 = tmem.create_pool(1, "ephemeral")
    p2 = tmem.create_pool(2, "ephemeral")
    fill(tmem, 1, p1, pages_1, 100)
    fill(tmem, 2, p2, pages_2, 200)
    assert tmem.evict(1) == 1
    assert tmem.guest_stats(victim).ops.evictions == 1
    assert tmem.guest_stats(3 - victim).ops.evictions == 0
    # and within the victim it was the oldest page
    first = tmem.get(victim, p1 if victim == 1 else p2, 0, 0)
    assert first is None


def test_persistent_pages_are_never_evicted(make_tmem: MakeTmem) -> None:
    tmem = make_tmem(capacity_pages=3)
    per = tmem.create_pool(1, "persistent")
    eph = tmem.create_pool(2, "ephemeral")
    fill(tmem, 2, eph, 2, 10)
    fill(tmem, 1, per, 3, 20)  # the ephemeral pages make room
    assert tmem.stats().ephemeral_pages == 0 and tmem.stats().ops.evictions == 2
    assert tmem.put(1, per, 1, 0, page(99)) == Status.CAPACITY
    assert tmem.put(2, eph, 1, 0, page(98)) == Status.CAPACITY
    assert [tmem.get(1, per, 0, i) for i in range(3)] == [page(20), page(21), page(22)]


def test_capacity_changes_at_run_time(make_tmem: MakeTmem) -> None:
    tmem = make_tmem(capacity_pages=10)
    per = tmem.create_pool(1, "persistent")
    eph = tmem.create_pool(1, "ephemeral")
    fill(tmem, 1, per, 3, 0)
    fill(tmem, 1, eph, 5, 10)
    tmem.capacity_bytes = 5 * PAGE  # evicts at once
    assert tmem.used_bytes == 5 * PAGE and tmem.stats().ephemeral_pages == 2
    tmem.capacity_bytes = 2 * PAGE  # persistent pages alone exceed it: they stay
    assert tmem.used_bytes == 3 * PAGE and tmem.stats().ephemeral_pages == 0
    assert tmem.put(1, eph, 9, 9, page(50)) == Status.CAPACITY
    tmem.capacity_bytes = 100 * PAGE
    assert tmem.put(1, eph, 9, 9, page(50)) == Status.DONE


def test_evict_for_watermarks(make_tmem: MakeTmem) -> None:
    tmem = make_tmem(capacity_pages=20)
    eph = tmem.create_pool(1, "ephemeral")
    fill(tmem, 1, eph, 6, 0)
    tmem.put(1, eph, 1, 0, page(0))  # shares a content with (0, 0)
    assert tmem.evict(0) == 0
    # evict() counts charges, not bytes held (so what is evicted never depends on what other
    # guests share): two pages go for two pages' worth, although the oldest, (0, 0), shares
    # its content with (1, 0) and freed no bytes
    assert tmem.evict(2 * PAGE) == 2
    assert tmem.charged_bytes == 5 * PAGE and tmem.used_bytes == 5 * PAGE
    assert tmem.get(1, eph, 1, 0) == page(0)
    assert tmem.evict(100 * PAGE) == 4  # everything that is left
    assert tmem.evict(PAGE) == 0 and tmem.used_bytes == 0 == tmem.charged_bytes


def test_shared_pool_is_its_own_account_weighted_by_its_best_member(make_tmem: MakeTmem) -> None:
    tmem = make_tmem(capacity_pages=8)
    tmem.add_guest(3, name="three", weight=400)
    for gid in (1, 3):
        tmem.authorise_shared(SHARED_UUID, gid, True)
    shared = tmem.create_pool(1, "ephemeral", shared=True, uuid=SHARED_UUID)
    private = tmem.create_pool(2, "ephemeral")
    fill(tmem, 1, shared, 4, 0)
    fill(tmem, 2, private, 2, 10)
    # shared: 4 pages / weight 100 > guest 2: 2 / 100 -> the shared pool loses
    assert tmem.evict(1) == 1
    assert tmem.stats().shared_pools[0].evictions == 1
    tmem.create_pool(3, "ephemeral", shared=True, uuid=SHARED_UUID)  # weight becomes 400
    assert tmem.stats().shared_pools[0].weight == 400
    assert tmem.evict(1) == 1  # 3/400 < 2/100: now guest 2 loses
    assert tmem.guest_stats(2).ops.evictions == 1
    tmem.destroy_pool(3, 0)  # back to weight 100
    assert tmem.stats().shared_pools[0].weight == 100


def test_shared_get_refreshes_lru(make_tmem: MakeTmem) -> None:
    tmem = make_tmem(capacity_pages=3)
    tmem.authorise_shared(SHARED_UUID, 1, True)
    pid = tmem.create_pool(1, "ephemeral", shared=True, uuid=SHARED_UUID)
    fill(tmem, 1, pid, 3, 0)
    assert tmem.get(1, pid, 0, 0) == page(0)  # now the most recently used
    tmem.put(1, pid, 0, 3, page(3))
    assert tmem.get(1, pid, 0, 1) is None
    assert tmem.get(1, pid, 0, 0) == page(0)


def test_eviction_empties_objects_cleanly(make_tmem: MakeTmem) -> None:
    tmem = make_tmem(capacity_pages=1)
    eph = tmem.create_pool(1, "ephemeral")
    tmem.put(1, eph, 5, 0, page(1))
    # the put into the same object evicts that object's only page first
    assert tmem.put(1, eph, 5, 1, page(2)) == Status.DONE
    assert tmem.get(1, eph, 5, 1) == page(2)
    assert tmem.flush_object(1, eph, 5) == 0


@pytest.mark.parametrize(
    "handles",
    [
        [(0, 0), (0, 1), (1, 0)],
        [(MAX_OID, MAX_INDEX), (MAX_OID, 0), (MAX_OID - 1, MAX_INDEX)],
        [(2**32 + 5, 7), (5, 2**32 - 1), (2**32 - 1, 2**32 - 1)],
    ],
)
@pytest.mark.parametrize("compress", [False, True])
def test_eviction_finds_the_right_page_for_any_handle(
    make_tmem: MakeTmem, handles: list[tuple[int, int]], compress: bool
) -> None:
    # LRU and charge keys pack (pool, oid, index) into one int; every handle must come back
    tmem = make_tmem(capacity_pages=2)
    tmem.update_guest(1, compress=compress)
    a = tmem.create_pool(1, "ephemeral")
    b = tmem.create_pool(1, "ephemeral")
    data = soft_page if compress else page
    for i, (oid, index) in enumerate(handles):
        tmem.put(1, a if i % 2 else b, oid, index, data(i))
    tmem.capacity_bytes = 0  # evicts everything, oldest first
    assert tmem.stats().ephemeral_pages == 0 and tmem.used_bytes == 0
    assert tmem.guest_stats(1).charged_bytes == 0
    for i, (oid, index) in enumerate(handles):
        tmem.capacity_bytes = 2 * PAGE
        assert tmem.put(1, a, oid, index, data(i)) == Status.DONE
    tmem.capacity_bytes = 0
    assert tmem.stats().ops.evictions == 2 * len(handles)
