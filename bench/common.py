"""What the benches share: the processes they start on free loopback ports, and figures.

::

    with broker_process(tmp, durability="none") as broker:     # tests.e2e.brokerproc
        guest_id, token = broker.new_guest("bench")
    with redis_server(tmp, "off") as r:                        # redis.Redis, persistence off
        r.set("k", page)
    with redis_server(tmp, "always") as r:                     # appendonly yes, appendfsync always
        ...
    with plain_client(r) as rp:                                # the same server, no hiredis
        rp.get("k")
    with nbdkit_memory("256MiB") as uri:                       # "nbd://127.0.0.1:PORT"
    with nbdkit_memory("256MiB", unix=tmp / "k.sock") as uri:  # "nbd+unix:///?socket=..."
        ...
    rss_bytes(pid); summary(latencies_us); machine()

Benchmarks are not tests: nothing here asserts on a time.
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest.mock import patch

import redis
from redis._parsers import _RESP2Parser
from redis.connection import DefaultParser
from redis.utils import HIREDIS_AVAILABLE

from scripts.procs import BrokerProcess, dies_with_us, free_port

__all__ = [
    "BrokerProcess",
    "broker_process",
    "free_port",
    "hiredis_in_use",
    "machine",
    "nbdkit_memory",
    "plain_client",
    "redis_server",
    "rss_bytes",
    "summary",
    "wait_port",
]


def wait_port(port: int, timeout: float = 30) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


@contextmanager
def broker_process(
    tmp: Path,
    *,
    durability: str = "none",
    capacity: str = "8GiB",
    env: Mapping[str, str] | None = None,
) -> Iterator[BrokerProcess]:
    """A real ``tmem-broker serve`` with its own data dir under ``tmp``; ``env`` adds
    ``TMEM_...`` settings that have no flag of their own (``TMEM_COMPRESS``)."""
    data = tmp / f"broker-{durability}-{time.monotonic_ns()}"
    broker = BrokerProcess(data, durability=durability, capacity=capacity)
    # BrokerProcess passes on this process's environment when it starts the broker: the
    # extra settings are in it only while it does
    with patch.dict(os.environ, dict(env or {})):
        broker.start()
    try:
        yield broker
    finally:
        broker.stop()


REDIS_MODES = {
    "off": ["--appendonly", "no"],
    "always": ["--appendonly", "yes", "--appendfsync", "always"],
}


@contextmanager
def redis_server(tmp: Path, mode: str = "off") -> Iterator[redis.Redis]:
    """A private ``redis-server`` on a free port (never the shared one on 6379); ``mode`` is
    ``off`` (no persistence) or ``always`` (AOF, fsync before every reply)."""
    port = free_port()
    workdir = tmp / f"redis-{mode}-{port}"
    workdir.mkdir(parents=True)
    proc = subprocess.Popen(
        dies_with_us(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir",
                      str(workdir), "--save", "", *REDIS_MODES[mode]]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield client
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def plain_client(r: redis.Redis) -> Iterator[redis.Redis]:
    """A second client of ``r``'s server that parses replies with redis-py's pure-Python
    parser (what redis-py does without ``hiredis`` installed)."""
    kwargs = r.connection_pool.connection_kwargs
    pool = redis.ConnectionPool(
        host=kwargs.get("host", "localhost"), port=kwargs["port"], parser_class=_RESP2Parser
    )
    client = redis.Redis(connection_pool=pool)
    try:
        client.ping()
        yield client
    finally:
        client.close()
        pool.disconnect()


def hiredis_in_use() -> bool:
    """Whether redis-py's default parser is hiredis (``redis[hiredis]`` installed)."""
    return bool(HIREDIS_AVAILABLE) and DefaultParser.__name__ == "_HiredisParser"


@contextmanager
def nbdkit_memory(size: str, *, unix: Path | None = None) -> Iterator[str]:
    """``nbdkit memory SIZE`` (the reference NBD server) on a free port, or on the Unix socket
    ``unix``; yields its URI."""
    port = free_port()
    where = ["-U", str(unix)] if unix is not None else ["-i", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(
        dies_with_us(["nbdkit", "-f", *where, "memory", size.replace("iB", "")]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if unix is not None:
            deadline = time.monotonic() + 30
            while not unix.is_socket():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nbdkit did not listen on {unix}")
                time.sleep(0.05)
            yield f"nbd+unix:///?socket={unix}"
        else:
            wait_port(port)
            yield f"nbd://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (``VmRSS`` in /proc), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def summary(us: list[float]) -> dict[str, float]:
    """p50, p99 (µs) and operations/s of a list of latencies in µs."""
    s = sorted(us)
    return {
        "p50_us": statistics.median(s),
        "p99_us": s[min(len(s) - 1, int(len(s) * 0.99))],
        "ops_per_s": len(s) / (sum(s) / 1e6),
    }


def machine() -> dict[str, Any]:
    """Where the figures come from: cores, CPU model, load average now."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "kernel": platform.release(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
