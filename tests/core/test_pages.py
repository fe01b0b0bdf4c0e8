"""Handles, page sizes and the semantics of put, get, flush and batch."""

from __future__ import annotations

import pytest

from broker.core import Status, Tmem
from broker.core.errors import BadHandle, BadPageSize, BadRequest
from schemas.batch import MAX_INDEX, MAX_OID, OP_FLUSH_OBJECT, OP_FLUSH_PAGE, OP_GET, OP_PUT
from tests.core.conftest import PAGE, SHARED_UUID, MakeTmem, page

POOL_KINDS = ["persistent", "persistent-exclusive", "ephemeral", "shared"]


def make_pool(tmem: Tmem, kind: str, guest_id: int = 1) -> int:
    if kind == "shared":
        tmem.authorise_shared(SHARED_UUID, guest_id, True)
        return tmem.create_pool(guest_id, "ephemeral", shared=True, uuid=SHARED_UUID)
    if kind == "persistent-exclusive":
        return tmem.create_pool(guest_id, "persistent", exclusive_gets=True)
    return tmem.create_pool(guest_id, kind)


@pytest.mark.parametrize(
    ("oid", "index"), [(0, 0), (MAX_OID, MAX_INDEX), (2**64, 2**31), (1 << 191, 7)]
)
def test_handle_bounds_accepted(tmem: Tmem, oid: int, index: int) -> None:
    pid = make_pool(tmem, "persistent")
    assert tmem.put(1, pid, oid, index, page(1)) == Status.DONE
    assert tmem.get(1, pid, oid, index) == page(1)


@pytest.mark.parametrize(
    ("oid", "index"), [(-1, 0), (MAX_OID + 1, 0), (0, -1), (0, MAX_INDEX + 1), (1 << 192, 1)]
)
@pytest.mark.parametrize("call", ["put", "get", "flush_page"])
def test_handle_out_of_range(tmem: Tmem, oid: int, index: int, call: str) -> None:
    pid = make_pool(tmem, "persistent")
    args = (1, pid, oid, index, page(1)) if call == "put" else (1, pid, oid, index)
    with pytest.raises(BadHandle) as info:
        getattr(tmem, call)(*args)
    assert (info.value.status, info.value.code) == (400, "bad_handle")
    assert tmem.stats().ops.puts == 0 and tmem.stats().ops.gets == 0


@pytest.mark.parametrize("size", [0, 1, PAGE - 1, PAGE + 1, 2 * PAGE])
def test_bad_page_size_changes_nothing(tmem: Tmem, size: int) -> None:
    pid = make_pool(tmem, "persistent")
    tmem.put(1, pid, 1, 1, page(1))
    before = tmem.stats()
    with pytest.raises(BadPageSize) as info:
        tmem.put(1, pid, 1, 1, b"x" * size)
    assert (info.value.status, info.value.code) == (400, "bad_page_size")
    assert tmem.get(1, pid, 1, 1) == page(1)  # the old page is still there
    after = tmem.stats()
    assert after.ops.puts == before.ops.puts and after.used_bytes == before.used_bytes


@pytest.mark.parametrize("kind", POOL_KINDS)
@pytest.mark.parametrize("data", [page(1), bytearray(page(1)), memoryview(page(1))])
def test_put_replaces(tmem: Tmem, kind: str, data: bytes) -> None:
    pid = make_pool(tmem, kind)
    assert tmem.put(1, pid, 1, 2, data) == Status.DONE
    assert tmem.put(1, pid, 1, 2, page(2)) == Status.DONE
    assert tmem.get(1, pid, 1, 2) == page(2)
    assert tmem.stats().logical_pages == (1 if kind in ("persistent", "shared") else 0)


@pytest.mark.parametrize(
    ("kind", "exclusive"),
    [("persistent", False), ("persistent-exclusive", True), ("ephemeral", True), ("shared", False)],
)
def test_get_exclusivity(tmem: Tmem, kind: str, exclusive: bool) -> None:
    pid = make_pool(tmem, kind)
    tmem.put(1, pid, 1, 2, page(3))
    assert tmem.get(1, pid, 1, 2) == page(3)
    second = tmem.get(1, pid, 1, 2)
    assert second == (None if exclusive else page(3))
    assert tmem.get(1, pid, 9, 9) is None


