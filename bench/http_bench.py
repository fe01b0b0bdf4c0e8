"""Requests per second of the broker's hot routes, measured over HTTP against a real process.

Starts ``tmem-broker serve`` on a free port (or uses ``--url`` with ``--admin-token``), makes a
guest and a pool, then drives one keep-alive connection with a raw-socket HTTP/1.1 client (no
httpx: its own cost would dominate) and prints:

* single-page PUT and GET requests/s (and p50 latency),
* a 256-page batch of puts and of gets, in pages/s,
* the baseline measured in the same run: ``GET /healthz``, a FastAPI route, and the ratios.

Run: ``.venv/bin/python bench/http_bench.py [--seconds 3] [--durability none|sync]``.
Not a test: it never fails on a time. One client and the broker share this machine's cores.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

PAGE = 4096
HEADER = struct.Struct(">BQQQI")


class RawClient:
    """A minimal HTTP/1.1 keep-alive client: one request, one response, in order."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.host = f"{host}:{port}".encode()
        self.auth = f"Bearer {token}".encode()
        self.buf = b""

    def request(
        self, method: bytes, path: bytes, body: bytes = b"", ctype: bytes = b""
    ) -> tuple[int, bytes]:
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\n" % (
            method,
            path,
            self.host,
            self.auth,
        )
        if body or method in (b"PUT", b"POST"):
            head += b"Content-Length: %d\r\n" % len(body)
            if ctype:
                head += b"Content-Type: %s\r\n" % ctype
        self.sock.sendall(head + b"\r\n" + body)
        return self._response()

    def _response(self) -> tuple[int, bytes]:
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("server closed the connection")
            rest += chunk
        self.buf = rest[length:]
        return status, rest[:length]

    def close(self) -> None:
        self.sock.close()


def measure(seconds: float, one: Callable[[int], None]) -> tuple[float, float]:
    """Run ``one(i)`` for about ``seconds``; returns (operations/s, median latency in µs)."""
    for i in range(200):  # warm-up
        one(i)
    lat: list[float] = []
    n = 0
    start = time.perf_counter()
    end = start + seconds
    now = start
    while now < end:
        t = time.perf_counter()
        one(n)
        now = time.perf_counter()
        lat.append(now - t)
        n += 1
    return n / (now - start), statistics.median(lat) * 1e6


def admin_call(url: str, token: str, method: str, path: str, body: object) -> dict[str, object]:
    request = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        result: dict[str, object] = json.loads(r.read())
        return result


def start_broker(
    durability: str, workdir: Path, admin_token: str
) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("tmem-broker")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "broker.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TMEM_")}
    env["TMEM_ADMIN_TOKEN"] = admin_token
    proc = subprocess.Popen(
        [*cmd, "serve", "--port", str(port), "--data-dir", str(workdir), "--durability", durability,
         "--capacity", "2GiB", "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                conn.close()
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the broker did not start")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--durability", choices=["none", "sync"], default="none")
    parser.add_argument("--url", help="use a running broker instead of starting one")
    parser.add_argument("--admin-token", default=os.environ.get("TMEM_ADMIN_TOKEN"))
    parser.add_argument("--batch", type=int, default=256, help="pages per batch")
    args = parser.parse_args()

    proc = None
    tmp = tempfile.TemporaryDirectory(prefix="tmem-http-bench-")
    if args.url:
        url, admin = args.url.rstrip("/"), args.admin_token
        if not admin:
            raise SystemExit("--url needs --admin-token (or TMEM_ADMIN_TOKEN)")
    else:
        admin = "bench-admin-token"
        proc, url = start_broker(args.durability, Path(tmp.name), admin)
    try:
        name = f"bench-{os.getpid()}-{int(time.time())}"
        token = str(admin_call(url, admin, "POST", "/v1/guests", {"name": name})["token"])
        host, port = url.removeprefix("http://").split(":")
        client = RawClient(host, int(port), token)
        client.auth = f"Bearer {token}".encode()
        status, body = client.request(
            b"POST", b"/v1/pools", b'{"kind": "persistent"}', b"application/json"
        )
        assert status == 201, body
        pool = json.loads(body)["pool_id"]
        rng = random.Random(1)
        pages = [rng.randbytes(PAGE) for _ in range(1024)]

        def health(_i: int) -> None:
            assert client.request(b"GET", b"/healthz")[0] == 200

        def put(i: int) -> None:
            path = b"/v1/pools/%d/objects/7/pages/%d" % (pool, i % 4096)
            assert (
                client.request(b"PUT", path, pages[i % 1024], b"application/octet-stream")[0] == 204
            )

        def get(i: int) -> None:
            path = b"/v1/pools/%d/objects/7/pages/%d" % (pool, i % 4096)
            assert client.request(b"GET", path)[0] == 200

        n = args.batch
        put_batch = b"".join(HEADER.pack(1, 0, 0, 9, i) + pages[i % 1024] for i in range(n))
        get_batch = b"".join(HEADER.pack(2, 0, 0, 9, i) for i in range(n))
        batch_path = b"/v1/pools/%d/batch" % pool

        def batch_put(_i: int) -> None:
            assert (
                client.request(b"POST", batch_path, put_batch, b"application/x-tmem-batch")[0]
                == 200
            )

        def batch_get(_i: int) -> None:
            status, body = client.request(
                b"POST", batch_path, get_batch, b"application/x-tmem-batch"
            )
            assert status == 200 and len(body) == n * (1 + PAGE)

        s = args.seconds
        for i in range(4096):  # every handle the get loop reads holds a page
            put(i)
        base, base_p50 = measure(s, health)
        put_rps, put_p50 = measure(s, put)
        get_rps, get_p50 = measure(s, get)
        bput, _ = measure(s, batch_put)
        bget, _ = measure(s, batch_get)
        client.close()
        print(
            f"tmem broker over HTTP, durability={args.durability}, one keep-alive raw-socket client"
        )
        print(f"  baseline GET /healthz (FastAPI route) {base:9.0f} req/s   p50 {base_p50:6.0f} µs")
        print(
            f"  PUT one page (Starlette route)        {put_rps:9.0f} req/s   p50 {put_p50:6.0f} µs   {put_rps / base:4.2f}x baseline"
        )
        print(
            f"  GET one page (Starlette route)        {get_rps:9.0f} req/s   p50 {get_p50:6.0f} µs   {get_rps / base:4.2f}x baseline"
        )
        print(
            f"  batch of {n} puts                    {bput * n:9.0f} pages/s ({bput:.0f} batches/s)   {bput * n / put_rps:4.1f}x single puts"
        )
        print(
            f"  batch of {n} gets                    {bget * n:9.0f} pages/s ({bget:.0f} batches/s)   {bget * n / get_rps:4.1f}x single gets"
        )
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        tmp.cleanup()


if __name__ == "__main__":
    main()
