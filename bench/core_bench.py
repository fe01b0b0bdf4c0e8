"""In-process figures of the tmem core: puts/s, gets/s and bytes of overhead per stored page.

Run: ``.venv/bin/python -m bench.core_bench [--sizes 10000,1000000]``

Loads, each at every size N (handles laid out as Xen's frontswap did: oid = offset & 0xF,
index = offset >> 4):

* ``persistent``: N unique pages into a private persistent pool, then N gets.
* ``ephemeral``: N unique pages into a private ephemeral pool (capacity to spare), then N
  (exclusive) gets.
* ``ephemeral-full``: N unique puts into an ephemeral pool whose capacity holds N/2 pages,
  so every put in the second half evicts one page.
* ``dedup``: N pages drawn from N/100 distinct contents into a persistent pool.
* ``baseline``: a plain ``dict[(oid << 32 | index)] = page`` store, the same run's yardstick.

Overhead per page is measured with ``tracemalloc`` (every allocation of a fresh broker filled
with freshly made pages, minus 4096 bytes per stored distinct content, divided by logical
pages) and, as a cross-check, from the RSS delta of an untraced fill (minus the same 4096 x
unique). Each memory figure comes from a fresh subprocess, so freed memory of an earlier run
cannot hide growth; throughput runs are separate (tracing slows allocation).
Times are CPU time of this process (``time.process_time``), which a busy machine disturbs
less than wall time. Figures still vary with machine load: it is a benchmark, not a test, and it asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator

from broker.core import CoreConfig, Tmem

PAGE = 4096
_BASE = os.urandom(PAGE)


def unique_page(i: int) -> bytes:
    """A page no other i makes: 8 bytes of i, then random bytes shared by all."""
    return i.to_bytes(8, "little") + _BASE[8:]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Load:
    """One workload: how to build the broker, which pool kind, which page at which offset."""

    def __init__(
        self,
        name: str,
        kind: str,
        page_of: Callable[[int], bytes],
        distinct: Callable[[int], int],
        capacity: Callable[[int], int],
    ) -> None:
        self.name = name
        self.kind = kind
        self.page_of = page_of
        self.distinct = distinct
        self.capacity = capacity

    def broker(self, n: int) -> tuple[Tmem, int]:
        tmem = Tmem(CoreConfig(capacity_bytes=self.capacity(n)))
        tmem.add_guest(1, name="bench")
        return tmem, tmem.create_pool(1, self.kind)


def _dedup_page(i: int, n: int) -> bytes:
    return unique_page(i % max(1, n // 100))


def loads(n: int) -> Iterator[Load]:
    big = lambda m: (m + 16) * PAGE  # noqa: E731
    yield Load("persistent", "persistent", unique_page, lambda m: m, big)
    yield Load("ephemeral", "ephemeral", unique_page, lambda m: m, big)
    yield Load(
        "ephemeral-full", "ephemeral", unique_page, lambda m: m // 2, lambda m: m // 2 * PAGE
    )
    yield Load("dedup", "persistent", lambda i: _dedup_page(i, n), lambda m: max(1, m // 100), big)


def fill_overhead(load: Load, n: int, *, traced: bool) -> float:
    """Bytes of overhead per logical page after n puts into a fresh broker: tracemalloc's
    count when ``traced``, else the RSS delta. Call in a fresh process."""
    gc.collect()
    rss0 = rss_bytes()
    if traced:
        tracemalloc.start()
    tmem, pool = load.broker(n)
    put = tmem.put
    for i in range(n):
        put(1, pool, i & 0xF, i >> 4, load.page_of(i))
    if traced:
        used = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
    else:
        used = rss_bytes() - rss0
    stats = tmem.stats()
    unique = stats.unique_pages
    logical = stats.logical_pages
    return (used - unique * PAGE) / logical


def measure_memory(load: Load, n: int) -> tuple[float, float]:
    """(tracemalloc, RSS) bytes of overhead per logical page, each from a fresh process."""
    out = []
    for how in ("traced", "rss"):
        cmd = [sys.executable, "-m", "bench.core_bench", "--memory", load.name, str(n), how]
        out.append(float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    return out[0], out[1]


def measure_speed(load: Load, n: int) -> tuple[float, float]:
    """(puts/s, gets/s) with pages made beforehand."""
    pages = [load.page_of(i) for i in range(n)]
    tmem, pool = load.broker(n)
    put = tmem.put
    get = tmem.get
    t0 = time.process_time()
    for i in range(n):
        put(1, pool, i & 0xF, i >> 4, pages[i])
    t1 = time.process_time()
    for i in range(n):
        get(1, pool, i & 0xF, i >> 4)
    t2 = time.process_time()
    del tmem, pages
    gc.collect()
    return n / (t1 - t0), n / (t2 - t1)


def baseline(n: int) -> tuple[float, float, float]:
    """A plain dict store: (puts/s, gets/s, tracemalloc overhead per page)."""
    pages = [unique_page(i) for i in range(n)]
    store: dict[int, bytes] = {}
    t0 = time.process_time()
    for i in range(n):
        store[((i & 0xF) << 32) | (i >> 4)] = pages[i]
    t1 = time.process_time()
    for i in range(n):
        store.get(((i & 0xF) << 32) | (i >> 4))
    t2 = time.process_time()
    del store, pages
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    kept: dict[int, bytes] = {}
    for i in range(n):
        kept[((i & 0xF) << 32) | (i >> 4)] = unique_page(i)
    traced = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del kept
    gc.collect()
    return n / (t1 - t0), n / (t2 - t1), (traced - n * PAGE) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,1000000", help="comma-separated page counts")
    parser.add_argument("--memory", nargs=3, metavar=("LOAD", "N", "HOW"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        name, n_text, how = args.memory
        n = int(n_text)
        load = next(ld for ld in loads(n) if ld.name == name)
        print(fill_overhead(load, n, traced=how == "traced"))
        return
    print(
        f"{'load':<15}{'pages':>9}{'puts/s':>12}{'gets/s':>12}{'us/put':>8}"
        f"{'B/page tm':>11}{'B/page rss':>11}"
    )
    for n in (int(s) for s in args.sizes.split(",")):
        b_put, b_get, b_mem = baseline(n)
        print(
            f"{'baseline dict':<15}{n:>9}{b_put:>12,.0f}{b_get:>12,.0f}"
            f"{1e6 / b_put:>8.2f}{b_mem:>11.0f}{'-':>11}"
        )
        for load in loads(n):
            puts, gets = measure_speed(load, n)
            tm, rss = measure_memory(load, n)
            print(
                f"{load.name:<15}{n:>9}{puts:>12,.0f}{gets:>12,.0f}{1e6 / puts:>8.2f}"
                f"{tm:>11.0f}{rss:>11.0f}   (puts {puts / b_put:.2f}x baseline)"
            )


if __name__ == "__main__":
    main()
