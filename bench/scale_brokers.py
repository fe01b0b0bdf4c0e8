"""Cluster mode with real broker processes: CPU per page from 1 to 3 brokers, and gets through
a Redis master failover. Part of ``bench.scale_bench`` (section h of ``bench.run_all``).

Everything is started with the launchers the tests use (``scripts/redis_proc.py``,
``scripts/cluster_brokers.py``, ``scripts/pgdb.py``): a 3-master + 3-replica Redis Cluster on
loopback (node timeout ``NODE_TIMEOUT_MS``), a fresh PostgreSQL database per configuration,
``tmem-broker serve --cluster`` processes.

a. CPU per page: the same workload (``GUESTS`` guests, each putting then getting its pages in
   256-page batches, entering at its home) through 1, 2 and 3 brokers; the CPU is utime +
   stime from ``/proc/<pid>/stat`` of every broker over the pages put and got. Reported twice:
   raw (housekeeping included: each broker's control loop, heartbeats, views) and net of the
   brokers' idle rate, measured over ``IDLE_S`` just before the workload with the guests and
   pools in place (the data plane alone; each added broker adds its idle rate to the raw
   figure, charged to a workload of a few seconds). Aim: the net figure flat within +-15 %.
   ``home_changes``: how many times a guest's home changed while the CPU was measured (epochs
   grown; no broker dies here, so anything but 0 is a bug: issue #18).
b. Failover: one guest's single-page gets one after another (the agent a VM would run), a
   steady phase, then ``kill -9`` of a Redis master; a get that fails is retried and counts
   as one get from its first try until it succeeds. Reported: p99 during the failover window
   over the steady p99 (aim <= 5x), and the outage, the longest time with no successful get
   (aim <= 2 x node timeout + lease).

Not a test: it never fails on a time.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

from guest_agent.client import TmemClient
from scripts.cluster_brokers import ClusterBrokers
from scripts.pgdb import temp_database
from scripts.redis_proc import NODE_TIMEOUT_MS, RedisClusterProc, start_cluster

GUESTS = 6
LEASE = 2.0
IDLE_S = 2.0  # the brokers' idle CPU rate is measured over this long before the workload
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, *, reaped: bool = False) -> float:
    """utime + stime of ``pid`` (its threads included), in seconds; with ``reaped``, also the
    CPU of its children that ended and were waited for (cutime + cstime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    used = int(fields[11]) + int(fields[12])
    if reaped:
        used += int(fields[13]) + int(fields[14])
    return used / TICK


def _brokers_cpu(brokers: ClusterBrokers) -> float:
    """CPU seconds of every broker and its children so far. The children are listed afresh
    each time and read tolerantly: one that ended between the listing and the read is counted
    in its parent's reaped figure instead (a smoke run once failed on a child's vanished
    ``/proc/PID/stat``)."""
    total = 0.0
    for b in brokers:
        assert b.proc is not None
        total += cpu_seconds(b.proc.pid, reaped=True)
        for child in b.child_pids():
            with suppress(FileNotFoundError, ProcessLookupError):
                total += cpu_seconds(child)
    return total


@contextmanager
def _brokers(tmp: Path, rc: RedisClusterProc, n: int) -> Iterator[ClusterBrokers]:
    """``n`` brokers on ``rc`` with a fresh database of their own."""
    with (
        temp_database(prefix="tmem_bench") as db,
        ClusterBrokers(tmp, rc.seeds, db, n=n, lease_s=LEASE, capacity="1GiB") as brokers,
    ):
        yield brokers


def _home_url(brokers: ClusterBrokers, gid: int) -> str:
    return brokers.by_id(brokers.wait_home(gid)).url


def _page(guest: int, n: int) -> bytes:
    return (guest.to_bytes(4, "big") + n.to_bytes(4, "big")) * 512


def cpu_per_page(tmp: Path, rc: RedisClusterProc, n: int, pages: int) -> dict[str, float]:
    """Section a, one configuration: ``n`` brokers, the same workload."""
    with _brokers(tmp / f"cpu{n}-{time.monotonic_ns()}", rc, n) as brokers:
        guests = []
        for g in range(GUESTS):
            gid, token = brokers[g % n].new_guest(f"vm-{g}")
            guests.append((gid, token, _home_url(brokers, gid)))
        clients = [TmemClient(url, token, timeout=60) for _, token, url in guests]
        try:
            pools = [c.create_pool("persistent") for c in clients]
            epochs = {gid: int(brokers.guest(gid)["home_epoch"]) for gid, _, _ in guests}
            idle0, i0 = _brokers_cpu(brokers), time.perf_counter()
            time.sleep(IDLE_S)
            idle_rate = (_brokers_cpu(brokers) - idle0) / (time.perf_counter() - i0)
            before = _brokers_cpu(brokers)
            t0 = time.perf_counter()
            for g, (client, pool) in enumerate(zip(clients, pools, strict=True)):
                want = [_page(g, i) for i in range(pages)]
                assert all(client.put_many(pool, [(1, i, p) for i, p in enumerate(want)]))
                assert client.get_many(pool, [(1, i) for i in range(pages)]) == want
            took = time.perf_counter() - t0
            cpu = _brokers_cpu(brokers) - before
            changes = sum(int(brokers.guest(g)["home_epoch"]) - e for g, e in epochs.items())
        finally:
            for c in clients:
                c.close()
    moved = 2 * GUESTS * pages
    net = max(0.0, cpu - idle_rate * took)
    return {"brokers": n, "pages": moved, "cpu_s": cpu, "us_per_page": cpu / moved * 1e6,
            "idle_cpu_per_s": idle_rate, "net_us_per_page": net / moved * 1e6,
            "pages_per_s": moved / took, "home_changes": changes}  # fmt: skip


def _timed_get(client: TmemClient, pool: int, index: int, want: bytes) -> tuple[float, int]:
    """One get, retried until it answers ``want``: (seconds from the first try, failures)."""
    t0 = time.perf_counter()
    failures = 0
    while True:
        try:
            if client.get(pool, 1, index) == want:
                return time.perf_counter() - t0, failures
        except Exception:  # 503 / connection errors while the cluster fails over: retry
            pass
        failures += 1
        if time.perf_counter() - t0 > 60:
            raise RuntimeError(f"page {index} unreadable for 60 s after the failover")
        time.sleep(0.005)


def failover(tmp: Path, pages: int, steady_s: float, after_s: float) -> dict[str, Any]:
    """Section b, on a private cluster (a master is killed)."""
    with ExitStack() as stack:
        rc = start_cluster(tmp / "failover-redis")
        stack.callback(rc.down)
        brokers = stack.enter_context(_brokers(tmp / "failover", rc, 2))
        gid, token = brokers[0].new_guest("vm-failover")
        client = stack.enter_context(TmemClient(_home_url(brokers, gid), token, timeout=10))
        pool = client.create_pool("persistent")
        want = [_page(7, i) for i in range(pages)]
        assert all(client.put_many(pool, [(1, i, p) for i, p in enumerate(want)]))

        samples: list[tuple[float, float]] = []  # (when it succeeded, latency)
        failures = 0

        def run(until: float, start: int) -> int:
            nonlocal failures
            i = start
            while time.perf_counter() < until:
                lat, f = _timed_get(client, pool, i % pages, want[i % pages])
                samples.append((time.perf_counter(), lat))
                failures += f
                i += 1
            return i

        i = run(time.perf_counter() + 1.0, 0)  # warm up
        samples.clear()
        i = run(time.perf_counter() + steady_s, i)
        steady = [lat for _, lat in samples]
        victim = rc.master_ports()[0]
        replica = rc.replica_of(victim)
        samples.clear()
        killed = time.perf_counter()
        rc.kill(victim)
        run(killed + after_s, i)
        during = [lat for _, lat in samples]
        if os.environ.get("TMEM_BENCH_TRACE"):
            print([(round(t - killed, 2), round(lat, 3)) for t, lat in samples if lat > 0.01])
        times = [killed] + [t for t, _ in samples]
        outage = max(b - a for a, b in itertools.pairwise(times))
        rc.wait_promoted(replica)
        brokers.audit(token, pool, {(1, n): p for n, p in enumerate(want)})
    p99_steady, p99_during = _p99(steady), _p99(during)
    return {"steady_gets": len(steady), "gets_during": len(during), "failed_tries": failures,
            "p99_steady_ms": p99_steady * 1e3, "p99_during_ms": p99_during * 1e3,
            "max_during_ms": max(during) * 1e3, "p99_ratio": p99_during / p99_steady,
            "outage_s": outage, "outage_bound_s": 2 * NODE_TIMEOUT_MS / 1e3 + LEASE}  # fmt: skip


def _p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[98]


def measure(tmp: Path, quick: bool = False) -> dict[str, Any]:
    """Both sections; the 1-2-3 configurations take turns, ``rounds`` times."""
    pages, rounds = (500, 2) if quick else (2000, 3)
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: [], 3: []}
    with ExitStack() as stack:
        rc = start_cluster(tmp / "cpu-redis")
        stack.callback(rc.down)
        for _ in range(rounds):
            for n in runs:
                runs[n].append(cpu_per_page(tmp, rc, n, pages))
    us = {n: statistics.median(r["us_per_page"] for r in rs) for n, rs in runs.items()}
    net = {n: statistics.median(r["net_us_per_page"] for r in rs) for n, rs in runs.items()}
    idle = {n: statistics.median(r["idle_cpu_per_s"] for r in rs) for n, rs in runs.items()}
    changes = sum(r["home_changes"] for rs in runs.values() for r in rs)
    fo = failover(tmp, 1000, 3.0 if quick else 6.0, 12.0)
    return {"cpu": runs, "us_per_page": us, "cpu_spread": max(us.values()) / min(us.values()),
            "net_us_per_page": net, "net_spread": max(net.values()) / min(net.values()),
            "idle_cpu_per_s": idle, "home_changes": changes, "failover": fo}  # fmt: skip


