"""How fast the broker reloads persistent pages at start (``broker.store.reload_journal``).

Builds an LMDB journal of ``--pages`` distinct 4 KiB pages (plus 1 % zero pages) in objects of
``--object-pages`` pages over ``--pools`` persistent pools of one guest, then, in interleaved
rounds, each in a fresh process into a fresh core (as at a broker start: every page lands in
memory the process never touched, which costs page faults on this virtual machine):

- ``read``: reading the journal alone (``LmdbJournal.load_chunks``);
- ``per-page``: the reload as it was before the batch restore: ``LmdbJournal.load()`` and one
  ``Tmem.restore_page`` per page, collector on;
- ``reload``: ``reload_journal`` as the broker runs it (chunks into ``Tmem.restore_pages``,
  collector off while it runs);
- ``reload+thp`` (with ``--thp``): the same with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``.

Run: ``.venv/bin/python bench/reload_bench.py [--pages 250000] [--rounds 3]``. Prints pages/s,
the median of the rounds and every round. Not a test: it never fails on a time. On a shared
machine compare figures of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.core import CoreConfig, Tmem  # noqa: E402
from broker.store import LmdbJournal, reload_journal  # noqa: E402

GUEST = 1


def build(journal: LmdbJournal, pages: int, pools: int, object_pages: int) -> None:
    base = os.urandom(4096)
    for n in range(pages):
        pool = n % pools
        k = n // pools
        data = bytes(4096) if n % 100 == 99 else n.to_bytes(8, "little") + base[8:]
        journal.record_put(GUEST, pool, k // object_pages, k % object_pages, data)
        if n % 8192 == 8191:
            journal.sync()
    journal.sync()


def fresh_core(pools: int) -> Tmem:
    tmem = Tmem(CoreConfig(capacity_bytes=1 << 40))
    tmem.add_guest(GUEST, name="reload")
    for _ in range(pools):
        tmem.create_pool(GUEST, "persistent")
    return tmem


def read_only(journal: LmdbJournal, pools: int) -> int:
    return sum(len(pages) for _g, _p, pages in journal.load_chunks())


def per_page(journal: LmdbJournal, pools: int) -> int:
    tmem = fresh_core(pools)
    restore = tmem.restore_page
    n = 0
    for guest_id, pool_id, oid, index, page in journal.load():
        restore(guest_id, pool_id, oid, index, page)
        n += 1
    return n


def reload(journal: LmdbJournal, pools: int) -> int:
    tmem = fresh_core(pools)
    return asyncio.run(reload_journal(journal, tmem)).pages


RUNS: dict[str, Callable[[LmdbJournal, int], int]] = {
    "read": read_only,
    "per-page": per_page,
    "reload": reload,
}


THP = "glibc.malloc.hugetlb=1"


def measure(name: str, path: str, pools: int, pages: int) -> tuple[float, float, float]:
    """One run of ``name`` in a fresh process: pages/s, user and system CPU us per page. ``NAME+thp``: with glibc's malloc asking
    for transparent huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``)."""
    env = dict(os.environ)
    if name.endswith("+thp"):
        name = name.removesuffix("+thp")
        env["GLIBC_TUNABLES"] = THP
    out = subprocess.run(
        [sys.executable, __file__, "--measure", name, "--journal", path, "--pools", str(pools)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout.split()
    n, seconds, user, system = int(out[0]), float(out[1]), float(out[2]), float(out[3])
    if n != pages:
        raise RuntimeError(f"{name} restored {n} pages, not {pages}")
    return n / seconds, user * 1e6 / n, system * 1e6 / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=250_000)
    ap.add_argument("--pools", type=int, default=4)
    ap.add_argument("--object-pages", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--thp", action="store_true", help="also run reload with THP malloc")
    ap.add_argument("--measure", choices=sorted(RUNS), help=argparse.SUPPRESS)
    ap.add_argument("--journal", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:  # the child: one run, prints "pages seconds"
        journal = LmdbJournal(args.journal)
        try:
            gc.collect()
            t0 = time.perf_counter()
            c0 = os.times()
            n = RUNS[args.measure](journal, args.pools)
            c1 = os.times()
            print(n, time.perf_counter() - t0, c1.user - c0.user, c1.system - c0.system)
        finally:
            journal.close()
        return
    rates: dict[str, list[float]] = {k: [] for k in RUNS}
    if args.thp:
        rates["reload+thp"] = []
    cpu: dict[str, list[tuple[float, float]]] = {k: [] for k in rates}
    with tempfile.TemporaryDirectory(
        prefix="tmem-reload-", dir=os.environ.get("TMPDIR", "/var/tmp")
    ) as tmp:
        path = str(Path(tmp) / "journal")
        journal = LmdbJournal(path)
        try:
            t0 = time.perf_counter()
            build(journal, args.pages, args.pools, args.object_pages)
            print(
                f"journal of {journal.count()} pages ({args.pools} pools, objects of "
                f"{args.object_pages} pages) built in {time.perf_counter() - t0:.1f} s"
            )
        finally:
            journal.close()
        for r in range(args.rounds):
            names = list(rates) if r % 2 == 0 else list(reversed(rates))  # both orders
            for name in names:
                rate, user, system = measure(name, path, args.pools, args.pages)
                rates[name].append(rate)
                cpu[name].append((user, system))
    print(
        f"each run in a fresh process; medians of {args.rounds} rounds: pages/s [every round], "
        "CPU per page (user + system)"
    )
    for name, xs in rates.items():
        every = ", ".join(f"{x:,.0f}" for x in xs)
        user = statistics.median(u for u, _ in cpu[name])
        system = statistics.median(s for _, s in cpu[name])
        print(
            f"  {name:10s} {statistics.median(xs):>10,.0f}   {user:5.2f} + {system:5.2f} us"
            f"   [{every}]"
        )
    ratio = statistics.median(rates["reload"]) / statistics.median(rates["per-page"])
    print(f"  reload / per-page: {ratio:.2f}x")


if __name__ == "__main__":
    main()
