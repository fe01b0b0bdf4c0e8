"""Random operation sequences from several guests, checked step by step against a plain model.

Contents come from a five-page alphabet (zero, two compressible, two incompressible) so dedup,
zero pages and compression happen all the time; the capacity is a few pages so eviction and
capacity declines do too. The model (tests/core/reference.py) keeps LRU order and the
weight-fair victim choice exactly, so every answer is deterministic and checked: statuses,
page bytes, flush results, pool ids, every global, per-guest and per-pool figure, and the
capacity invariant. A second machine runs with a hash under which every page collides, to
prove sharing never rests on the digest alone.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from broker.core import CoreConfig, Tmem
from broker.core.content import xxh3_128
from broker.core.errors import NotAuthorised, TooManyPools, UnknownPool
from broker.core.figures import as_json
from schemas.batch import STATUS_NAMES
from tests.core.reference import PAGE, ZERO, Model

UUID = "0f8fad5b-d9cb-469f-a165-70867728950e"
_rng = random.Random(1234)
PAGES = [ZERO, b"a" * PAGE, b"ab" * (PAGE // 2), _rng.randbytes(PAGE), _rng.randbytes(PAGE)]
GUESTS = {  # gid: (weight, compress, dedup domain)
    1: (100, False, "default"),
    2: (300, True, "default"),
    3: (100, False, "other"),
}
MAX_POOLS = 3
START_POOLS = {  # gid: [(kind, shared, exclusive_gets)]
    1: [("persistent", False, False), ("ephemeral", False, False), ("ephemeral", True, False)],
    2: [("ephemeral", False, False), ("persistent", False, True), ("ephemeral", True, False)],
    3: [("ephemeral", False, False), ("persistent", False, False)],
}

guests = st.sampled_from(sorted(GUESTS))
pids = st.integers(0, MAX_POOLS - 1) | st.just(MAX_POOLS)  # MAX_POOLS is never a pool
oids = st.integers(0, 1)
indexes = st.integers(0, 1)
contents = st.integers(0, len(PAGES) - 1)


class TmemMachine(RuleBasedStateMachine):
    hasher = staticmethod(xxh3_128)

    def __init__(self) -> None:
        super().__init__()
        capacity = 4 * PAGE
        self.core = Tmem(
            CoreConfig(capacity_bytes=capacity, max_pools_per_guest=MAX_POOLS),
            hasher=self.hasher,
        )
        self.model = Model(capacity, MAX_POOLS, int(0.75 * PAGE))
        for gid in GUESTS:
            self._add(gid)
        self.core.update_guest(3, cap_pages=2)
        self.model.guests[3].cap = 2

    def _add(self, gid: int) -> None:
        weight, compress, domain = GUESTS[gid]
        self.core.add_guest(
            gid, name=f"g{gid}", weight=weight, compress=compress, dedup_domain=domain
        )
        self.model.add_guest(gid, weight, compress, domain)
        # start with pools in place so that most page operations land somewhere
        for kind, shared, excl in START_POOLS[gid]:
            if shared:
                self.core.authorise_shared(UUID, gid, True)
                self.model.auth.add((UUID, gid))
            uuid = UUID if shared else None
            pid = self.core.create_pool(gid, kind, shared=shared, uuid=uuid, exclusive_gets=excl)
            assert pid == self.model.create_pool(gid, kind, shared, uuid, excl)

    def _known(self, gid: int, pid: int) -> bool:
        return pid in self.model.guests[gid].pools

    # ---------------------------------------------------------------- guests and pools

    @rule(
        gid=guests, kind=st.sampled_from(["persistent", "ephemeral", "shared"]), excl=st.booleans()
    )
    def create_pool(self, gid: int, kind: str, excl: bool) -> None:
        shared = kind == "shared"
        real_kind = "ephemeral" if shared else kind
        uuid = UUID if shared else None
        excl = excl and kind == "persistent"
        expected = self.model.create_pool(gid, real_kind, shared, uuid, excl)
        got: int | str
        try:
            got = self.core.create_pool(
                gid, real_kind, shared=shared, uuid=uuid, exclusive_gets=excl
            )
        except NotAuthorised:
            got = "not_authorised"
        except TooManyPools:
            got = "too_many_pools"
        assert got == expected

    @rule(gid=guests, pid=pids)
    def destroy_pool(self, gid: int, pid: int) -> None:
        self.model.destroy_pool(gid, pid)
        self.core.destroy_pool(gid, pid)

    @rule(gid=guests, allow=st.booleans())
    def authorise(self, gid: int, allow: bool) -> None:
        self.core.authorise_shared(UUID, gid, allow)
        if allow:
            self.model.auth.add((UUID, gid))
        else:
            self.model.auth.discard((UUID, gid))

    @rule(gid=guests, frozen=st.booleans())
    def freeze(self, gid: int, frozen: bool) -> None:
        (self.core.freeze if frozen else self.core.thaw)(gid)
        self.model.guests[gid].frozen = frozen

    @rule(gid=guests, cap=st.one_of(st.none(), st.integers(0, 3)))
    def set_cap(self, gid: int, cap: int | None) -> None:
        self.core.update_guest(gid, cap_pages=cap)
        self.model.guests[gid].cap = cap

    @rule(gid=guests, weight=st.sampled_from([1, 50, 100, 300]))
    def set_weight(self, gid: int, weight: int) -> None:
        self.core.update_guest(gid, weight=weight)
        g = self.model.guests[gid]
        g.weight = weight
        g.account.weight = weight
        for pool in g.pools.values():
            if pool.shared:
                self.model.reweigh(pool)

    @rule(gid=guests)
    def remove_and_add_again(self, gid: int) -> None:
        self.core.remove_guest(gid)
        self.model.remove_guest(gid)
        self._add(gid)

    @rule(gid=guests)
    def flush_guest(self, gid: int) -> None:
        assert self.core.flush_guest(gid) == self.model.flush_guest(gid)

    @rule(capacity=st.sampled_from([0, PAGE, 3 * PAGE + 100, 4 * PAGE, 8 * PAGE, 16 * PAGE]))
    def set_capacity(self, capacity: int) -> None:
        self.core.capacity_bytes = capacity
        self.model.set_capacity(capacity)

    @rule(nbytes=st.sampled_from([0, 1, PAGE, 3 * PAGE]))
    def evict(self, nbytes: int) -> None:
        assert self.core.evict(nbytes) == self.model.evict(nbytes)

    # ---------------------------------------------------------------- pages

    def _put(self, gid: int, pid: int, oid: int, index: int, content: int) -> None:
        page = PAGES[content]
        if not self._known(gid, pid):
            with pytest.raises(UnknownPool):
                self.core.put(gid, pid, oid, index, page)
            return
        expected = self.model.put(gid, pid, oid, index, page)
        assert STATUS_NAMES[self.core.put(gid, pid, oid, index, page)] == expected

    def _get(self, gid: int, pid: int, oid: int, index: int) -> None:
        if not self._known(gid, pid):
            with pytest.raises(UnknownPool):
                self.core.get(gid, pid, oid, index)
            return
        assert self.core.get(gid, pid, oid, index) == self.model.get(gid, pid, oid, index)

    @rule(gid=guests, pid=pids, oid=oids, index=indexes)
    def flush_page(self, gid: int, pid: int, oid: int, index: int) -> None:
        if not self._known(gid, pid):
            return
        got = self.core.flush_page(gid, pid, oid, index)
        assert got == self.model.flush_page(gid, pid, oid, index)

    @rule(gid=guests, pid=pids, oid=oids)
    def flush_object(self, gid: int, pid: int, oid: int) -> None:
        if not self._known(gid, pid):
            return
        assert self.core.flush_object(gid, pid, oid) == self.model.flush_object(gid, pid, oid)

    # page operations are most of what guests do: three put rules and two get rules give them
    # more weight in the draw
    @rule(gid=guests, pid=pids, oid=oids, index=indexes, content=contents)
    def put(self, gid: int, pid: int, oid: int, index: int, content: int) -> None:
        self._put(gid, pid, oid, index, content)

    @rule(gid=guests, pid=pids, oid=oids, index=indexes, content=contents)
    def put_more(self, gid: int, pid: int, oid: int, index: int, content: int) -> None:
        self._put(gid, pid, oid, index, content)

    @rule(gid=guests, pid=pids, oid=oids, index=indexes, content=contents)
    def put_again(self, gid: int, pid: int, oid: int, index: int, content: int) -> None:
        self._put(gid, pid, oid, index, content)

    @rule(gid=guests, pid=pids, oid=oids, index=indexes)
    def get(self, gid: int, pid: int, oid: int, index: int) -> None:
        self._get(gid, pid, oid, index)

    @rule(gid=guests, pid=pids)
    def get_every_handle(self, gid: int, pid: int) -> None:
        for oid in (0, 1):
            for index in (0, 1):
                self._get(gid, pid, oid, index)

    # ---------------------------------------------------------------- checks

    @invariant()
    def figures_match(self) -> None:
        got = as_json(self.core.stats())
        for key, value in self.model.stats().items():
            assert got[key] == value, key
        by_guest = {entry["guest_id"]: entry for entry in got["guests"]}
        for gid, g in self.model.guests.items():
            expected = self.model.guest_figures(g)
            admin = by_guest[gid]
            for key, value in expected.items():
                assert admin[key] == value, (gid, key)
            own = as_json(self.core.guest_stats(gid))
            assert "dedup_hits" not in own
            assert own == {k: v for k, v in admin.items() if k != "dedup_hits"}
            views = {v.pool_id: v for v in self.core.pools(gid)}
            assert set(views) == set(g.pools)
            for pid, pool in g.pools.items():
                assert views[pid].pages == len(pool.pages)
                assert views[pid].shared == pool.shared
                assert views[pid].kind == ("persistent" if pool.persistent else "ephemeral")

    @invariant()
    def capacity_holds(self) -> None:
        stats = self.core.stats()
        assert stats.used_bytes == self.core.used_bytes
        # a stored copy is never larger than any page's charge for it (no trusted domain)
        assert self.core.used_bytes <= self.core.charged_bytes
        # over capacity only when no ephemeral page is left to evict (persistent pages alone)
        assert self.core.used_bytes <= self.core.capacity_bytes or stats.ephemeral_pages == 0


class CollidingMachine(TmemMachine):
    """Every page has the same digest: only the byte compare keeps contents apart."""

    hasher = staticmethod(lambda page: 7)


_settings = settings(
    max_examples=150,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestTmemMachine = pytest.mark.timeout(170)(TmemMachine.TestCase)
TestTmemMachine.settings = _settings
TestCollidingMachine = pytest.mark.timeout(170)(CollidingMachine.TestCase)
TestCollidingMachine.settings = _settings


def _walk_step(m: TmemMachine, r: random.Random) -> None:
    gid = r.choice(sorted(GUESTS))
    pid = r.randrange(MAX_POOLS + 1)
    oid, index = r.randrange(2), r.randrange(2)
    roll = r.random()
    if roll < 0.40:
        m._put(gid, pid, oid, index, r.randrange(len(PAGES)))
    elif roll < 0.70:
        m._get(gid, pid, oid, index)
    elif roll < 0.76:
        m.flush_page(gid, pid, oid, index)
    elif roll < 0.79:
        m.flush_object(gid, pid, oid)
    elif roll < 0.81:
        m.create_pool(gid, r.choice(["persistent", "ephemeral", "shared"]), r.random() < 0.3)
    elif roll < 0.82:
        m.destroy_pool(gid, pid)
    elif roll < 0.84:
        m.freeze(gid, r.random() < 0.3)
    elif roll < 0.86:
        m.set_cap(gid, r.choice([None, None, 0, 1, 2, 3]))
    elif roll < 0.88:
        m.set_weight(gid, r.choice([1, 50, 100, 300]))
    elif roll < 0.90:
        m.authorise(gid, r.random() < 0.7)
    elif roll < 0.93:
        m.set_capacity(r.choice([PAGE, 3 * PAGE + 100, 4 * PAGE, 8 * PAGE, 16 * PAGE]))
    elif roll < 0.96:
        m.evict(r.choice([1, PAGE, 3 * PAGE]))
    elif roll < 0.98:
        m.flush_guest(gid)
    else:
        m.remove_and_add_again(gid)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("machine", [TmemMachine, CollidingMachine], ids=["xxh3", "colliding"])
@pytest.mark.parametrize("seed", range(3))
def test_long_random_walk(machine: type[TmemMachine], seed: int) -> None:
    """Long seeded walks reach deep states (full pools, many evictions, shared-pool LRU
    touches) that Hypothesis's short runs seldom do; every step is checked the same way."""
    m = machine()
    r = random.Random(seed)
    for _ in range(2000):
        _walk_step(m, r)
        m.figures_match()
        m.capacity_holds()
    ops = m.core.stats().ops
    # the walk must have exercised what it claims to
    assert ops.get_hits > 25 and ops.evictions > 50 and (ops.dedup_hits or 0) > 20
    assert ops.compress_poor > 0 and ops.puts_declined.capacity > 0
