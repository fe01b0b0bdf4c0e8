"""The put path's inlined rules stay equal to the methods they mirror.

``Tmem._put`` writes ``PageTable.take``, ``Contents.reference`` (its new-content branch) and
``PageTable.place`` inline, and ``Tmem._get`` the LRU key of :mod:`broker.core.keys`, because
calling them cost about 20 % more per put in the core (1.47-1.55 us -> 1.74-1.85 us per
persistent put, 100k unique pages, three interleaved runs of a ``process_time`` loop). These
tests apply the same operations once through ``Tmem.put`` and once through the methods, and
require the two cores to end in the same state, field by field.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core import CoreConfig, Tmem
from broker.core.content import ZERO_KEY, ZERO_PAGE
from broker.core.keys import lru_handle, lru_key, lru_ref, lru_tag, slot_key
from schemas.batch import MAX_INDEX, MAX_OID, OP_GET, STATUS_DONE, STATUS_MISS

pytestmark = pytest.mark.timeout(120)

_RANDOM = os.urandom(4096)
PAGES = [
    ZERO_PAGE,
    _RANDOM,  # incompressible: compress_poor for a compressing guest
    bytes(range(256)) * 16,  # compresses well
    b"\x01" * 4096,
    _RANDOM[:2048] + bytes(2048),  # half compressible
]


def _core() -> Tmem:
    t = Tmem(CoreConfig(capacity_bytes=1 << 30))
    t.add_guest(1, name="plain")
    t.add_guest(2, name="packs", compress=True)
    for gid in (1, 2):
        t.create_pool(gid, "persistent")
        t.create_pool(gid, "ephemeral")
    return t


def _reference_put(t: Tmem, gid: int, pid: int, oid: int, index: int, data: bytes) -> None:
    """A put made of the methods ``Tmem._put`` inlines (ample capacity: no decline)."""
    g, pool = t._reg.pool(gid, pid)
    table, contents = t._table, t._contents
    table.take(pool, oid, index)
    if data == ZERO_PAGE:
        table.place(pool, oid, index, ZERO_KEY, 0)
        return
    stored, _poor = contents.pack(data, bool(g.compress))
    key, _hit = contents.reference(data, stored, pool.domain)
    table.place(pool, oid, index, key, len(stored))


def _state(t: Tmem) -> dict[str, Any]:
    c = t._contents
    out: dict[str, Any] = {
        "charged": t._table.charged_bytes,
        "trusted_charged": t._table.trusted_charged,
        "persistent_charged": t._table.persistent_charged,
        "used": c.used_bytes,
        "trusted_used": c.trusted_used,
        "domains": [(d.charged_bytes, d.used_bytes) for d in t._reg.domains.values()],
        "unique": c.unique_pages,
        "refs": dict(c.refs),
        "sizes": dict(c.sizes),
        "store": dict(t.store),  # type: ignore[call-overload]
    }
    for gid, g in t._reg.guests.items():
        out[f"g{gid}"] = (g.persistent_pages, g.account.eph_pages, list(g.account.lru))
        for pid, pool in g.pools.items():
            out[f"g{gid}p{pid}"] = (
                {oid: dict(obj) for oid, obj in pool.objects.items()},
                dict(pool.charges),
                pool.pages,
                pool.zero_pages,
                pool.charged_bytes,
            )
    return out


ops = st.lists(
    st.tuples(
        st.sampled_from((1, 2)),
        st.sampled_from((0, 1)),
        st.integers(0, 3),
        st.integers(0, 3),
        st.integers(0, len(PAGES) - 1),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_inlined_put_equals_take_reference_place(seq: list[tuple[int, int, int, int, int]]) -> None:
    fast, slow = _core(), _core()
    for gid, pid, oid, index, which in seq:
        assert fast.put(gid, pid, oid, index, PAGES[which]) == STATUS_DONE
        _reference_put(slow, gid, pid, oid, index, PAGES[which])
    assert _state(fast) == _state(slow)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, MAX_OID), st.integers(0, MAX_INDEX), st.integers(1, (1 << 24) - 1))
def test_lru_keys_round_trip(oid: int, index: int, ref: int) -> None:
    key = lru_key(lru_tag(ref), oid, index)
    assert lru_ref(key) == ref
    assert lru_handle(key) == (oid, index)
    assert slot_key(oid, index) >> 32 == oid


def test_put_and_get_use_the_keys_module() -> None:
    t = _core()
    _, pool = t._reg.pool(2, 1)  # ephemeral pool of the compressing guest
    oid, index = 3, 7
    assert t.put(2, 1, oid, index, PAGES[2]) == STATUS_DONE
    assert list(pool.account.lru) == [lru_key(pool.lru_tag, oid, index)]  # type: ignore[union-attr]
    assert list(pool.charges) == [slot_key(oid, index)]


def _get_state(t: Tmem) -> dict[str, Any]:
    out = _state(t)
    for gid, g in t._reg.guests.items():
        out[f"g{gid}gets"] = (g.gets, g.get_hits, list(g.recency))
        for pid, pool in g.pools.items():
            out[f"g{gid}p{pid}gets"] = (pool.gets, pool.get_hits)
    return out


@settings(max_examples=100, deadline=None)
@given(ops, st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), max_size=40))
def test_batch_gets_equal_single_gets(
    seq: list[tuple[int, int, int, int, int]], gets: list[tuple[int, int]]
) -> None:
    # PageMoves.batch inlines Tmem._get for hits in a persistent pool (and counts them once)
    fast, slow = _core(), _core()
    for t in (fast, slow):
        for gid, pid, oid, index, which in seq:
            assert t.put(gid, pid, oid, index, PAGES[which]) == STATUS_DONE
    for gid in (1, 2):
        for pid in (0, 1):  # persistent (the inlined path) and ephemeral (exclusive: _get)
            batch = fast.batch(gid, pid, [(OP_GET, oid, index, None) for oid, index in gets])
            single = [slow.get(gid, pid, oid, index) for oid, index in gets]
            assert [page for _, page in batch] == single
            assert [s for s, _ in batch] == [STATUS_DONE if p else STATUS_MISS for p in single]
    assert _get_state(fast) == _get_state(slow)
