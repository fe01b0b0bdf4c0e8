"""The collector running beside live puts and flushes on shared contents: it takes only
leaked references (injected here as a crashed put's takes), never one a handle needs."""

from __future__ import annotations

import random
import threading
import time

import pytest

from broker.cluster.collector import Collector, CollectReport
from broker.cluster.errors import ClusterUnavailable
from broker.cluster.redis_store import IN_REDIS, RedisPages, with_tail
from schemas.batch import OP_FLUSH_PAGE, OP_PUT, STATUS_DONE
from tests.cluster.engines import add_guest, audit, make_engine
from tests.cluster.redis_proc import RedisClusterProc

CONTENTS = [bytes([i + 1]) * 4096 for i in range(12)]  # few contents: heavy sharing


@pytest.mark.timeout(120)
def test_collector_beside_live_traffic(
    redis_cluster: RedisClusterProc, cluster_namespace: str
) -> None:
    e = make_engine(redis_cluster.seeds, cluster_namespace, grace_s=4)
    col_pages = RedisPages(redis_cluster.seeds, cluster_namespace, grace_s=4)
    reports: list[CollectReport] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def collect() -> None:
        try:
            collector = Collector(col_pages, sleep=lambda s: time.sleep(min(s, 0.05)))
            while not stop.is_set():
                reports.append(collector.collect())
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    try:
        pool = add_guest(e, 1)
        e.adopt(1, 1)
        acked: dict[tuple[int, int], bytes] = {}
        rng = random.Random(7)
        worker = threading.Thread(target=collect)
        worker.start()
        deadline = time.monotonic() + 12
        leaked = unavailable = 0
        while time.monotonic() < deadline:
            ops = []
            for _ in range(24):
                handle = (rng.randrange(4), rng.randrange(40))
                if rng.random() < 0.25:
                    ops.append((OP_FLUSH_PAGE, *handle, None))
                else:
                    ops.append((OP_PUT, *handle, rng.choice(CONTENTS)))
            try:
                res = e.batch(1, pool, ops)
            except ClusterUnavailable:
                unavailable += 1  # a slow moment on a loaded machine: nothing acknowledged,
                continue  # its references leak for the collector too
            for (op, oid, index, data), (status, _p) in zip(ops, res, strict=True):
                if op == OP_PUT:
                    assert status == STATUS_DONE
                    acked[(oid, index)] = data  # type: ignore[assignment]
                else:
                    acked.pop((oid, index), None)
            # a crashed put: a reference taken, its handle never written
            data = rng.choice(CONTENTS)
            key = with_tail(e._contents.hash(data) | IN_REDIS, data)
            e.pages.run([e.pages.take_cmd(key, data)], durable=True)
            leaked += 1
        stop.set()
        worker.join()
        assert not errors, errors
        for (oid, index), data in acked.items():
            assert e.get(1, pool, oid, index) == data
        # quiet now: one run after the grace takes every leak that is left
        collector = Collector(col_pages)
        t = collector.server_time()
        while collector.server_time() <= t + 4:
            time.sleep(0.1)
        last = collector.collect()
        reclaimed = sum(r.reclaimed_refs for r in reports) + last.reclaimed_refs
        assert reclaimed == leaked if not unavailable else reclaimed >= leaked
        aud = audit(e.pages)
        assert aud.consistent, aud
        assert aud.handles == len(acked)
    finally:
        stop.set()
        e.pages.close()
        col_pages.close()
