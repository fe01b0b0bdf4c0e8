"""Side-by-side benchmarks: the broker next to what a user would pick instead, in one run.

Run: ``make bench`` or ``.venv/bin/python -m bench.run_all [--quick] [--only a,b,...]``.

Every target is started here on free loopback ports (a broker, private redis-servers, nbdkit),
the pairs take turns (A B A B ...) so that the load of a shared machine falls on both alike,
and one table of medians and ratios is printed; the figures also go to
``bench/results/latest.json``. The comparisons:

a. single-page put/get through ``TmemClient`` vs redis-py SET/GET (ops/s, p50, p99)
b. 256-page batches: ``put_many``/``get_many`` vs redis-py MSET/MGET (pages/s)
c. durable 256-page batches: broker ``--durability sync`` vs Redis ``appendfsync always``
d. the NBD export (``tmem-agent nbd`` + broker) vs ``nbdkit memory`` under fio (4k random)
e. memory: broker RSS growth per stored page vs Redis ``used_memory`` per 4 KiB value
f. dedup: N guests storing the same image: broker memory vs what they stored
g. capacity: 8 simulated guests on one image, the same broker RAM, four configurations (today's
   defaults, ``TMEM_COMPRESS=pressure``, a trusted dedup domain, both): pages held, faults
   served, disk I/O avoided, persistent pages lost (``bench/capacity_bench.py``)
h. cluster mode's data plane on a private Redis Cluster (``bench/scale_bench.py``): Redis memory
   per unique page per copy, one image through 3 engines vs the ideal, durable 256-page batches
   vs redis-py pipelines doing SET + WAIT; with real brokers and PostgreSQL, broker CPU per
   page through 1, 2 and 3 brokers, and get p99 and the outage through a Redis master failover

Not a test: it never fails on a time. See bench/README.md for how to read it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.common import (
    BrokerProcess,
    broker_process,
    hiredis_in_use,
    machine,
    nbdkit_memory,
    plain_client,
    redis_server,
    rss_bytes,
    summary,
)
from guest_agent import TmemClient

PAGE = 4096
BATCH = 256
RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
SECTIONS = "abcdefgh"
# redis-py as its users install it: with the hiredis parser (redis[hiredis]); "plain" rows use
# its pure-Python parser on the same server
HIREDIS = "redis-py+hiredis"
_BASE = os.urandom(PAGE)

# Wide enough for the table when the output is a file or a pipe (make bench | tee).
console = Console(width=None if sys.stdout.isatty() else 150)


def unique_page(i: int, salt: int = 0) -> bytes:
    """A page no other (i, salt) makes: 16 bytes of identity, then random bytes shared by all
    (distinct contents, so dedup does not flatter the broker)."""
    return salt.to_bytes(8, "little") + i.to_bytes(8, "little") + _BASE[16:]


@dataclass
class Row:
    """One line of the table: the broker's figure next to the baseline's, and the aim."""

    section: str
    measure: str
    unit: str
    broker: float
    baseline: float
    baseline_name: str
    ratio: float
    aim: str = ""
    met: bool | None = None


@dataclass
class Config:
    quick: bool
    rounds: int
    single_ops: int
    batches: int
    durable_batches: int
    nbd_size: str
    nbd_runtime: int
    nbd_rounds: int
    memory_pages: int
    dedup_guests: int
    dedup_pages: int

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls(True, 3, 500, 10, 5, "64MiB", 2, 1, 50_000, 3, 5_000)
        return cls(False, 5, 4000, 100, 40, "256MiB", 5, 2, 1_000_000, 8, 50_000)


class Bench:
    def __init__(self, cfg: Config, tmp: Path, progress: Progress) -> None:
        self.cfg = cfg
        self.tmp = tmp
        self.progress = progress
        self.rows: list[Row] = []
        self.raw: dict[str, Any] = {}

    # ----------------------------------------------------------------- helpers

    def task(self, name: str, total: int) -> Callable[[], None]:
        t = self.progress.add_task(name, total=total)
        return lambda: self.progress.advance(t)

    def guest(self, broker: BrokerProcess, name: str) -> tuple[int, str]:
        return broker.new_guest(f"{name}-{time.monotonic_ns()}")

    def ratio_row(
        self, section: str, measure: str, unit: str, ours: float, theirs: float, name: str,
        aim: float | None = None,
    ) -> None:  # fmt: skip
        ratio = ours / theirs if theirs else float("nan")
        met = None if aim is None else ratio >= aim
        aim_text = "" if aim is None else f">= {aim:g}x"
        self.rows.append(Row(section, measure, unit, ours, theirs, name, ratio, aim_text, met))

    # ----------------------------------------------------------------- a

    def a_single(self) -> None:
        cfg = self.cfg
        n = cfg.single_ops
        pages = [unique_page(i, 1) for i in range(n)]
        tick = self.task("a  single put/get vs redis SET/GET", cfg.rounds)
        names = ("put", "SET", "SET plain", "get", "GET", "GET plain")
        lat: dict[str, list[float]] = {k: [] for k in names}
        rates: dict[str, list[float]] = {k: [] for k in lat}
        clock = time.perf_counter_ns
        with (
            broker_process(self.tmp) as broker,
            redis_server(self.tmp, "off") as r,
            plain_client(r) as rp,
            TmemClient(broker.url, self.guest(broker, "a")[1]) as client,
        ):
            pool = client.create_pool("persistent")
            keys = [b"p:%d" % i for i in range(n)]
            ops: dict[str, Callable[[int], object]] = {
                "put": lambda i: client.put(pool, 1, i, pages[i]),
                "SET": lambda i: r.set(keys[i], pages[i]),
                "SET plain": lambda i: rp.set(keys[i], pages[i]),
                "get": lambda i: client.get(pool, 1, i),
                "GET": lambda i: r.get(keys[i]),
                "GET plain": lambda i: rp.get(keys[i]),
            }
            for fn in ops.values():  # warm up both connections
                for i in range(min(n, 200)):
                    fn(i)
            for _ in range(cfg.rounds):
                for name, fn in ops.items():  # put SET get GET: each pair back to back
                    one: list[float] = []
                    for i in range(n):
                        t0 = clock()
                        fn(i)
                        one.append((clock() - t0) / 1000.0)
                    lat[name] += one
                    rates[name].append(summary(one)["ops_per_s"])
                tick()
        figures = {k: {**summary(v), "median_ops_per_s": statistics.median(rates[k])} for k, v in
                   lat.items()}  # fmt: skip
        self.raw["a"] = {"ops_per_round": n, "rounds": cfg.rounds, **figures}
        for ours, theirs, what in (("put", "SET", "put one page"), ("get", "GET", "get one page")):
            o, t, tp = figures[ours], figures[theirs], figures[f"{theirs} plain"]
            self.ratio_row("a", f"{what}", "ops/s", o["median_ops_per_s"],
                           t["median_ops_per_s"], f"{HIREDIS} {theirs}", 0.8)  # fmt: skip
            self.ratio_row("a", f"{what}", "ops/s", o["median_ops_per_s"],
                           tp["median_ops_per_s"], f"plain redis-py {theirs}")  # fmt: skip
            self.rows.append(Row("a", f"{what} p50", "µs", o["p50_us"], t["p50_us"],
                                 f"{HIREDIS} {theirs}", o["p50_us"] / t["p50_us"]))  # fmt: skip
            self.rows.append(Row("a", f"{what} p99", "µs", o["p99_us"], t["p99_us"],
                                 f"{HIREDIS} {theirs}", o["p99_us"] / t["p99_us"]))  # fmt: skip

    # ----------------------------------------------------------------- b, c

    def _batches(
        self,
        section: str,
        label: str,
        durability: str,
        redis_mode: str,
        gets: bool,
        nb: int,
        settle: float = 0.0,
    ) -> dict[str, list[float]]:
        """Interleaved rounds of ``nb`` 256-page batches, broker vs redis; pages/s per round.
        ``settle``: seconds of pause after each turn, so that work one side defers (the
        journal's checkpoint into LMDB once the broker goes quiet) is not done during the other
        side's turn."""
        cfg = self.cfg
        batches = [[(b, i, unique_page(b * BATCH + i, 2)) for i in range(BATCH)] for b in range(nb)]
        rkeys = [[b"b:%d:%d" % (b, i) for i in range(BATCH)] for b in range(nb)]
        tick = self.task(label, cfg.rounds)
        rates: dict[str, list[float]] = {}
        with (
            broker_process(self.tmp, durability=durability) as broker,
            redis_server(self.tmp, redis_mode) as r,
            plain_client(r) as rp,
            TmemClient(broker.url, self.guest(broker, section)[1], max_batch_ops=BATCH) as client,
        ):
            pool = client.create_pool("persistent")
            handles = [[(oid, index) for oid, index, _ in b] for b in batches]
            mapping = [dict(zip(rkeys[b], (p for _, _, p in batches[b]), strict=True))
                       for b in range(nb)]  # fmt: skip

            def put_many() -> None:
                for b in batches:
                    client.put_many(pool, b)

            def mset() -> None:
                for m in mapping:
                    r.mset(m)

            def get_many() -> None:
                for h in handles:
                    client.get_many(pool, h)

            def mget() -> None:
                for k in rkeys:
                    r.mget(k)

            def mset_plain() -> None:
                for m in mapping:
                    rp.mset(m)

            def mget_plain() -> None:
                for k in rkeys:
                    rp.mget(k)

            ops = {"put_many": put_many, "MSET": mset}
            if gets:
                ops |= {"MSET plain": mset_plain, "get_many": get_many, "MGET": mget,
                        "MGET plain": mget_plain}  # fmt: skip
            put_many()  # warm up: every handle holds a page, both sides
            mset()
            for _ in range(cfg.rounds):
                for name, fn in ops.items():
                    time.sleep(settle)
                    t0 = time.perf_counter()
                    fn()
                    rates.setdefault(name, []).append(nb * BATCH / (time.perf_counter() - t0))
                tick()
        return {k: v for k, v in rates.items() if v}

    def b_batches(self) -> None:
        rates = self._batches(
            "b", "b  256-page batches vs MSET/MGET", "none", "off", True, self.cfg.batches
        )
        self.raw["b"] = {"batch": BATCH, "batches_per_round": self.cfg.batches, **rates}
        m = {k: statistics.median(v) for k, v in rates.items()}
        for ours, theirs, what in (("put_many", "MSET", "put_many 256 pages"),
                                   ("get_many", "MGET", "get_many 256 pages")):  # fmt: skip
            self.ratio_row("b", what, "pages/s", m[ours], m[theirs], f"{HIREDIS} {theirs}", 1.0)
            self.ratio_row("b", what, "pages/s", m[ours], m[f"{theirs} plain"],
                           f"plain redis-py {theirs}")  # fmt: skip

    def c_durable(self) -> None:
        rates = self._batches(
            "c", "c  durable batches vs appendfsync always", "sync", "always", False,
            self.cfg.durable_batches, settle=1.0,
        )  # fmt: skip
        self.raw["c"] = {"batch": BATCH, "batches_per_round": self.cfg.durable_batches, **rates}
        m = {k: statistics.median(v) for k, v in rates.items()}
        self.ratio_row("c", "put_many 256, durability sync", "pages/s", m["put_many"], m["MSET"],
                       f"{HIREDIS} MSET, appendfsync always", 1.5)  # fmt: skip

    # ----------------------------------------------------------------- h

    def h_scale(self) -> None:
        from bench.scale_bench import measure  # (needs the server extra, as the broker does)

        tick = self.task("h  cluster data plane", 1)
        r = measure(self.tmp / "h", self.cfg.quick)
        tick()
        self.raw["h"] = r
        self.rows.extend(_h_rows(r))

    # ----------------------------------------------------------------- d

    def d_nbd(self) -> None:
        """One broker listening on TCP and on a Unix socket, serving an export itself
        (``--nbd-dir``); agent exports on each path; nbdkit on TCP and on a Unix socket. All
        take turns under the same fio jobs. The broker's own export is compared with nbdkit
        on a Unix socket (both one hop on AF_UNIX), the agent exports with nbdkit on TCP (they
        listen on TCP)."""
        from bench.nbd_bench import fio
        from tests.e2e.nbd_support import NbdAgent, UdsBrokerProcess

        cfg = self.cfg
        jobs = [("randwrite", 1), ("randwrite", 32), ("randread", 1), ("randread", 32)]
        # row label -> (target, the baseline it is compared with)
        paths = {"broker export, unix socket": ("broker-nbd", "nbdkit-unix"),
                 "agent on the broker's unix socket": ("agent-uds", "nbdkit"),
                 "agent over tcp": ("agent-tcp", "nbdkit")}  # fmt: skip
        tick = self.task("d  NBD export vs nbdkit memory (fio)", cfg.nbd_rounds * len(jobs) + 1)
        nbytes = cfg.nbd_size.replace("MiB", "m").replace("GiB", "g")
        size = int(nbytes[:-1]) << (20 if nbytes.endswith("m") else 30)
        names = ("nbdkit", "nbdkit-unix", "broker-nbd", "agent-uds", "agent-tcp")
        iops: dict[str, dict[str, list[float]]] = {k: {} for k in names}
        p99: dict[str, dict[str, list[float]]] = {k: {} for k in names}
        work = self.tmp / "nbd"
        work.mkdir()
        with ExitStack() as stack:
            broker = stack.enter_context(UdsBrokerProcess(
                work / "broker", uds=work / "broker.sock", nbd_dir=work / "exports",
                durability="none", capacity="8GiB",
            ))  # fmt: skip
            uris = {"nbdkit": stack.enter_context(nbdkit_memory(cfg.nbd_size)),
                    "nbdkit-unix": stack.enter_context(nbdkit_memory(
                        cfg.nbd_size, unix=work / "nbdkit.sock"))}  # fmt: skip
            _, token = self.guest(broker, "d-broker-nbd")
            uris["broker-nbd"] = broker.json("PUT", "/v1/self/nbd/bench", {"size": size},
                                             token=token, expect=201)["uri"]  # fmt: skip
            for name, url in (("agent-uds", broker.unix_url), ("agent-tcp", broker.url)):
                _, token = self.guest(broker, f"d-{name}")
                (work / name).mkdir()
                uris[name] = stack.enter_context(NbdAgent.for_broker(
                    broker, token, work / name, size=cfg.nbd_size, url=url,
                )).uri  # fmt: skip
            for uri in uris.values():  # fill, so that reads hit real data
                fio(uri, "--rw=write", "--bs=1m", "--iodepth=4", f"--size={nbytes}")
            tick()
            order = list(uris)
            for k in range(cfg.nbd_rounds):
                for rw, depth in jobs:
                    for name in order if k % 2 == 0 else order[::-1]:
                        report: Any = fio(
                            uris[name], f"--rw={rw}", "--bs=4k", f"--iodepth={depth}",
                            f"--size={nbytes}", f"--runtime={cfg.nbd_runtime}", "--time_based",
                        )  # fmt: skip
                        side = report["jobs"][0]["write" if "write" in rw else "read"]
                        job = f"{rw} qd{depth}"
                        iops[name].setdefault(job, []).append(float(side["iops"]))
                        pct = side["clat_ns"].get("percentile", {})
                        if "99.000000" in pct:
                            p99[name].setdefault(job, []).append(pct["99.000000"] / 1000.0)
                    tick()
        self.raw["d"] = {"size": cfg.nbd_size, "runtime_s": cfg.nbd_runtime, **iops,
                         "p99_us": p99}  # fmt: skip
        for path, (name, base) in paths.items():
            for job in iops[name]:
                ours = statistics.median(iops[name][job])
                theirs = statistics.median(iops[base][job])
                # the aims are for the broker's own export (the setup docs/nbd.md recommends
                # for a VM on the broker's host)
                aim = None
                if name == "broker-nbd":
                    aim = 0.8 if job.endswith("qd32") else 0.5
                label = f"nbdkit memory ({'unix' if base == 'nbdkit-unix' else 'tcp'})"
                self.ratio_row("d", f"fio 4k {job} ({path})", "IOPS", ours, theirs, label, aim)
                if job.endswith("qd1") and p99[name].get(job) and p99[base].get(job):
                    o, t = statistics.median(p99[name][job]), statistics.median(p99[base][job])
                    self.rows.append(Row("d", f"fio 4k {job} p99 latency ({path})", "µs", o, t,
                                         label, o / t))  # fmt: skip

    # ----------------------------------------------------------------- e

    def _fill_broker(self, broker: BrokerProcess, token: str, items: Iterator[tuple[int, int,
                     bytes]]) -> None:  # fmt: skip
        with TmemClient(broker.url, token, max_batch_ops=BATCH) as client:
            pool = client.create_pool("persistent")
            chunk: list[tuple[int, int, bytes]] = []
            for item in items:
                chunk.append(item)
                if len(chunk) == BATCH:
                    assert all(client.put_many(pool, chunk)), "the bench guest has no quota"
                    chunk = []
            if chunk:
                assert all(client.put_many(pool, chunk))

    def warm_up(self, broker: BrokerProcess, token: str) -> None:
        """Fill requests like the measured ones (256-page put batches) but of zero pages, which
        take no page storage: the RSS measured next starts with the request buffers grown
        already. (The allocator keeps what they freed; a warm-up with bigger requests left so
        much free heap that the pages fitted in it and RSS hardly grew.)"""
        with TmemClient(broker.url, token, max_batch_ops=BATCH) as client:
            pool = client.create_pool("persistent")
            zero = bytes(PAGE)
            for _ in range(2):
                client.put_many(pool, [(9, i, zero) for i in range(BATCH)])

    def broker_bytes_per_page(self, n: int, tick: Callable[[], None] | None = None) -> dict[
        str, float]:  # fmt: skip
        """RSS growth of a real broker process storing ``n`` unique pages, per page."""
        # Room to spare: past persistent_share (0.75) of the capacity the pressure policy would
        # lower the guest's quota mid-fill (1M pages in 5 GiB is 76%; whether a put met the
        # lowered quota then depended on when the policy's step ran).
        capacity = (n * PAGE * 3 // 2 >> 30) + 2
        with broker_process(self.tmp, capacity=f"{capacity}GiB") as broker:
            assert broker.proc is not None
            pid = broker.proc.pid
            _, token = self.guest(broker, "e")
            self.warm_up(broker, token)
            before = rss_bytes(pid)
            self._fill_broker(broker, token, ((i >> 16, i & 0xFFFF, unique_page(i, 4))
                                              for i in range(n)))  # fmt: skip
            after = rss_bytes(pid)
            stats = broker.json("GET", "/v1/stats")
        if tick:
            tick()
        return {
            "pages": n,
            "rss_before": before,
            "rss_after": after,
            "bytes_per_page": (after - before - n * PAGE) / n,
            "logical_pages": stats["logical_pages"],
            "unique_pages": stats["unique_pages"],
        }

    def e_memory(self) -> None:
        n = self.cfg.memory_pages
        tick = self.task(f"e  memory per page ({n:,} pages)", 2)
        ours = self.broker_bytes_per_page(n, tick)
        with redis_server(self.tmp, "off") as r:
            before = int(r.info("memory")["used_memory"])
            for b in range(0, n, BATCH):
                r.mset({b"m:%d" % i: unique_page(i, 4) for i in range(b, min(n, b + BATCH))})
            info = r.info("memory")
            used = int(info["used_memory"])
            theirs = {
                "pages": n,
                "used_memory_before": before,
                "used_memory_after": used,
                "used_memory_rss": int(info["used_memory_rss"]),
                "bytes_per_page": (used - before - n * PAGE) / n,
            }
        tick()
        self.raw["e"] = {"broker": ours, "redis": theirs, "quick": self.cfg.quick}
        ratio = ours["bytes_per_page"] / theirs["bytes_per_page"]
        note = "" if n >= 1_000_000 else f" (--quick: {n:,} pages, not 1M)"
        self.rows.append(Row("e", f"overhead per stored 4 KiB page{note}", "B/page",
                             ours["bytes_per_page"], theirs["bytes_per_page"],
                             "redis used_memory", ratio, "<= 0.5x", ratio <= 0.5))  # fmt: skip

    # ----------------------------------------------------------------- f

    def f_dedup(self) -> None:
        cfg = self.cfg
        g, m = cfg.dedup_guests, cfg.dedup_pages
        tick = self.task(f"f  dedup: {g} guests, same {m:,}-page image", g + 1)
        # The per-page metadata comes from section e of this run when it ran, else from a
        # small measurement of its own.
        meta_source = self.raw.get("e", {}).get("broker")
        if meta_source is None:
            meta_source = self.broker_bytes_per_page(min(20_000, m * 2))
        meta = float(meta_source["bytes_per_page"])
        tick()

        def image() -> Iterator[tuple[int, int, bytes]]:
            # an image: 10% zero pages, 10% repeats of earlier pages, the rest distinct
            for i in range(m):
                if i % 10 == 0:
                    page = bytes(PAGE)
                elif i % 10 == 1 and i > 10:
                    page = unique_page(i - 9, 5)
                else:
                    page = unique_page(i, 5)
                yield (i >> 12, i & 0xFFF, page)

        with broker_process(self.tmp) as broker:
            assert broker.proc is not None
            pid = broker.proc.pid
            tokens = [self.guest(broker, f"f{k}")[1] for k in range(g)]
            self.warm_up(broker, tokens[0])
            base_stats = broker.json("GET", "/v1/stats")
            before = rss_bytes(pid)
            first = 0
            for k, token in enumerate(tokens):
                self._fill_broker(broker, token, image())
                if k == 0:
                    first = rss_bytes(pid) - before
                tick()
            after = rss_bytes(pid)
            stats = broker.json("GET", "/v1/stats")
        logical = int(stats["logical_pages"]) - int(base_stats["logical_pages"])
        distinct = int(stats["unique_pages"]) - int(base_stats["unique_pages"])
        grown = after - before
        stored = logical * PAGE
        # Metadata model: a handle costs ``per_handle`` (measured here: guests 2..N add handles
        # to contents the broker holds already), a distinct content costs 4096 bytes plus what
        # a unique page costs beyond its handle (section e's figure minus ``per_handle``).
        per_handle = (grown - first) / max(1, (g - 1) * m)
        per_content = max(0.0, meta - per_handle)
        expected = distinct * (PAGE + per_content) + logical * per_handle
        self.raw["f"] = {
            "guests": g, "image_pages": m, "logical_pages": logical, "distinct_pages": distinct,
            "zero_pages": int(stats["zero_pages"]), "rss_growth": grown,
            "rss_growth_first_guest": first, "sum_stored_by_guests": stored,
            "unique_page_overhead": meta, "per_handle_bytes": per_handle,
            "per_content_bytes": per_content, "expected": expected,
            "used_bytes": stats["used_bytes"], "dedup_ratio": stats.get("dedup_ratio"),
        }  # fmt: skip
        self.rows.append(Row("f", f"{g} guests x {m:,} pages: broker RSS growth vs sum stored",
                             "bytes", grown, stored, "sum of guests' pages", grown / stored))  # fmt: skip
        within = grown / expected
        self.rows.append(Row("f", "RSS growth vs distinct x 4 KiB + metadata", "bytes", grown,
                             expected, f"{distinct:,} x (4096+{per_content:.0f}) + "
                             f"{logical:,} x {per_handle:.0f}", within, "within 5%",
                             abs(within - 1) <= 0.05))  # fmt: skip

    # ----------------------------------------------------------------- g

    def g_capacity(self) -> None:
        """bench/capacity_bench.py's four configurations, set against today's defaults."""
        from bench import capacity_bench as cb

        ccfg = cb.CapacityConfig.quick() if self.cfg.quick else cb.CapacityConfig()
        tick = self.task(f"g  capacity: {ccfg.guests} guests, 4 configurations", len(cb.SETUPS))
        results = {r["setup"]: r for r in cb.run(ccfg, self.tmp, lambda r: tick())}
        self.raw["g"] = {"config": asdict(ccfg), "setups": results}
        base = results["defaults"]
        for name in ("pressure", "trusted", "both"):
            r = results[name]
            self.ratio_row("g", f"pages held: {r['what']}", "pages", r["pages_held"],
                           base["pages_held"], "today's defaults",
                           2.0 if name == "both" else None)  # fmt: skip
        both = results["both"]
        for key, label in (("faults_served_by_broker", "guest faults served by the broker"),
                           ("disk_io_avoided", "disk I/O avoided")):  # fmt: skip
            self.ratio_row("g", f"{label}: pressure + trusted", "pages", both[key], base[key],
                           "today's defaults")  # fmt: skip
        lost = sum(r["persistent_pages_lost"] for r in results.values())
        self.rows.append(Row("g", "persistent pages lost, all 4 configurations", "pages lost",
                             lost, 0, "must be 0", 0.0, "= 0", lost == 0))  # fmt: skip


def _h_rows(r: dict[str, Any]) -> list[Row]:
    """Section h's rows (lower is better for the two memory ratios: their own aims)."""
    m, d, dur = r["memory"], r["dedup"], r["durable"]
    us, fo = r["brokers"]["net_us_per_page"], r["brokers"]["failover"]
    raw = r["brokers"]["us_per_page"]
    changes = r["brokers"]["home_changes"]
    durable = statistics.median(dur["engine"]), statistics.median(dur["set_wait"])
    return [
        Row("h", "Redis bytes per unique page per copy", "B", m["bytes_per_unique_page"],
            PAGE, "4096 (the page)", m["ratio_per_page"], "<= 1.1x",
            m["ratio_per_page"] <= 1.1),
        Row("h", "one image through 3 brokers", "B", d["three_brokers"], d["ideal"],
            "ideal (once + handles)", d["ratio"], "<= 1.05x", d["ratio"] <= 1.05),
        Row("h", "durable batch 256, ClusterEngine", "pages/s", durable[0], durable[1],
            "redis-py SET+WAIT pipelines", r["durable_ratio"], ">= 0.5x",
            r["durable_ratio"] >= 0.5),
        *(Row("h", f"broker CPU per page, {n} brokers, net of idle", "µs", us[n], us[1],
              "1 broker", us[n] / us[1], "0.85-1.15x", 0.85 <= us[n] / us[1] <= 1.15)
          for n in (2, 3)),
        *(Row("h", f"broker CPU per page, {n} brokers, raw", "µs", raw[n], raw[1],
              "1 broker", raw[n] / raw[1]) for n in (2, 3)),
        Row("h", "guests' home changes, no broker dead", "changes", changes, 0, "must be 0",
            0.0, "= 0", changes == 0),
        Row("h", "get p99, Redis master failover", "µs", fo["p99_during_ms"] * 1e3,
            fo["p99_steady_ms"] * 1e3, "steady state", fo["p99_ratio"], "<= 5x",
            fo["p99_ratio"] <= 5),
        Row("h", "outage (no get), master failover", "µs", fo["outage_s"] * 1e6,
            fo["outage_bound_s"] * 1e6, "2 x node timeout + lease",
            fo["outage_s"] / fo["outage_bound_s"], "<= 1x",
            fo["outage_s"] <= fo["outage_bound_s"]),
    ]  # fmt: skip


def render(rows: list[Row], info: dict[str, Any], quick: bool) -> Table:
    table = Table(
        title=f"tmem broker vs baselines — medians ({'--quick' if quick else 'full run'}); "
        f"{info['nproc']} cores {info['cpu_model']}, load {info['load_average']}"
    )
    for col, justify in (("", "left"), ("measure", "left"), ("broker", "right"),
                         ("baseline", "right"), ("against", "left"), ("ratio", "right"),
                         ("aim", "left"), ("", "left")):  # fmt: skip
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        mark = "" if r.met is None else ("[green]met[/]" if r.met else "[red]not met[/]")
        fmt = "{:,.0f}" if r.unit not in ("µs",) else "{:,.1f}"
        table.add_row(r.section, f"{r.measure} ({r.unit})", fmt.format(r.broker),
                      fmt.format(r.baseline), r.baseline_name, f"{r.ratio:.2f}x", r.aim, mark)  # fmt: skip
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and pages")
    parser.add_argument("--only", default=SECTIONS, help="comma-separated sections, e.g. a,b")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write figures")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()] if "," in args.only else list(
        args.only.strip())  # fmt: skip
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    need = {"redis-server": "abceh", "nbdkit": "d", "fio": "d"}
    for tool, sections in need.items():
        if any(s in sections for s in chosen) and shutil.which(tool) is None:
            parser.error(f"{tool} is missing (scripts/system-deps.sh installs it)")
    cfg = Config.make(args.quick)
    info = machine()
    info["hiredis"] = hiredis_in_use()
    if not info["hiredis"] and any(s in "abc" for s in chosen):
        console.print("[yellow]redis-py runs without hiredis: `pip install 'redis[hiredis]'` "
                      "(make bench does) to compare with what its users run[/]")  # fmt: skip
    console.print(f"machine: {info['nproc']} cores, {info['cpu_model']}, load average "
                  f"{info['load_average']} (shared machine: figures are noisy; read the "
                  "ratios)")  # fmt: skip
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="tmem-bench-") as tmpdir,
        Progress(TextColumn("{task.description}"), BarColumn(), TextColumn(
            "{task.completed}/{task.total}"), TimeElapsedColumn(), console=console) as progress,
    ):  # fmt: skip
        bench = Bench(cfg, Path(tmpdir), progress)
        run = {"a": bench.a_single, "b": bench.b_batches, "c": bench.c_durable,
               "d": bench.d_nbd, "e": bench.e_memory, "f": bench.f_dedup,
               "g": bench.g_capacity, "h": bench.h_scale}  # fmt: skip
        for s in SECTIONS:
            if s in chosen:
                run[s]()
    info["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    info["seconds"] = round(time.monotonic() - started, 1)
    console.print(render(bench.rows, info, cfg.quick))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "machine": info, "config": asdict(cfg), "sections": chosen,
        "rows": [asdict(r) for r in bench.rows], "raw": bench.raw,
    }, indent=2, default=float))  # fmt: skip
    console.print(f"figures: {args.json} (load average after: {info['load_average_after']}, "
                  f"{info['seconds']} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
