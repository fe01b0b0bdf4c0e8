"""What the guest agent's client costs: single put/get latency and batch throughput.

Starts a real ``tmem-broker serve`` on a free port (or uses ``--broker URL --admin-token T``),
makes a guest, then measures through :class:`guest_agent.TmemClient`:

- single ``put`` and ``get`` round trips (p50, p99, ops/s), next to the same calls made with
  httpx on a keep-alive connection (the baseline, measured in the same run);
- the client's own cost per operation, against an in-memory transport answering at once;
- ``put_many``/``get_many`` throughput in pages/s (batches of ``--batch`` pages);
- ``AsyncTmemClient`` single puts from ``--tasks`` concurrent tasks over its connection pool.

Run: ``.venv/bin/python bench/agent_bench.py [--ops 5000] [--pages 100000] [--durability none]``.
Not a test: it never fails on a time. On a shared 2-core machine client and broker compete for
the CPUs and figures are noisy; compare ratios from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from guest_agent import AsyncTmemClient, TmemClient  # noqa: E402
from guest_agent.transport import MockTransport, Response  # noqa: E402
from schemas.batch import STATUS_DONE, encode_results  # noqa: E402
from scripts.procs import BrokerProcess  # noqa: E402


def pages(n: int, salt: int) -> list[bytes]:
    # distinct contents, so dedup does not flatter the figures
    return [(salt << 40 | i).to_bytes(8, "big") * 512 for i in range(n)]


def latencies(fn: Callable[[int], object], n: int) -> list[float]:
    out = []
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        fn(i)
        out.append((clock() - t0) / 1000.0)
    return out


def summary(name: str, us: list[float]) -> dict[str, float]:
    us_sorted = sorted(us)
    p50 = statistics.median(us_sorted)
    p99 = us_sorted[min(len(us_sorted) - 1, int(len(us_sorted) * 0.99))]
    ops = len(us) / (sum(us) / 1e6)
    print(f"  {name:<34} p50 {p50:8.1f} µs   p99 {p99:8.1f} µs   {ops:9.0f} ops/s")
    return {"p50_us": p50, "p99_us": p99, "ops_per_s": ops}


def rate(name: str, count: int, seconds: float) -> float:
    r = count / seconds
    print(f"  {name:<34} {r:12.0f} pages/s  ({count} pages in {seconds:.3f} s)")
    return r


def bench(url: str, token: str, args: argparse.Namespace) -> dict[str, object]:
    results: dict[str, object] = {}
    n = args.ops
    data = pages(n, 1)
    print(f"single operations ({n} each, keep-alive, one connection)")
    with TmemClient(url, token) as client:
        pool = client.create_pool("persistent")
        for i in range(200):  # warm up the connection and the broker
            client.put(pool, 9, i, data[i])
        results["put"] = summary(
            "TmemClient.put", latencies(lambda i: client.put(pool, 1, i, data[i]), n)
        )
        results["get"] = summary("TmemClient.get", latencies(lambda i: client.get(pool, 1, i), n))

        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, headers=headers) as hx:
            put_h = {**headers, "Content-Type": "application/octet-stream"}
            results["httpx_put"] = summary(
                "httpx put (baseline)",
                latencies(
                    lambda i: hx.put(
                        f"/v1/pools/{pool}/objects/2/pages/{i}", content=data[i], headers=put_h
                    ),
                    n,
                ),
            )
            results["httpx_get"] = summary(
                "httpx get (baseline)",
                latencies(lambda i: hx.get(f"/v1/pools/{pool}/objects/2/pages/{i}"), n),
            )
        put_ratio = results["httpx_put"]["p50_us"] / results["put"]["p50_us"]  # type: ignore[index]
        get_ratio = results["httpx_get"]["p50_us"] / results["get"]["p50_us"]  # type: ignore[index]
        print(f"  p50 ratio httpx/TmemClient: put {put_ratio:.2f}x, get {get_ratio:.2f}x")

        print(f"batches ({args.pages} pages, {args.batch} per request)")
        batch_client = TmemClient(url, token, max_batch_ops=args.batch)
        bulk = pages(args.pages, 2)
        items = [(i >> 4, i & 0xFFFF_FFFF, bulk[i]) for i in range(args.pages)]
        t0 = time.perf_counter()
        stored = batch_client.put_many(pool, items)
        results["put_many_pages_per_s"] = rate(
            "TmemClient.put_many", args.pages, time.perf_counter() - t0
        )
        assert all(stored), "the bench guest has no quota: every put should be stored"
        handles = [(oid, index) for oid, index, _ in items]
        t0 = time.perf_counter()
        got = batch_client.get_many(pool, handles)
        results["get_many_pages_per_s"] = rate(
            "TmemClient.get_many", args.pages, time.perf_counter() - t0
        )
        assert got[123] == bulk[123] and got[-1] == bulk[-1]
        batch_client.close()
        client.destroy_pool(pool)

    print("client cost alone (in-memory transport answering at once)")
    canned_put = Response(204)
    canned_get = Response(200, data[0])
    mock = TmemClient(
        "http://x",
        token,
        transport=MockTransport(lambda r: canned_put if r.method == "PUT" else canned_get),
    )
    results["client_put_cost"] = summary(
        "TmemClient.put, no network", latencies(lambda i: mock.put(0, 1, i, data[i]), n)
    )
    results["client_get_cost"] = summary(
        "TmemClient.get, no network", latencies(lambda i: mock.get(0, 1, i), n)
    )
    bulk = pages(args.batch, 3)
    put_answer = Response(200, encode_results([(STATUS_DONE, None)] * args.batch))
    get_answer = Response(200, encode_results([(STATUS_DONE, p) for p in bulk]))
    mock_batch = TmemClient(
        "http://x",
        token,
        max_batch_ops=args.batch,
        transport=MockTransport(
            lambda r: put_answer if bytes(r.body[:1]) == b"\x01" else get_answer
        ),
    )
    items = [(1, i, bulk[i]) for i in range(args.batch)]
    handles = [(1, i) for i in range(args.batch)]
    rounds = max(1, args.pages // args.batch)
    t0 = time.perf_counter()
    for _ in range(rounds):
        mock_batch.put_many(0, items)
    results["client_put_many_pages_per_s"] = rate(
        "put_many, no network", rounds * args.batch, time.perf_counter() - t0
    )
    t0 = time.perf_counter()
    for _ in range(rounds):
        mock_batch.get_many(0, handles)
    results["client_get_many_pages_per_s"] = rate(
        "get_many, no network", rounds * args.batch, time.perf_counter() - t0
    )

    print(f"async client ({args.tasks} tasks, {n} single puts in all)")
    results["async_put_ops_per_s"] = asyncio.run(async_puts(url, token, data, args.tasks))
    return results


async def async_puts(url: str, token: str, data: list[bytes], tasks: int) -> float:
    async with AsyncTmemClient(url, token, max_connections=tasks) as client:
        pool = await client.create_pool("persistent")
        per_task = len(data) // tasks

        async def worker(k: int) -> None:
            for i in range(k * per_task, (k + 1) * per_task):
                await client.put(pool, 3, i, data[i])

        await worker(0)  # warm up
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(tasks)))
        seconds = time.perf_counter() - t0
        await client.destroy_pool(pool)
    r = per_task * tasks / seconds
    print(f"  {'AsyncTmemClient.put x' + str(tasks):<34} {r:9.0f} ops/s")
    return r


CANNED_SERVER = r"""
import socket, sys, threading
sys.path.insert(0, sys.argv[1])
PAGE = b"\x5a" * 4096

