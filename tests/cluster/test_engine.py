"""ClusterEngine against the session's real Redis Cluster: the contract's page rules with the
bytes and persistent handle maps in Redis, dedup across engines (standing for brokers),
fencing, adopt/release, and the collector."""

from __future__ import annotations

import os
import time

import pytest

from broker.cluster.collector import Collector
from broker.cluster.errors import Fenced
from broker.cluster.redis_store import IN_REDIS
from schemas.batch import OP_FLUSH_PAGE, OP_GET, OP_PUT, STATUS_DONE, STATUS_MISS, STATUS_QUOTA
from tests.cluster.engines import add_guest, audit, engines, make_engine
from tests.cluster.redis_proc import RedisClusterProc


def page(i: int) -> bytes:
    return (i + 1).to_bytes(8, "big") * 512  # never the zero page


def test_persistent_pages_live_in_redis_and_survive_the_engine(
    redis_cluster: RedisClusterProc, cluster_namespace: str
) -> None:
    with engines(redis_cluster.seeds, cluster_namespace, 2) as (a, b):
        pool = add_guest(a, 1)
        a.adopt(1, 1)
        assert a.put(1, pool, 5, 0, page(1)) == STATUS_DONE
        assert a.put(1, pool, 5, 1, bytes(4096)) == STATUS_DONE  # zero page: no content
        assert a.put(1, pool, 6, 0, page(2)) == STATUS_DONE
        assert a.put(1, pool, 6, 0, page(3)) == STATUS_DONE  # overwrite: page(2) goes
        assert a.get(1, pool, 5, 0) == page(1)
        assert a.get(1, pool, 5, 1) == bytes(4096)
        key = a._reg.pool(1, pool)[1].objects[5][0]
        assert key & IN_REDIS and key not in a.store  # no page bytes in the broker
        aud = audit(a.pages)
        assert aud.consistent and aud.contents == 2 and aud.handles == 2
        # another broker takes the guest: no bytes copied, every page reads back
        add_guest(b, 1)
        b.adopt(1, 2)
        a.release(1)
        assert b.get(1, pool, 5, 0) == page(1)
        assert b.get(1, pool, 6, 0) == page(3)
        assert b.get(1, pool, 5, 1) == bytes(4096)
        assert b.guest_stats(1).persistent_pages == 3
        # the old home is fenced: its late writes are refused
        a.epochs[1] = 1  # as if it had not noticed
        with pytest.raises(Fenced):
            a.put(1, pool, 7, 0, page(4))
        assert a.fenced(1)
        assert not b.fenced(1)
        with pytest.raises(Fenced):  # a lower epoch never takes the guest back
            a.adopt(1, 1)
        assert b.get(1, pool, 7, 0) is None
        assert audit(a.pages).consistent


