"""A hung Redis master (``SIGSTOP``) against the data plane, and the cost of noticing it sooner.

``python -m bench.scale_hang [--load-s S]``: two measures, each for the current policy (socket
timeout ``cluster_wait_ms`` + 2 s, a timed-out node retried) and for a shorter per-call socket
timeout that marks the node down as a refused connection does (``RedisPages(socket_timeout=,
down_on_timeout=True)``):

a. hung: one guest on a ``ClusterEngine`` (what a broker's event loop runs), one call after
   another (a get of 16 pages, then a put of 16 new pages), a steady phase, then ``SIGSTOP``
   of a master that does not hold the guest's handle map (its contents are spread over every
   master), until its replica is promoted, then ``SIGCONT``. Reported: the longest call (the
   time the broker's loop is held), the time calls spent past 0.2 s, failed calls, and the
   time from the stop to the promotion.
b. false: 256-page durable batches (the bench's ``put_many``) for ``--load-s`` seconds on a
   healthy cluster: pipelines that timed out and calls that failed. Run it at the load the
   question is about (``uptime``).

Not a test: it never fails on a time.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.cluster.engine import ClusterEngine
from broker.cluster.errors import ClusterUnavailable
from broker.cluster.redis_store import RedisPages
from broker.core.model import CoreConfig
from schemas.batch import OP_GET, OP_PUT
from scripts.redis_proc import RedisClusterProc, start_cluster

POLICIES: dict[str, dict[str, Any]] = {
    "retry 2.5 s": {"socket_timeout": 2.5, "down_on_timeout": False},  # before
    "down at 1.0 s": {},  # the default now: cluster_wait_ms + 0.5 s, marked down
}


def _page(n: int) -> bytes:
    return (n + 1).to_bytes(8, "big") * 512


def _engine(rc: RedisClusterProc, **kw: Any) -> tuple[ClusterEngine, int]:
    pages = RedisPages(rc.seeds, f"h{secrets.token_hex(4)}", **kw)
    engine = ClusterEngine(CoreConfig(capacity_bytes=1 << 30), pages, "b1")
    engine.add_guest(1, name="g1")
    pool = engine.create_pool(1, "persistent")
    engine.adopt(1, 1)
    return engine, pool


def _timed(fn: Callable[[], Any]) -> tuple[float, bool]:
    t0 = time.perf_counter()
    try:
        fn()
        ok = True
    except ClusterUnavailable:
        ok = False
    return time.perf_counter() - t0, ok


def hung(tmp: Path, steady_s: float = 2.0, **kw: Any) -> dict[str, Any]:
    rc = start_cluster(tmp)
    try:
        e, pool = _engine(rc, **kw)
        e.batch(1, pool, [(OP_PUT, 1, i, _page(i)) for i in range(512)])
        guest_master = rc.master_for_key(e.pages.epoch_key(1))
        victim = next(p for p in rc.master_ports() if p != guest_master)
        replica = rc.replica_of(victim)
        n = 512
        calls: list[tuple[float, float, bool]] = []  # (start after the stop, latency, ok)

        def step(i: int) -> None:
            nonlocal n
            gets = [(OP_GET, 1, (i * 16 + j) % 512, None) for j in range(16)]
            lat, ok = _timed(lambda: e.batch(1, pool, gets))
            calls.append((time.perf_counter() - stopped, lat, ok))
            puts = [(OP_PUT, 2, n + j, _page(n + j)) for j in range(16)]
            n += 16
            lat, ok = _timed(lambda: e.batch(1, pool, puts))
            calls.append((time.perf_counter() - stopped, lat, ok))

        stopped = time.perf_counter() + 1e9
        end = time.perf_counter() + steady_s
        i = 0
        while time.perf_counter() < end:
            step(i)
            i += 1
        steady = [lat for _, lat, _ in calls]
        calls.clear()
        rc.kill(victim, signal.SIGSTOP)
        stopped = time.perf_counter()
        promoted = None
        try:
            while time.perf_counter() - stopped < 12.0:
                step(i)
                i += 1
                if promoted is None and rc.role(replica) == "master":
                    promoted = time.perf_counter() - stopped
                if promoted is not None and time.perf_counter() - stopped > promoted + 3.0:
                    break
        finally:
            rc.kill(victim, signal.SIGCONT)
        e.pages.close()
        lat = [x for _, x, _ in calls]
        return {
            "steady_p99_ms": statistics.quantiles(steady, n=100)[98] * 1e3,
            "max_call_s": max(lat),
            "held_s": sum(x for x in lat if x > 0.2),
            "failed": sum(1 for *_, ok in calls if not ok),
            "calls": len(calls),
            "promoted_s": promoted,
            "timeouts": e.pages.timeouts,
        }
    finally:
        rc.down()


def false_alarms(tmp: Path, seconds: float, **kw: Any) -> dict[str, Any]:
    rc = start_cluster(tmp)
    try:
        e, pool = _engine(rc, **kw)
        n = 0
        lats = []
        failed = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            ops = [(OP_PUT, 3, n + j, os.urandom(4096)) for j in range(256)]
            n += 256
            lat, ok = _timed(lambda ops=ops: e.batch(1, pool, ops))
            lats.append(lat)
            failed += not ok
        e.pages.close()
        return {
            "batches": len(lats),
            "failed": failed,
            "timeouts": e.pages.timeouts,
            "median_s": statistics.median(lats),
            "max_s": max(lats),
            "load": os.getloadavg(),
        }
    finally:
        rc.down()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["hung", "false", "both"], default="both")
    ap.add_argument("--load-s", type=float, default=60.0)
    ap.add_argument("--policy", choices=list(POLICIES), action="append")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tmem-hang-") as d:
        for name in args.policy or list(POLICIES):
            kw = POLICIES[name]
            if args.part in ("hung", "both"):
                r = hung(Path(d) / f"hung-{secrets.token_hex(2)}", **kw)
                print(f"hung  [{name}] load {os.getloadavg()[0]:.1f}: {r}", flush=True)
            if args.part in ("false", "both"):
                r = false_alarms(Path(d) / f"false-{secrets.token_hex(2)}", args.load_s, **kw)
                print(f"false [{name}]: {r}", flush=True)


if __name__ == "__main__":
    main()
