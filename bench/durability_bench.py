"""What durability costs: batched persistent puts, broker ``sync`` and ``none`` vs Redis.

Starts, in one run and on free ports: a broker with ``--durability sync``, one with ``none``,
a redis-server with ``appendonly yes`` + ``appendfsync always`` and one with persistence off.
Every target gets the same random pages, in batches of 256 (the broker's batch endpoint; Redis
MSET), from the same number of concurrent clients (threads, one connection each). Then the
``sync`` broker is restarted and its journal reload rate is read from its log.

Run: ``.venv/bin/python bench/durability_bench.py [--pages 65536] [--clients 4] [--batch 256]``.
Prints pages/s per target and the ratios. Not a test: it never fails on a time. Figures from a
shared 2-core machine are noisy; compare ratios taken in the same run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from schemas.batch import BATCH_CONTENT_TYPE, OP_PUT, decode_results, encode_request  # noqa: E402

ADMIN = "bench-admin-token-0123456789abcdef"
BROKER = str(Path(sys.executable).parent / "tmem-broker")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, http.client.HTTPException, redis.RedisError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up")


class Broker:
    def __init__(self, workdir: Path, durability: str) -> None:
        self.port = free_port()
        self.data = workdir / f"broker-{durability}"
        self.log = workdir / f"broker-{durability}.log"
        self.durability = durability
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as logf:
            self.proc = subprocess.Popen(
                [
                    BROKER,
                    "serve",
                    "--port",
                    str(self.port),
                    "--data-dir",
                    str(self.data),
                    "--capacity",
                    "4GiB",
                    "--durability",
                    self.durability,
                ],
                env={**os.environ, "TMEM_ADMIN_TOKEN": ADMIN},
                stdout=logf,
                stderr=subprocess.STDOUT,
            )
        wait_for(
            lambda: self.call("GET", "/readyz", None, None)[0] == 200, f"broker {self.durability}"
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None,
        token: str | None,
        ctype: str = "application/json",
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        headers = {"Content-Type": ctype}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def setup(self, clients: int, rep: int) -> list[tuple[str, int]]:
        """One guest and one persistent pool per client."""
        out = []
        for c in range(clients):
            st, body = self.call(
                "POST", "/v1/guests", json.dumps({"name": f"bench-{rep}-{c}"}).encode(), ADMIN
            )
            assert st == 201, body
            token = json.loads(body)["token"]
            st, body = self.call("POST", "/v1/pools", b'{"kind": "persistent"}', token)
            assert st == 201, body
            out.append((token, int(json.loads(body)["pool_id"])))
        return out

    def runner(self, targets: list[tuple[str, int]]) -> Callable[[int, list[list[bytes]]], None]:
        def run(client: int, batches: list[list[bytes]]) -> None:
            token, pool = targets[client]
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            headers = {"Authorization": f"Bearer {token}", "Content-Type": BATCH_CONTENT_TYPE}
            base = client << 32
            for b, pages in enumerate(batches):
                ops = [(OP_PUT, base + b, i, p) for i, p in enumerate(pages)]
                conn.request(
                    "POST", f"/v1/pools/{pool}/batch", body=encode_request(ops), headers=headers
                )
                r = conn.getresponse()
                body = r.read()
                assert r.status == 200, body[:200]
                assert all(x.status == 0 for x in decode_results(body, [OP_PUT] * len(ops)))
            conn.close()

        return run


class Redis:
    def __init__(self, workdir: Path, name: str, args: list[str]) -> None:
        self.port = free_port()
        self.dir = workdir / f"redis-{name}"
        self.dir.mkdir()
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: bool(redis.Redis(port=self.port).ping()), f"redis {name}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def runner(self) -> Callable[[int, list[list[bytes]]], None]:
        def run(client: int, batches: list[list[bytes]]) -> None:
            r = redis.Redis(port=self.port)
            for b, pages in enumerate(batches):
                r.mset(
                    {f"p:{client}:{b}:{i}": p for i, p in enumerate(pages)}
                )  # same keys each rep
            r.close()

        return run


def measure(run: Callable[[int, list[list[bytes]]], None], work: list[list[list[bytes]]]) -> float:
    threads = [threading.Thread(target=run, args=(c, batches)) for c, batches in enumerate(work)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return sum(len(b) for batches in work for b in batches) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=65536)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed")

    per_client = args.pages // args.clients
    pages = [os.urandom(4096) for _ in range(per_client * args.clients)]
    work = [
        [
            pages[c * per_client + s : c * per_client + s + args.batch]
            for s in range(0, per_client, args.batch)
        ]
        for c in range(args.clients)
    ]
    n = per_client * args.clients
    print(f"{n} random 4 KiB pages, batches of {args.batch}, {args.clients} concurrent clients")

    rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(
        prefix="tmem-bench-", dir=os.environ.get("TMPDIR", "/var/tmp")
    ) as tmp:
        workdir = Path(tmp)
        redis_always = Redis(workdir, "always", ["--appendonly", "yes", "--appendfsync", "always"])
        redis_off = Redis(workdir, "off", ["--appendonly", "no"])
        brokers = {d: Broker(workdir, d) for d in ("sync", "none")}
        try:
            for broker in brokers.values():
                broker.start()
            # Targets take turns, several times: on a shared machine the load drifts, and
            # interleaving spreads the drift over every target alike.
            for rep in range(args.repeat):
                runs: dict[str, Callable[[int, list[list[bytes]]], None]] = {
                    "redis appendfsync always": redis_always.runner(),
                    "redis persistence off": redis_off.runner(),
                }
                for d, broker in brokers.items():
                    runs[f"broker durability {d}"] = broker.runner(broker.setup(args.clients, rep))
                for name, run in runs.items():
                    rates.setdefault(name, []).append(measure(run, work))
        finally:
            redis_always.stop()
            redis_off.stop()
            for broker in brokers.values():
                broker.stop()
        sync = brokers["sync"]
        journal_line = re.findall(r"journal closed: .*", sync.log.read_text())
        t0 = time.perf_counter()
        sync.start()
        ready = time.perf_counter() - t0
        sync.stop()
        found = re.findall(
            r"reloaded \d+ persistent pages in [\d.]+ s \(\d+ pages/s\)", sync.log.read_text()
        )
        reload_line = (
            found[-1] if found else "no reload line in the log"
        ) + f"; ready after {ready:.2f} s"

    results = {name: statistics.median(r) for name, r in rates.items()}
    print(f"median of {args.repeat} interleaved runs (pages/s; all runs in brackets):")
    for name, rate in results.items():
        runs_text = ", ".join(f"{r:.0f}" for r in rates[name])
        print(f"  {name:28s} {rate:10.0f} pages/s   [{runs_text}]")
    r = results
    print(
        f"  sync / redis appendfsync always: {r['broker durability sync'] / r['redis appendfsync always']:.2f}x"
    )
    print(
        f"  none / redis persistence off:    {r['broker durability none'] / r['redis persistence off']:.2f}x"
    )
    print(
        f"  sync / none (cost of durability): {r['broker durability sync'] / r['broker durability none']:.2f}x"
    )
    print(f"  journal: {journal_line[-1] if journal_line else 'no journal stats in the log'}")
    print(f"  journal reload of {n * args.repeat} pages: {reload_line}")


if __name__ == "__main__":
    main()