def report(r: dict[str, Any]) -> list[str]:
    us, net, idle, fo = r["us_per_page"], r["net_us_per_page"], r["idle_cpu_per_s"], r["failover"]
    return [
        "4. broker CPU per page net of idle housekeeping, 1/2/3 brokers: "
        + ", ".join(f"{net[n]:.0f}" for n in (1, 2, 3))
        + f" µs; max/min {r['net_spread']:.2f} (aim <= 1.15); raw (utime+stime of every "
        "broker / pages put+got): "
        + ", ".join(f"{us[n]:.0f}" for n in (1, 2, 3))
        + f" µs, max/min {r['cpu_spread']:.2f}; idle brokers: "
        + ", ".join(f"{idle[n] * 1e3:.1f}" for n in (1, 2, 3))
        + f" ms CPU/s; guests' home changes {r['home_changes']} (must be 0)",
        f"5. gets through a master failover: p99 {fo['p99_during_ms']:.2f} ms vs steady "
        f"{fo['p99_steady_ms']:.2f} ms = {fo['p99_ratio']:.2f}x (aim <= 5); outage "
        f"{fo['outage_s']:.2f} s (aim <= {fo['outage_bound_s']:.1f} s = 2 x node timeout + "
        f"lease); max get {fo['max_during_ms']:.0f} ms, {fo['failed_tries']} failed tries",
    ]


__all__ = ["cpu_seconds", "measure", "report"]