@pytest.mark.parametrize("kind", POOL_KINDS)
def test_flushes_are_idempotent(tmem: Tmem, kind: str) -> None:
    pid = make_pool(tmem, kind)
    for index in range(3):
        tmem.put(1, pid, 5, index, page(index))
    tmem.put(1, pid, 6, 0, page(9))
    assert tmem.flush_page(1, pid, 5, 0) is True
    assert tmem.flush_page(1, pid, 5, 0) is False
    assert tmem.get(1, pid, 5, 0) is None
    assert tmem.flush_object(1, pid, 5) == 2
    assert tmem.flush_object(1, pid, 5) == 0
    assert tmem.get(1, pid, 5, 1) is None
    assert tmem.get(1, pid, 6, 0) == page(9)  # another object is untouched
    stats = tmem.stats()
    assert (stats.ops.flushes, stats.ops.flushes_found, stats.ops.object_flushes) == (2, 1, 2)


def test_flush_object_touches_only_that_object(make_tmem: MakeTmem) -> None:
    # O(pages of the object): a flush of a one-page object in a pool of thousands of pages
    # visits one page, which the store's delete count shows
    deletes: list[int] = []

    class CountingStore(dict[int, bytes]):
        def put(self, key: int, data: bytes, /) -> None:
            self[key] = data

        def delete(self, key: int, /) -> None:
            deletes.append(key)
            del self[key]

    tmem = make_tmem(capacity_pages=3000, store=CountingStore())
    pid = tmem.create_pool(1, "persistent")
    for i in range(2000):
        tmem.put(1, pid, i % 7, i, page(i))
    tmem.put(1, pid, 99, 0, page(99_999))
    assert tmem.flush_object(1, pid, 99) == 1
    assert len(deletes) == 1


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("frozen", "persistent"),
        ("frozen", "ephemeral"),
        ("quota", "persistent"),
        ("capacity", "persistent"),
        ("capacity", "ephemeral"),
    ],
)
def test_declined_put_removes_the_old_copy(make_tmem: MakeTmem, reason: str, kind: str) -> None:
    tmem = make_tmem(capacity_pages=2)
    pid = tmem.create_pool(1, kind)
    # For capacity: a zero page (charged nothing), so removing it cannot make room.
    tmem.put(1, pid, 1, 1, bytes(PAGE) if reason == "capacity" else page(1))
    expected = {"frozen": Status.FROZEN, "quota": Status.QUOTA, "capacity": Status.CAPACITY}
    if reason == "frozen":
        tmem.freeze(1)
    elif reason == "quota":
        tmem.update_guest(1, cap_pages=0)
    else:
        # guest 2 fills the broker
        other = tmem.create_pool(2, "persistent")
        tmem.put(2, other, 0, 0, page(7))
        tmem.put(2, other, 0, 1, page(8))
    assert tmem.put(1, pid, 1, 1, page(2)) == expected[reason]
    assert tmem.get(1, pid, 1, 1) is None
    assert getattr(tmem.stats().ops.puts_declined, reason) == 1


def test_quota_allows_replacing_at_the_cap(tmem: Tmem) -> None:
    tmem.update_guest(1, cap_pages=2)
    pid = tmem.create_pool(1, "persistent")
    eph = tmem.create_pool(1, "ephemeral")
    assert tmem.put(1, pid, 0, 0, page(1)) == Status.DONE
    assert tmem.put(1, pid, 0, 1, bytes(PAGE)) == Status.DONE  # zero pages count too
    assert tmem.put(1, pid, 0, 2, page(3)) == Status.QUOTA
    assert tmem.put(1, pid, 0, 0, page(4)) == Status.DONE  # replacing at the cap
    assert tmem.put(1, eph, 0, 0, page(5)) == Status.DONE  # ephemeral pages are not capped
    tmem.update_guest(1, cap_pages=1)  # now over: replacing is declined until under
    assert tmem.put(1, pid, 0, 0, page(6)) == Status.QUOTA
    assert tmem.guest_stats(1).persistent_pages == 1  # the declined put removed its page
    assert tmem.put(1, pid, 0, 1, page(6)) == Status.DONE  # at the cap again: replacing works
    assert tmem.put(1, pid, 0, 2, page(7)) == Status.QUOTA


