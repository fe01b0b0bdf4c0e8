"""Guests and pools: ids, kinds, limits, shared pools and their lifetime."""

from __future__ import annotations

import pytest

from broker.core import UNSET, PoolView, Tmem
from broker.core.errors import (
    BadRequest,
    Conflict,
    GuestExists,
    NotAuthorised,
    TooManyPools,
    UnknownGuest,
    UnknownPool,
)
from tests.core.conftest import SHARED_UUID, MakeTmem, page


def test_guest_lifecycle(tmem: Tmem) -> None:
    assert tmem.has_guest(1) and not tmem.has_guest(3)
    with pytest.raises(GuestExists) as info:
        tmem.add_guest(1, name="again")
    assert (info.value.status, info.value.code) == (409, "guest_exists")
    tmem.remove_guest(1)
    assert not tmem.has_guest(1)
    with pytest.raises(UnknownGuest):
        tmem.remove_guest(1)


@pytest.mark.parametrize(
    ("field", "value"), [("weight", 0), ("weight", -5), ("cap_pages", -1), ("dedup_domain", "")]
)
def test_bad_guest_settings_are_refused(tmem: Tmem, field: str, value: object) -> None:
    with pytest.raises(BadRequest):
        tmem.add_guest(9, name="bad", **{field: value})  # type: ignore[arg-type]
    assert not tmem.has_guest(9)


@pytest.mark.parametrize("call", ["put", "get", "flush_page", "flush_object", "guest_stats"])
def test_unknown_guest(tmem: Tmem, call: str) -> None:
    args = {
        "put": (7, 0, 0, 0, page(1)),
        "get": (7, 0, 0, 0),
        "flush_page": (7, 0, 0, 0),
        "flush_object": (7, 0, 0),
        "guest_stats": (7,),
    }[call]
    with pytest.raises(UnknownGuest) as info:
        getattr(tmem, call)(*args)
    assert info.value.status == 404


@pytest.mark.parametrize("pool_id", [-1, 0, 5, 16, 10**30])
def test_unknown_pool(tmem: Tmem, pool_id: int) -> None:
    with pytest.raises(UnknownPool) as info:
        tmem.put(1, pool_id, 0, 0, page(1))
    assert (info.value.status, info.value.code) == (404, "unknown_pool")


def test_pool_ids_are_per_guest_lowest_free_first(tmem: Tmem) -> None:
    assert [tmem.create_pool(1, "persistent") for _ in range(3)] == [0, 1, 2]
    assert tmem.create_pool(2, "ephemeral") == 0  # guest 2's own namespace
    tmem.destroy_pool(1, 1)
    assert tmem.create_pool(1, "ephemeral") == 1
    tmem.put(1, 0, 5, 5, page(1))
    assert tmem.get(2, 0, 5, 5) is None  # guest 2's pool 0 is another pool


@pytest.mark.parametrize("limit", [1, 3, 16])
def test_pool_limit_is_configurable(make_tmem: MakeTmem, limit: int) -> None:
    tmem = make_tmem(max_pools=limit)
    assert [tmem.create_pool(1, "ephemeral") for _ in range(limit)] == list(range(limit))
    with pytest.raises(TooManyPools) as info:
        tmem.create_pool(1, "ephemeral")
    assert (info.value.status, info.value.code) == (409, "too_many_pools")


def test_explicit_pool_id(tmem: Tmem) -> None:
    assert tmem.create_pool(1, "persistent", pool_id=7) == 7
    with pytest.raises(Conflict):
        tmem.create_pool(1, "persistent", pool_id=7)
    with pytest.raises(BadRequest):
        tmem.create_pool(1, "persistent", pool_id=16)
    assert tmem.create_pool(1, "ephemeral") == 0


@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [
        ("volatile", {}),
        ("persistent", {"shared": True, "uuid": SHARED_UUID}),
        ("ephemeral", {"shared": True}),
        ("ephemeral", {"shared": True, "uuid": "not-a-uuid"}),
        ("ephemeral", {"shared": True, "uuid": SHARED_UUID, "exclusive_gets": True}),
        ("ephemeral", {"uuid": SHARED_UUID}),
    ],
)
def test_bad_pool_requests(tmem: Tmem, kind: str, kwargs: dict[str, object]) -> None:
    tmem.authorise_shared(SHARED_UUID, 1, True)
    with pytest.raises(BadRequest):
        tmem.create_pool(1, kind, **kwargs)  # type: ignore[arg-type]
    assert tmem.pools(1) == []


def test_pool_views(tmem: Tmem) -> None:
    tmem.authorise_shared(SHARED_UUID, 1, True)
    tmem.create_pool(1, "persistent", exclusive_gets=True)
    tmem.create_pool(1, "ephemeral", shared=True, uuid=SHARED_UUID.upper())
    tmem.put(1, 0, 1, 1, page(1))
    assert tmem.pools(1) == [
        PoolView(0, "persistent", False, None, True, 1),
        PoolView(1, "ephemeral", True, SHARED_UUID, False, 0),
    ]


