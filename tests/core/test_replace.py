"""The replacing put's short way (:mod:`broker.core.replace`) leaves the core as the general
path does, and a replace as a flush followed by a put does.

Each test drives two cores through the same operations: one as it is, one whose short way is
switched off (every replace then takes the general path: drop, then place), or one that
flushes the handle before each put. Everything the core keeps is compared, in order where
order means something (recency, LRUs, objects), with every counter and the journal.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core import CoreConfig, Tmem
from broker.core.content import xxh3_128
from broker.core.pressure import PressureSettings
from broker.core.registry import Guest
from schemas.batch import STATUS_DONE
from tests.core.conftest import SHARED_UUID, RecordingJournal

pytestmark = pytest.mark.timeout(300)

_NOISE = os.urandom(4096)
PAGES = [
    bytes(4096),  # the zero page
    _NOISE,  # incompressible
    b"\x07" * 4096,  # compresses well
    bytes(range(256)) * 16,  # compresses well, another content
    _NOISE[:2048] + bytes(2048),  # half compressible
    # more contents, so that most puts store a content no other handle has (what the short
    # way serves): incompressible, compressible, half compressible
    *(os.urandom(4096) for _ in range(12)),
    *(bytes([tag]) * 8 + bytes(4088) for tag in range(1, 7)),
    *(os.urandom(2048) + bytes(2048) for _ in range(4)),
]

# (guest, pool id): 1 plain, untrusted domain "a": persistent 0, ephemeral 1, shared 2;
# 2 compresses always, domain "a"; 3 compresses under pressure, trusted domain "t";
# 4 plain, domain "t", quota of 6 pages, shares pool 2 with guest 1
POOLS = [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (3, 0), (3, 1), (4, 0), (4, 1), (4, 2)]


def _few(page: bytes) -> int:
    """A hasher under which contents collide (only the byte compare keeps them apart)."""
    return page[0] & 1


def _core(
    capacity_pages: int,
    pressure: bool,
    no_short_way: bool,
    collide: bool = False,
    policy: str = "lru",
) -> Tmem:
    t = Tmem(
        CoreConfig(capacity_bytes=capacity_pages * 4096, ephemeral_policy=policy),
        journal=RecordingJournal(),
        salt=1,  # both cores' TinyLFU sketches hash alike
        hasher=_few if collide else xxh3_128,
    )
    if no_short_way:
        t._replace = lambda *args: False  # type: ignore[method-assign]
    t.add_guest(1, name="one", dedup_domain="a")
    t.add_guest(2, name="two", dedup_domain="a", compress=True)
    t.add_guest(3, name="three", dedup_domain="t")
    t.add_guest(4, name="four", dedup_domain="t", cap_pages=6)
    t.set_domain("t", trusted=True, compress="pressure")
    t.update_guest(4, compress=False)
    for gid in (1, 2, 3, 4):
        t.create_pool(gid, "persistent")
        t.create_pool(gid, "ephemeral")
    for gid in (1, 4):
        t.authorise_shared(SHARED_UUID, gid, True)
        assert t.create_pool(gid, "ephemeral", shared=True, uuid=SHARED_UUID) == 2
    if pressure:
        t.configure_pressure(
            PressureSettings(high_watermark=0.8, low_watermark=0.6, ephemeral_policy=policy)
        )
    return t


def _ops(x: Any) -> tuple[int, ...]:
    return (
        x.puts, x.declined_quota, x.declined_capacity, x.declined_frozen, x.declined_policy,
        x.gets, x.get_hits, x.evictions, x.compress_poor, x.dedup_hits,
    )  # fmt: skip


def _state(t: Tmem) -> dict[str, Any]:
    c, table = t._contents, t._table
    out: dict[str, Any] = {
        "table": (table.charged_bytes, table.trusted_charged, table.persistent_charged),
        "contents": (c.used_bytes, c.trusted_used, c.unique_pages),
        "refs": sorted(c.refs.items()),
        "sizes": sorted(c.sizes.items()),
        "collided": sorted(c.collided.items()),
        "store": sorted(t.store.items()),  # type: ignore[attr-defined]
        "domains": [(d.name, d.charged_bytes, d.used_bytes) for d in t._reg.domains.values()],
        "journal": t._journal.calls,  # type: ignore[union-attr]
        "admission": (t._adm.low_hit_rate, t._adm.predicted_useless, t._adm.poor_compression),
        "eviction": (t._ev.reclaiming, t._ev.reclaim_above, t._ev.capacity),
    }
    accounts = {}
    for gid, g in t._reg.guests.items():
        out[f"g{gid}"] = (_ops(g), g.persistent_pages, list(g.recency), g.evicted_unreported)
        out[f"g{gid}policy"] = (
            g.policy_low_hit_rate, g.policy_predicted_useless, g.policy_poor_compression,
            g.gate.puts, g.gate.hits, g.gate.credit,
        )  # fmt: skip
        accounts[id(g.account)] = g.account
        for pid, pool in g.pools.items():
            if pool.account is not None:
                accounts[id(pool.account)] = pool.account
            out[f"g{gid}p{pid}"] = (
                _ops(pool),
                [(oid, list(obj.items())) for oid, obj in pool.objects.items()],
                sorted(pool.charges.items()),
                pool.pages,
                pool.zero_pages,
                pool.charged_bytes,
            )
    out["accounts"] = sorted(
        (a.eph_pages, list(a.lru), list(a.main) if a.main is not a.lru else None)
        for a in accounts.values()
    )
    return out


def _without_flushes(state: dict[str, Any]) -> dict[str, Any]:
    """A state minus what only a flush leaves: its journal records (the flush counters are
    not in the state at all)."""
    return {**state, "journal": [c for c in state["journal"] if c[0] != "flush"]}


HANDLE = st.integers(0, 1)
WHICH = st.integers(0, len(PAGES) - 1)
op = st.one_of(
    # puts (four in six ops), mostly over a handle used before (2 x 2 handles per pool)
    *[st.tuples(st.just("put"), st.sampled_from(POOLS), HANDLE, HANDLE, WHICH)] * 4,
    st.tuples(st.just("get"), st.sampled_from(POOLS), st.integers(0, 1), st.integers(0, 1)),
    st.tuples(st.just("flush"), st.sampled_from(POOLS), st.integers(0, 1), st.integers(0, 1)),
    st.tuples(st.just("freeze"), st.sampled_from((1, 2, 3, 4)), st.booleans()),
    st.tuples(st.just("cap"), st.sampled_from((1, 4)), st.none() | st.integers(0, 8)),
)


def _apply(t: Tmem, o: tuple[Any, ...]) -> object:
    if o[0] == "put":
        (gid, pid), oid, index, which = o[1:]
        return t.put(gid, pid, oid, index, PAGES[which])
    if o[0] == "get":
        (gid, pid), oid, index = o[1:]
        return t.get(gid, pid, oid, index)
    if o[0] == "flush":
        (gid, pid), oid, index = o[1:]
        return t.flush_page(gid, pid, oid, index)
    if o[0] == "capacity":
        t.capacity_bytes = o[1] * 4096
        return None
    if o[0] == "cap":  # a lower cap leaves the guest above it
        t.update_guest(o[1], cap_pages=o[2])
        return None
    (t.freeze if o[2] else t.thaw)(o[1])
    return None


@settings(max_examples=500, deadline=None)
@given(
    st.lists(op, min_size=10, max_size=150),
    st.sampled_from((8, 10, 14, 20, 200)),  # pages of capacity: declines, evictions, or room
    st.booleans(),  # the pressure settings (watermarks, admission) in force
    st.booleans(),  # contents collide (a hasher with two values)
)
def test_short_way_equals_the_general_path(
    seq: list[tuple[Any, ...]], capacity_pages: int, pressure: bool, collide: bool
) -> None:
    short = _core(capacity_pages, pressure, False, collide)
    general = _core(capacity_pages, pressure, True, collide)
    for o in seq:
        assert _apply(short, o) == _apply(general, o), o
    assert _state(short) == _state(general)


def _random_op(r: random.Random) -> tuple[Any, ...]:
    roll = r.random()
    pool, oid, index = r.choice(POOLS), r.randrange(3), r.randrange(3)
    if roll < 0.75:
        return ("put", pool, oid, index, r.randrange(len(PAGES)))
    if roll < 0.88:
        return ("get", pool, oid, index)
    if roll < 0.96:
        return ("flush", pool, oid, index)
    if roll < 0.975:
        return ("cap", r.choice((1, 4)), r.choice((None, 2, 4, 6, 8)))
    if roll < 0.98:  # a lower capacity may leave persistent pages above it
        return ("capacity", r.choice((4, 8, 12, 24, 200)))
    return ("freeze", r.choice((1, 2, 3, 4)), r.random() < 0.3)


@pytest.mark.parametrize("seed", range(40))
def test_long_walks_equal_the_general_path(seed: int) -> None:
    """Long seeded walks (hypothesis draws short sequences, where few puts replace): full
    and nearly full brokers, with and without watermarks, colliding digests, LRU and TinyLFU
    accounts; the two cores
    compared every 100 operations."""
    r = random.Random(seed)
    capacity_pages, pressure, collide = r.choice((8, 12, 16, 24, 200)), seed % 2 == 0, seed % 5 == 0
    policy = "tinylfu" if seed % 3 == 1 else "lru"
    short = _core(capacity_pages, pressure, False, collide, policy)
    general = _core(capacity_pages, pressure, True, collide, policy)
    for step in range(1500):
        o = _random_op(r)
        assert _apply(short, o) == _apply(general, o), (step, o)
        if step % 100 == 99:
            assert _state(short) == _state(general), step
    assert _state(short) == _state(general)


@pytest.mark.parametrize("gid,pid", [(g, p) for g, p in POOLS if p != 2] + [(1, 2)])
@pytest.mark.parametrize("old", range(6))
@pytest.mark.parametrize("new", range(6))
@pytest.mark.parametrize("shared_old", [False, True])
def test_replace_equals_flush_then_put(
    gid: int, pid: int, old: int, new: int, shared_old: bool
) -> None:
    """Every pair of (old, new) content: same content, zero pages, compressed ones, an old
    content another handle refers to too (``shared_old``: dedup'd), a new one stored already."""
    cores = [_core(200, False, False) for _ in range(2)]
    for t in cores:
        t.put(gid, pid, 0, 0, PAGES[old])
        if shared_old:
            t.put(gid, pid, 1, 5, PAGES[old])
        t.put(gid, pid, 2, 0, PAGES[3])  # a content of the pool's own, another handle
    replaced, flushed = cores
    flushed.flush_page(gid, pid, 0, 0)
    assert replaced.put(gid, pid, 0, 0, PAGES[new]) == STATUS_DONE
    assert flushed.put(gid, pid, 0, 0, PAGES[new]) == STATUS_DONE
    assert _without_flushes(_state(replaced)) == _without_flushes(_state(flushed))
    assert replaced.get(gid, pid, 0, 0) == PAGES[new]


def test_a_swap_write_takes_the_short_way() -> None:
    """What the NBD exports do most (a new content over a page of its own, in a persistent
    pool) is what the short way serves; the tests above would pass without it."""
    t = _core(200, False, False)
    taken = []
    short = t._replace

    def spy(g: Guest, *args: Any) -> bool:
        taken.append(short(g, *args))
        return taken[-1]

    t._replace = spy  # type: ignore[method-assign,assignment]
    t.put(1, 0, 0, 0, PAGES[1])
    t.put(1, 0, 0, 0, PAGES[2])  # a new content
    t.put(1, 0, 0, 0, PAGES[2])  # the same bytes again
    t.put(1, 0, 0, 0, PAGES[0])  # zeros: the general path
    assert taken == [True, True, False]
    assert t.get(1, 0, 0, 0) == PAGES[0]
    assert t._journal.calls[-1][0] == "put"  # type: ignore[union-attr]