def test_flushes_and_batches_keep_refcounts_exact(
    redis_cluster: RedisClusterProc, cluster_namespace: str
) -> None:
    with engines(redis_cluster.seeds, cluster_namespace, 1) as (e,):
        pool = add_guest(e, 3)
        e.adopt(3, 1)
        ops = [(OP_PUT, i // 16, i % 16, page(i % 40 + 1)) for i in range(256)]
        res = e.batch(3, pool, ops)
        assert all(s == STATUS_DONE for s, _ in res)
        aud = audit(e.pages)
        assert aud.consistent and aud.contents == 40 and aud.handles == 256
        res = e.batch(
            3, pool, [(OP_GET, 0, 1, None), (OP_FLUSH_PAGE, 0, 1, None), (OP_GET, 0, 1, None)]
        )
        assert res == [(STATUS_DONE, page(2)), (STATUS_DONE, None), (STATUS_MISS, None)]
        assert e.flush_object(3, pool, 1) == 16
        assert e.flush_page(3, pool, 2, 0)
        aud = audit(e.pages)
        assert aud.consistent and aud.handles == 256 - 18
        e.destroy_pool(3, pool)
        aud = audit(e.pages)
        assert aud.consistent and aud.contents == 0 and aud.handles == 0


def test_dedup_across_brokers_and_quota_declines_take_nothing(
    redis_cluster: RedisClusterProc, cluster_namespace: str
) -> None:
    with engines(redis_cluster.seeds, cluster_namespace, 3) as brokers:
        image = [os.urandom(4096) for _ in range(20)]
        for gid, e in enumerate(brokers, start=10):
            pool = add_guest(e, gid)
            e.adopt(gid, 1)
            res = e.batch(gid, pool, [(OP_PUT, 0, i, p) for i, p in enumerate(image)])
            assert all(s == STATUS_DONE for s, _ in res)
        aud = audit(brokers[0].pages)
        assert aud.consistent and aud.contents == 20 and aud.handles == 60
        # another domain never shares
        other = brokers[0]
        pool = add_guest(other, 20, domain="other")
        other.adopt(20, 1)
        assert other.put(20, pool, 0, 0, image[0]) == STATUS_DONE
        assert audit(other.pages).contents == 21
        # a declined put flushes the old copy and leaves no reference behind
        other.update_guest(20, cap_pages=1)
        assert other.put(20, pool, 0, 1, image[1]) == STATUS_QUOTA
        assert other.put(20, pool, 0, 0, image[2]) == STATUS_DONE
        aud = audit(other.pages)
        assert aud.consistent and aud.handles == 61


def test_writes_need_adoption(redis_cluster: RedisClusterProc, cluster_namespace: str) -> None:
    e = make_engine(redis_cluster.seeds, cluster_namespace)
    try:
        pool = add_guest(e, 1)
        with pytest.raises(Fenced):
            e.put(1, pool, 0, 0, page(1))
        eph = e.create_pool(1, "ephemeral")  # ephemeral pages stay local: no fence needed
        assert e.put(1, eph, 0, 0, page(1)) == STATUS_DONE
        assert e.get(1, eph, 0, 0) == page(1)
        assert e.get(1, eph, 0, 0) is None  # exclusive
    finally:
        e.pages.close()


def test_collector_reclaims_leaks_only(
    redis_cluster: RedisClusterProc, cluster_namespace: str
) -> None:
    with engines(redis_cluster.seeds, cluster_namespace, 1) as (e,):
        pool = add_guest(e, 1)
        e.adopt(1, 1)
        for i in range(10):
            assert e.put(1, pool, 0, i, page(i)) == STATUS_DONE
        # leak: references taken by a "crashed" put that never wrote its handle
        cmds = [e.pages.take_cmd(k, page(i)) for i, k in _keys(e, 1, pool)[:4]]
        leaked_new = e.pages.take_cmd(_new_key(e, page(99)), page(99))
        e.pages.run([*cmds, leaked_new], durable=True)
        aud = audit(e.pages)
        assert len(aud.mismatched) == 5
        collector = Collector(e.pages)
        fresh = collector.collect()  # too recent to tell from a put in flight: left alone
        assert fresh.leaked_refs == 0 and fresh.reclaimed_refs == 0
        t = collector.server_time()
        while collector.server_time() <= t + e.pages.grace_s:
            time.sleep(0.1)
        report = collector.collect()
        assert report.reclaimed_refs == 5 and report.deleted_contents == 1
        aud = audit(e.pages)
        assert aud.consistent and aud.contents == 10
        for i in range(10):
            assert e.get(1, pool, 0, i) == page(i)


def _keys(e, gid: int, pool: int) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    obj = e._reg.pool(gid, pool)[1].objects[0]
    return [(i, obj[i] & ~(3 << 160)) for i in sorted(obj)]


def _new_key(e, data: bytes) -> int:  # type: ignore[no-untyped-def]
    from broker.cluster.redis_store import with_tail

    return with_tail(e._contents.hash(data) | IN_REDIS, data)


def test_import_exclusive_gets_and_cluster_figures(
    redis_cluster: RedisClusterProc, cluster_namespace: str
) -> None:
    with engines(redis_cluster.seeds, cluster_namespace, 2) as (a, b):
        a.add_guest(1, name="g1")
        pool = a.create_pool(1, "persistent", exclusive_gets=True)
        a.adopt(1, 1)
        assert a.restore_pages(1, pool, [(0, i, page(i)) for i in range(5)] + [(1, 0, bytes(4096))])
        assert a.get(1, pool, 0, 3) == page(3)
        assert a.get(1, pool, 0, 3) is None  # exclusive: it left, in Redis too
        b.add_guest(1, name="g1")
        b.create_pool(1, "persistent", exclusive_gets=True, pool_id=pool)
        b.adopt(1, 2)
        assert b.get(1, pool, 0, 3) is None
        assert b.get(1, pool, 0, 4) == page(4)
        assert b.get(1, pool, 1, 0) == bytes(4096)
        aud = audit(b.pages)
        assert aud.consistent and aud.handles == 3
        figures = b.cluster_stats()
        assert figures["state"] == "ok" and len(figures["masters"]) == 3
        assert all(m["replicas"] == 1 and m["used_memory"] > 0 for m in figures["masters"])


def test_cluster_unavailable_is_a_retryable_503() -> None:
    from broker.api.errors import error_response
    from broker.cluster.errors import ClusterUnavailable

    response = error_response(ClusterUnavailable("a master is failing over"))
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert b"cluster_unavailable" in bytes(response.body)


def test_open_cluster_engine_and_the_collector_thread(
    redis_cluster: RedisClusterProc, cluster_namespace: str
) -> None:
    from types import SimpleNamespace

    from broker.cluster.collector import CollectorThread
    from broker.cluster.engine import open_cluster_engine

    seeds = ",".join(f"redis://{s}" for s in redis_cluster.seeds[:2])
    settings = SimpleNamespace(
        cluster=seeds, capacity_bytes=1 << 20, cluster_namespace=cluster_namespace
    )
    e = open_cluster_engine(settings, "host:1")
    try:
        assert e.broker_id == "host:1" and e.capacity_bytes == 1 << 20
        pool = add_guest(e, 1)
        e.adopt(1, 1)
        assert e.put(1, pool, 0, 0, page(1)) == STATUS_DONE
        thread = CollectorThread(e.pages, interval=0.1)
        thread.start()
        for _ in range(100):
            if thread.last is not None:
                break
            time.sleep(0.05)
        thread.stop()
        assert thread.last is not None and thread.last.contents == 1
        assert e.get(1, pool, 0, 0) == page(1)
        assert e.pages.socket_timeout == 1.0 and e.pages.down_on_timeout  # wait + 0.5 s
    finally:
        e.pages.close()
    settings.cluster_timeout_ms = 2500  # type: ignore[attr-defined]
    e = open_cluster_engine(settings, "host:1")
    try:
        assert e.pages.socket_timeout == 2.5
    finally:
        e.pages.close()


def test_stats_report_the_redis_contents_each_broker_references(
    redis_cluster: RedisClusterProc, cluster_namespace: str
) -> None:
    """``unique_pages`` (and so ``dedup_ratio``) count the Redis contents a broker's handles
    reference, kept on every put, flush, release and adopt (never by scanning Redis)."""
    with engines(redis_cluster.seeds, cluster_namespace, 2) as (a, b):
        pools = {gid: add_guest(a, gid) for gid in (1, 2)}
        for gid in pools:
            a.adopt(gid, 1)
        for gid, pool in pools.items():  # both guests hold page(1); guest 2 also page(2)
            assert a.put(gid, pool, 1, 0, page(1)) == STATUS_DONE
            assert a.put(gid, pool, 1, 1, page(1)) == STATUS_DONE
        assert a.put(2, pools[2], 1, 2, page(2)) == STATUS_DONE
        assert a.put(2, pools[2], 1, 3, bytes(4096)) == STATUS_DONE  # zero: no content
        s = a.stats()
        assert (s.unique_pages, s.logical_pages, s.zero_pages) == (2, 6, 1)
        assert s.dedup_ratio == 2.5  # (6 - 1) non-zero pages over 2 contents
        assert s.used_bytes == 2 * 4096 and s.compression_ratio == 1.0
        assert audit(a.pages).contents == 2
        # a flush of the last handle of a content: it leaves this broker's count
        assert a.flush_page(2, pools[2], 1, 2)
        assert a.stats().unique_pages == 1
        # guest 2 moves to b: each broker counts what its own guests reference
        add_guest(b, 2)
        b.adopt(2, 2)
        a.release(2)
        assert a.stats().unique_pages == 1 and b.stats().unique_pages == 1
        assert a.count_contents() == b.count_contents() == 1  # the pool's figure: once
        assert b.stats().logical_pages == 3
        assert b.flush_object(2, pools[2], 1) == 3
        assert b.stats().unique_pages == 0
        assert a.stats().unique_pages == 1
        assert audit(a.pages).consistent
        assert a.flush_object(1, pools[1], 1) == 2
        assert a.count_contents() == 0 and audit(a.pages).consistent


@pytest.mark.timeout(120)
def test_references_taken_long_before_their_handles_are_taken_again(
    redis_cluster: RedisClusterProc, cluster_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put whose references were taken long before its handles could be written (a slow
    cluster: the per-master pipelines of one call run one after another, each held by the
    masters' fsyncs under load) is acknowledged, not refused: the engine takes the aged
    references again before writing the handles. Before, ``lua.HANDLE`` refused every take
    older than G/2 (code -2) and the put was a 503 ``the cluster answered too slowly`` (the
    unexplained 503 of section h). The old references are dropped, or left to the collector
    when their drop comes too late: never a handle pointing at nothing."""
    with engines(redis_cluster.seeds, cluster_namespace, 1) as (e,):  # G = 4 s
        pool = add_guest(e, 1)
        e.adopt(1, 1)
        run = e.pages.run
        take = e.pages.sha["take"]
        delayed: list[int] = []

        def slow(cmds, *, durable):  # type: ignore[no-untyped-def]
            run(cmds, durable=durable)
            if not delayed and any(c.args[1] == take for c in cmds):
                delayed.append(len(cmds))
                time.sleep(3.2)  # the takes answered; the rest of the call is late: > G/2

        monkeypatch.setattr(e.pages, "run", slow)
        ops = [(OP_PUT, 1, i, page(i)) for i in range(64)]
        # a content at two handles, and a handle put twice (its first reference released)
        ops += [(OP_PUT, 2, 0, page(1)), (OP_PUT, 2, 1, page(1)), (OP_PUT, 2, 1, page(2))]
        assert [s for s, _ in e.batch(1, pool, ops)] == [STATUS_DONE] * 67
        assert delayed == [67]
        monkeypatch.undo()
        got = e.batch(1, pool, [(OP_GET, 1, i, None) for i in range(64)])
        assert got == [(STATUS_DONE, page(i)) for i in range(64)]
        assert e.get(1, pool, 2, 0) == page(1) and e.get(1, pool, 2, 1) == page(2)
        aud = audit(e.pages)
        assert not aud.dangling and aud.handles == 66 and aud.contents == 64
        for _ in range(20):  # the old references whose drops came too late: the collector
            Collector(e.pages).collect()  # takes them once their last change is G/2 old
            aud = audit(e.pages)
            if aud.consistent:
                break
            time.sleep(0.5)
        assert aud.consistent and aud.contents == 64 and aud.handles == 66