def serve(conn):
    rfile = conn.makefile("rb")
    with conn:
        while True:
            line = rfile.readline()
            if not line:
                return
            method, target, _ = line.split(b" ", 2)
            length = 0
            while (h := rfile.readline()) not in (b"\r\n", b""):
                if h.lower().startswith(b"content-length:"):
                    length = int(h.split(b":")[1])
            body = rfile.read(length)
            if target.endswith(b"/batch"):
                # all puts or all gets (what the bench sends): answer without decoding
                if len(body) % 4125 == 0:
                    out = b"\x00" * (len(body) // 4125)
                else:
                    out = (b"\x00" + PAGE) * (len(body) // 29)
                head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(out)
                conn.sendall(head + out)
            elif method == b"GET":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4096\r\n\r\n" + PAGE)
            else:
                conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
while True:
    c, _ = srv.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def floor(args: argparse.Namespace) -> dict[str, object]:
    """The client against a canned-answer raw-socket server: what the client and loopback
    cost without the broker (the floor under every broker figure above)."""
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, "-c", CANNED_SERVER, str(ROOT)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        out: dict[str, object] = {}
        n = args.ops
        data = pages(n, 4)
        print("floor: the client against a canned-answer raw-socket server (no broker)")
        with TmemClient(url, "t", max_batch_ops=args.batch) as client:
            for i in range(200):
                client.put(0, 1, i, data[i])
            out["put"] = summary(
                "TmemClient.put, canned server",
                latencies(lambda i: client.put(0, 1, i, data[i]), n),
            )
            out["get"] = summary(
                "TmemClient.get, canned server", latencies(lambda i: client.get(0, 1, i), n)
            )
            bulk = pages(args.pages, 5)
            items = [(1, i, bulk[i]) for i in range(args.pages)]
            t0 = time.perf_counter()
            client.put_many(0, items)
            out["put_many_pages_per_s"] = rate(
                "put_many, canned server", args.pages, time.perf_counter() - t0
            )
            t0 = time.perf_counter()
            client.get_many(0, [(1, i) for i in range(args.pages)])
            out["get_many_pages_per_s"] = rate(
                "get_many, canned server", args.pages, time.perf_counter() - t0
            )
        return out
    finally:
        proc.kill()
        proc.wait()


def new_guest(url: str, admin: str) -> str:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}) as hx:
        r = hx.post("/v1/guests", json={"name": f"agent-bench-{time.time_ns()}"})
        r.raise_for_status()
        return str(r.json()["token"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", help="use this broker instead of starting one")
    parser.add_argument("--admin-token", help="admin token of --broker")
    parser.add_argument("--durability", default="none", choices=["none", "sync"])
    parser.add_argument("--ops", type=int, default=5000, help="single operations per figure")
    parser.add_argument("--pages", type=int, default=100_000, help="pages per batch figure")
    parser.add_argument("--batch", type=int, default=1024, help="pages per batch request")
    parser.add_argument("--tasks", type=int, default=4, help="async client tasks")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument(
        "--no-floor", action="store_true", help="skip the canned-answer server figures"
    )
    args = parser.parse_args()
    if args.broker:
        if not args.admin_token:
            parser.error("--broker needs --admin-token")
        results = bench(args.broker, new_guest(args.broker, args.admin_token), args)
    else:
        from scripts.procs import ADMIN

        with (
            tempfile.TemporaryDirectory() as tmp,
            BrokerProcess(
                Path(tmp) / "data", durability=args.durability, capacity="4GiB"
            ) as broker,
        ):
            load = os.getloadavg()
            print(f"broker {broker.url} (durability {args.durability}); load average {load[0]:.1f}")
            results = bench(broker.url, new_guest(broker.url, ADMIN), args)
    if not args.no_floor:
        results["floor"] = floor(args)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
