"""A full cluster (maxmemory reached: Redis answers OOM) declines puts with ``capacity`` —
never an error — and the pages already stored stay readable; room made by flushes is used."""

from __future__ import annotations

import os

import pytest

from schemas.batch import OP_PUT, STATUS_CAPACITY, STATUS_DONE
from tests.cluster.conftest import RedisClusterFactory
from tests.cluster.engines import add_guest, audit, make_engine

pytestmark = pytest.mark.timeout(240)


def test_a_full_cluster_declines_with_capacity(make_redis_cluster: RedisClusterFactory) -> None:
    proc = make_redis_cluster(masters=3, replicas=1, maxmemory="4mb")
    e = make_engine(proc.seeds, "full")
    try:
        pool = add_guest(e, 1)
        e.adopt(1, 1)
        stored: dict[tuple[int, int], bytes] = {}
        declined = 0
        for oid in range(200):
            ops = [(OP_PUT, oid, i, os.urandom(4096)) for i in range(32)]
            res = e.batch(1, pool, ops)
            for (_op, o, i, data), (status, _page) in zip(ops, res, strict=True):
                assert status in (STATUS_DONE, STATUS_CAPACITY)
                if status == STATUS_DONE:
                    stored[(o, i)] = data
                else:
                    declined += 1
            if declined > 64:
                break
        assert declined > 64 and len(stored) > 100
        for (o, i), data in stored.items():
            assert e.get(1, pool, o, i) == data
        assert e.guest_stats(1).ops.puts_declined.capacity == declined
        aud = audit(e.pages)
        assert aud.consistent
        # flushing makes room again
        for o in {o for o, _i in stored}:
            e.flush_object(1, pool, o)
        assert e.put(1, pool, 0, 0, os.urandom(4096)) == STATUS_DONE
        aud = audit(e.pages)
        assert aud.consistent and aud.handles == 1
    finally:
        e.pages.close()
