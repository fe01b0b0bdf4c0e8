"""Which embedded engine should hold persistent pages? LMDB vs SQLite WAL, measured here.

Each engine commits rounds of 256 random 4 KiB pages, one durable transaction (fsync) per
round, the way the journal's group commit does; then a full scan (the reload path). Prints
pages/s for both and the ratio. Run: ``.venv/bin/python bench/journal_engines.py [rounds]``.
Not a test: it never fails on a time.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import sys
import tempfile
import time

import lmdb

BATCH = 256
KEY = struct.Struct(">IB24sI")


def _pages(n: int) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        key = KEY.pack(1, 0, i.to_bytes(24, "big"), i)
        out.append((key, os.urandom(4096)))
    return out


def bench_lmdb(path: str, rounds: int, writemap: bool, split: bool = False) -> tuple[float, float]:
    env = lmdb.open(path, map_size=1 << 36, writemap=writemap, max_dbs=0)
    pages = _pages(BATCH * rounds)
    if split:
        # The journal's layout: the page's last 16 bytes in the key, so the 4080-byte value
        # fits one overflow page instead of two.
        pages = [(k + v[4080:], v[:4080]) for k, v in pages]
    t0 = time.perf_counter()
    for r in range(rounds):
        with env.begin(write=True) as txn:
            cur = txn.cursor()
            cur.putmulti(pages[r * BATCH : (r + 1) * BATCH])
    w = BATCH * rounds / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    n = 0
    with env.begin() as txn:
        for _k, v in txn.cursor():
            n += len(v) > 0
    s = n / (time.perf_counter() - t0)
    env.close()
    return w, s


def bench_sqlite(path: str, rounds: int) -> tuple[float, float]:
    db = sqlite3.connect(os.path.join(path, "j.db"), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # NORMAL in WAL is not durable across power loss
    db.execute("CREATE TABLE p (k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID")
    pages = _pages(BATCH * rounds)
    t0 = time.perf_counter()
    for r in range(rounds):
        db.execute("BEGIN")
        db.executemany("INSERT OR REPLACE INTO p VALUES (?, ?)", pages[r * BATCH : (r + 1) * BATCH])
        db.execute("COMMIT")
    w = BATCH * rounds / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    n = 0
    for _k, v in db.execute("SELECT k, v FROM p ORDER BY k"):
        n += len(v) > 0
    s = n / (time.perf_counter() - t0)
    db.close()
    return w, s


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    results = {}
    for name in ("lmdb", "lmdb-split", "lmdb-writemap", "sqlite-wal"):
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as d:
            if name == "sqlite-wal":
                results[name] = bench_sqlite(d, rounds)
            else:
                results[name] = bench_lmdb(
                    d, rounds, writemap=name.endswith("writemap"), split=name.endswith("split")
                )
        w, s = results[name]
        print(f"{name:14s} durable puts {w:10.0f} pages/s   scan {s:10.0f} pages/s")
    base_w, base_s = results["sqlite-wal"]
    for name in ("lmdb", "lmdb-split", "lmdb-writemap"):
        w, s = results[name]
        print(f"{name} / sqlite-wal: puts {w / base_w:.2f}x, scan {s / base_s:.2f}x")


if __name__ == "__main__":
    main()