def test_shared_pool_needs_authorisation(tmem: Tmem) -> None:
    with pytest.raises(NotAuthorised) as info:
        tmem.create_pool(1, "ephemeral", shared=True, uuid=SHARED_UUID)
    assert (info.value.status, info.value.code) == (403, "not_authorised")
    tmem.authorise_shared(SHARED_UUID, 1, True)
    assert tmem.is_authorised(SHARED_UUID, 1) and not tmem.is_authorised(SHARED_UUID, 2)
    tmem.create_pool(1, "ephemeral", shared=True, uuid=SHARED_UUID)
    with pytest.raises(NotAuthorised):
        tmem.create_pool(2, "ephemeral", shared=True, uuid=SHARED_UUID)
    tmem.authorise_shared(SHARED_UUID, 1, False)
    with pytest.raises(NotAuthorised):
        tmem.create_pool(1, "ephemeral", shared=True, uuid="00000000-0000-0000-0000-000000000001")


def test_shared_pool_is_joined_and_lives_while_used(tmem: Tmem) -> None:
    for gid in (1, 2):
        tmem.authorise_shared(SHARED_UUID, gid, True)
    tmem.create_pool(2, "persistent")  # guest 2's ids differ from guest 1's
    a = tmem.create_pool(1, "ephemeral", shared=True, uuid=SHARED_UUID)
    b = tmem.create_pool(2, "ephemeral", shared=True, uuid=SHARED_UUID)
    assert (a, b) == (0, 1)
    assert tmem.create_pool(1, "ephemeral", shared=True, uuid=SHARED_UUID) == a  # joined already
    tmem.put(1, a, 3, 4, page(5))
    # shared gets are never exclusive
    assert tmem.get(2, b, 3, 4) == page(5)
    assert tmem.get(1, a, 3, 4) == page(5)
    tmem.destroy_pool(1, a)
    assert tmem.get(2, b, 3, 4) == page(5)  # still used by guest 2
    assert tmem.stats().unique_pages == 1
    tmem.remove_guest(2)  # the last member: the pool and its pages go
    stats = tmem.stats()
    assert stats.unique_pages == 0 and stats.used_bytes == 0 and stats.shared_pools == []
    tmem.create_pool(1, "ephemeral", shared=True, uuid=SHARED_UUID)
    assert tmem.get(1, 0, 3, 4) is None  # a new pool, empty


def test_remove_guest_drops_its_pages_and_authorisations(tmem: Tmem) -> None:
    tmem.authorise_shared(SHARED_UUID, 1, True)
    tmem.create_pool(1, "persistent")
    tmem.put(1, 0, 0, 0, page(1))
    tmem.remove_guest(1)
    assert tmem.stats().logical_pages == 0
    tmem.add_guest(1, name="new")
    assert tmem.pools(1) == [] and not tmem.is_authorised(SHARED_UUID, 1)


def test_destroy_pool_is_idempotent(tmem: Tmem) -> None:
    tmem.create_pool(1, "persistent")
    tmem.put(1, 0, 0, 0, page(1))
    tmem.destroy_pool(1, 0)
    tmem.destroy_pool(1, 0)
    tmem.destroy_pool(1, 9)
    assert tmem.stats().used_bytes == 0
    with pytest.raises(UnknownPool):
        tmem.get(1, 0, 0, 0)


def test_update_guest(tmem: Tmem) -> None:
    tmem.update_guest(1, weight=300, cap_pages=5, compress=True)
    info = tmem.guest_stats(1)
    assert (info.weight, info.cap_pages, info.compress) == (300, 5, True)
    tmem.update_guest(1, weight=200)
    assert tmem.guest_stats(1).cap_pages == 5  # UNSET leaves it
    tmem.update_guest(1, cap_pages=None)
    assert tmem.guest_stats(1).cap_pages is None
    tmem.update_guest(1, cap_pages=UNSET)
    with pytest.raises(BadRequest):
        tmem.update_guest(1, weight=0)
    assert tmem.guest_stats(1).weight == 200


def test_flush_guest_keeps_pools_and_shared_pages(tmem: Tmem) -> None:
    for gid in (1, 2):
        tmem.authorise_shared(SHARED_UUID, gid, True)
    tmem.create_pool(1, "persistent")
    tmem.create_pool(1, "ephemeral")
    tmem.create_pool(1, "ephemeral", shared=True, uuid=SHARED_UUID)
    tmem.create_pool(2, "ephemeral", shared=True, uuid=SHARED_UUID)
    for pid in range(3):
        tmem.put(1, pid, 0, 0, page(pid))
    assert tmem.flush_guest(1) == 2
    assert [v.pages for v in tmem.pools(1)] == [0, 0, 1]
    assert tmem.get(2, 0, 0, 0) == page(2)


def test_freeze_and_thaw(tmem: Tmem) -> None:
    tmem.create_pool(1, "persistent")
    tmem.put(1, 0, 0, 0, page(1))
    tmem.freeze(1)
    assert tmem.is_frozen(1)
    assert tmem.put(1, 0, 0, 1, page(2)) == 4  # FROZEN
    assert tmem.get(1, 0, 0, 0) == page(1)  # gets still work
    tmem.thaw(1)
    assert tmem.put(1, 0, 0, 1, page(2)) == 0