def test_batch_applies_in_order(tmem: Tmem) -> None:
    pid = make_pool(tmem, "persistent")
    results = tmem.batch(
        1,
        pid,
        [
            (OP_PUT, 1, 0, memoryview(page(1))),
            (OP_GET, 1, 0, None),
            (OP_PUT, 1, 1, page(2)),
            (OP_FLUSH_PAGE, 1, 0, None),
            (OP_GET, 1, 0, None),
            (OP_FLUSH_OBJECT, 1, 12345, None),
            (OP_GET, 1, 1, None),
        ],
    )
    assert results == [
        (0, None),
        (0, page(1)),
        (0, None),
        (0, None),
        (1, None),
        (0, None),
        (1, None),
    ]


@pytest.mark.parametrize(
    "bad",
    [
        (OP_GET, -1, 0, None),
        (OP_PUT, 0, MAX_INDEX + 1, page(1)),
        (OP_PUT, 0, 0, b"short"),
        (OP_PUT, 0, 0, None),
        (9, 0, 0, None),
    ],
)
def test_malformed_batch_changes_nothing(
    tmem: Tmem, bad: tuple[int, int, int, bytes | None]
) -> None:
    pid = make_pool(tmem, "persistent")
    tmem.put(1, pid, 0, 0, page(1))
    before = tmem.stats()
    with pytest.raises(BadRequest):
        tmem.batch(1, pid, [(OP_FLUSH_PAGE, 0, 0, None), (OP_PUT, 0, 5, page(2)), bad])
    assert tmem.stats() == before
    assert tmem.get(1, pid, 0, 0) == page(1)


def test_restore_page_skips_checks_and_counters(tmem: Tmem) -> None:
    pid = make_pool(tmem, "persistent")
    tmem.update_guest(1, cap_pages=0)
    tmem.freeze(1)
    tmem.capacity_bytes = 0
    tmem.restore_page(1, pid, 3, 3, page(1))
    tmem.restore_page(1, pid, 3, 4, bytes(PAGE))
    assert tmem.get(1, pid, 3, 3) == page(1)
    stats = tmem.stats()
    assert (stats.ops.puts, stats.persistent_pages, stats.used_bytes) == (0, 2, PAGE)
    eph = make_pool(tmem, "ephemeral")
    with pytest.raises(BadRequest):
        tmem.restore_page(1, eph, 0, 0, page(1))
    with pytest.raises(BadPageSize):
        tmem.restore_page(1, pid, 0, 0, b"x")


@pytest.mark.parametrize("kind", POOL_KINDS)
def test_pool_pages_reads_every_page_without_side_effects(tmem: Tmem, kind: str) -> None:
    pid = make_pool(tmem, kind)
    expected = {(oid, index): page(oid * 10 + index) for oid in (1, 2) for index in range(3)}
    expected[(5, 0)] = bytes(4096)  # a zero page is read back too
    for (oid, index), data in expected.items():
        assert tmem.put(1, pid, oid, index, data) == Status.DONE
    listing = tmem.pool_pages(1, pid)
    tmem.flush_page(1, pid, 2, 2)  # flushed after the listing, before it is read: skipped
    del expected[(2, 2)]
    before = (tmem.guest_stats(1), tmem.stats())
    assert {(oid, index): data for oid, index, data in listing} == expected
    assert (tmem.guest_stats(1), tmem.stats()) == before  # no get counted, nothing moved
    # nothing left an exclusive pool
    assert tmem.get(1, pid, 1, 0) == page(10)
