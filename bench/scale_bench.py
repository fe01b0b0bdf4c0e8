"""The data plane of cluster mode against what it stands on: a real Redis Cluster on loopback.

Run: ``.venv/bin/python -m bench.scale_bench [--quick]`` (also section h of ``bench.run_all``).
Starts 3 masters + 3 replicas (``scripts/redis-cluster.sh``, appendfsync always) and prints,
in one run (medians of rounds, the pairs taking turns):

1. Redis memory per unique stored page per copy / 4096 (aim <= 1.1): the growth of the
   masters' ``used_memory`` (one copy; each replica holds another) per unique page stored
   through a ClusterEngine, handle maps included; also ``MEMORY USAGE`` of one content and the
   cost of one more handle (the same content at many handles).
2. One image stored through 3 engines (standing for 3 brokers) against the ideal (the image
   once plus two more guests' handles): aim within 5 %.
3. Durable 256-page batches through ``ClusterEngine.batch`` (references, fenced handle maps,
   WAIT) against redis-py pipelines doing SET + WAIT 1 per node directly (aim >= 0.5x).
4. and 5. with real broker processes and PostgreSQL (``bench/scale_brokers.py``): broker CPU
   per page through 1, 2 and 3 brokers (aim: flat within 15 %), and gets through a Redis
   master failover (p99 <= 5x steady state; outage <= 2 x node timeout + lease).

Not a test: it never fails on a time.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from redis.cluster import RedisCluster

from bench import scale_brokers
from broker.cluster.engine import ClusterEngine
from broker.cluster.redis_store import RedisPages
from broker.core.model import CoreConfig
from schemas.batch import OP_PUT, PAGE_SIZE, STATUS_DONE

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "redis-cluster.sh"
BATCH = 256


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextmanager
def redis_cluster(tmp: Path, masters: int = 3, replicas: int = 1) -> Iterator[list[str]]:
    """A private cluster under ``tmp``: yields its seeds; stopped at the end."""
    count = masters * (1 + replicas)
    for _ in range(100):
        base = random.randrange(20000, 45000 - count)
        if all(_free(base + i) and _free(base + i + 10000) for i in range(count)):
            break
    env = dict(os.environ, REDIS_NODE_TIMEOUT="2000")
    subprocess.run(
        ["bash", str(SCRIPT), "up", str(tmp), str(base), str(masters), str(replicas)],
        check=True,
        env=env,
        capture_output=True,
    )
    try:
        yield [f"127.0.0.1:{base + i}" for i in range(count)]
    finally:
        subprocess.run(["bash", str(SCRIPT), "down", str(tmp)], check=True)


def _engine(seeds: list[str], ns: str, broker: str) -> ClusterEngine:
    return ClusterEngine(CoreConfig(capacity_bytes=1 << 40), RedisPages(seeds, ns), broker)


def _guest(engine: ClusterEngine, guest_id: int) -> int:
    engine.add_guest(guest_id, name=f"g{guest_id}")
    pool = engine.create_pool(guest_id, "persistent")
    engine.adopt(guest_id, 1)
    return pool


def _used(rc: Any, field: str = "used_memory_dataset") -> int:
    """A memory figure summed over the masters: by default ``used_memory_dataset`` (keys and
    values: ``used_memory`` less the fixed overheads, of which the replication backlog, up to
    1 MiB a master, fills while a run writes and would be charged to the pages)."""
    return sum(int(rc.get_redis_connection(n).info("memory")[field]) for n in rc.get_primaries())


def _put_all(engine: ClusterEngine, guest: int, pool: int, pages: list[bytes]) -> None:
    for start in range(0, len(pages), BATCH):
        ops = [(OP_PUT, start // BATCH, i, p) for i, p in enumerate(pages[start : start + BATCH])]
        assert all(s == STATUS_DONE for s, _ in engine.batch(guest, pool, ops))


def memory(seeds: list[str], pages: int) -> dict[str, float]:
    """Section 1: bytes per unique page and per handle."""
    e = _engine(seeds, "mem", "b1")
    rc = e.pages.rc
    try:
        pool = _guest(e, 1)
        before, before_all = _used(rc), _used(rc, "used_memory")
        _put_all(e, 1, pool, [os.urandom(PAGE_SIZE) for _ in range(pages)])
        per_page = (_used(rc) - before) / pages
        per_page_all = (_used(rc, "used_memory") - before_all) / pages
        one = next(
            iter(rc.scan_iter(match=b"mem:c{*", count=100, target_nodes=RedisCluster.PRIMARIES))
        )
        usage = int(rc.memory_usage(one))
        # one more handle: the same content at ``pages`` new handles of another guest
        pool2 = _guest(e, 2)
        same = os.urandom(PAGE_SIZE)
        before = _used(rc)
        _put_all(e, 2, pool2, [same] * pages)
        per_handle = (_used(rc) - before - usage) / pages
        hashes = list(
            rc.scan_iter(match=b"mem:{g2}:o:*", count=1000, target_nodes=RedisCluster.PRIMARIES)
        )
        per_handle_usage = sum(int(rc.memory_usage(k)) for k in hashes) / pages
        return {
            "bytes_per_unique_page": per_page,
            "ratio_per_page": per_page / PAGE_SIZE,
            "used_memory_per_page": per_page_all,
            "memory_usage_one_content": usage,
            "bytes_per_handle": per_handle,
            "bytes_per_handle_usage": per_handle_usage,
        }
    finally:
        e.pages.close()


def dedup(seeds: list[str], pages: int) -> dict[str, float]:
    """Section 2: one image through 3 engines against storing it once plus two guests' handles."""
    engines = [_engine(seeds, "dedup3", f"b{i}") for i in range(3)]
    single = _engine(seeds, "dedup1", "b9")
    rc = single.pages.rc
    try:
        image = [os.urandom(PAGE_SIZE) for _ in range(pages)]
        handles_only = [os.urandom(PAGE_SIZE)] * pages  # handles to one content: handle cost
        before = _used(rc)
        _put_all(single, 100, _guest(single, 100), image)
        once = _used(rc) - before
        before = _used(rc)
        _put_all(single, 101, _guest(single, 101), handles_only)
        handle_cost = _used(rc) - before - PAGE_SIZE
        before = _used(rc)
        for gid, eng in zip((1, 2, 3), engines, strict=True):
            _put_all(eng, gid, _guest(eng, gid), image)
        three = _used(rc) - before
        ideal = once + 2 * handle_cost
        return {"image_once": once, "three_brokers": three, "ideal": ideal, "ratio": three / ideal}
    finally:
        for eng in [*engines, single]:
            eng.pages.close()


def durable(seeds: list[str], rounds: int, batches: int) -> dict[str, list[float]]:
    """Section 3: pages/s of durable 256-page batches, engine vs SET + WAIT pipelines."""
    e = _engine(seeds, "dur", "b1")
    pool = _guest(e, 1)
    rc: Any = e.pages.rc
    clients: dict[str, redis.Redis] = {}
    n = 0

    def fresh() -> list[bytes]:
        nonlocal n
        base = os.urandom(PAGE_SIZE)
        out = []
        for _ in range(BATCH):
            n += 1
            out.append(n.to_bytes(8, "big") + base[8:])
        return out

    def engine_round() -> float:
        pages = [fresh() for _ in range(batches)]
        t = time.perf_counter()
        for b, batch in enumerate(pages):
            ops = [(OP_PUT, b, i, p) for i, p in enumerate(batch)]
            assert all(s == STATUS_DONE for s, _ in e.batch(1, pool, ops))
        return batches * BATCH / (time.perf_counter() - t)

    def redis_round() -> float:
        pages = [fresh() for _ in range(batches)]
        t = time.perf_counter()
        for b, batch in enumerate(pages):
            groups: dict[str, list[tuple[bytes, bytes]]] = {}
            for i, p in enumerate(batch):
                key = b"base:%d:%d:%d" % (n, b, i)
                groups.setdefault(rc.get_node_from_key(key).name, []).append((key, p))
            for name, items in groups.items():
                client = clients.get(name)
                if client is None:
                    host, port = name.rsplit(":", 1)
                    client = clients[name] = redis.Redis(host=host, port=int(port))
                pipe = client.pipeline(transaction=False)
                for key, p in items:
                    pipe.set(key, p)
                pipe.execute_command("WAIT", 1, 500)
                assert pipe.execute()[-1] >= 1
        return batches * BATCH / (time.perf_counter() - t)

    out: dict[str, list[float]] = {"engine": [], "set_wait": []}
    try:
        engine_round()  # warm up both
        redis_round()
        for _ in range(rounds):
            out["engine"].append(engine_round())
            out["set_wait"].append(redis_round())
        return out
    finally:
        for client in clients.values():
            client.close()
        e.pages.close()


def measure(tmp: Path, quick: bool = False) -> dict[str, Any]:
    """Every section in one run, on one private cluster."""
    pages = 1000 if quick else 4000
    with redis_cluster(tmp) as seeds:
        mem = memory(seeds, pages)
        ded = dedup(seeds, pages // 2)
        dur = durable(seeds, 3 if quick else 7, 4 if quick else 10)
    procs = scale_brokers.measure(tmp, quick)
    return {
        "brokers": procs,
        "memory": mem,
        "dedup": ded,
        "durable": dur,
        "durable_ratio": statistics.median(dur["engine"]) / statistics.median(dur["set_wait"]),
        "hiredis": _has_hiredis(),
    }


def _has_hiredis() -> bool:
    try:
        import hiredis  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="tmem-scale-") as tmp:
        r = measure(Path(tmp), args.quick)
    m, d, dur = r["memory"], r["dedup"], r["durable"]
    print(
        f"1. memory per unique page per copy: {m['bytes_per_unique_page']:.0f} B = "
        f"{m['ratio_per_page']:.3f} x 4096 (aim <= 1.1; used_memory_dataset, handle maps "
        f"included; used_memory: {m['used_memory_per_page']:.0f} B); MEMORY USAGE of a content "
        f"{m['memory_usage_one_content']} B; one more handle {m['bytes_per_handle']:.0f} B "
        f"(MEMORY USAGE of the handle hashes: {m['bytes_per_handle_usage']:.0f} B a handle)"
    )
    print(
        f"2. one image through 3 brokers: {d['three_brokers']} B vs ideal {d['ideal']} B "
        f"= {d['ratio']:.3f} (aim <= 1.05)"
    )
    print(
        f"3. durable 256-page batches: engine {statistics.median(dur['engine']):.0f} pages/s, "
        f"SET+WAIT pipelines {statistics.median(dur['set_wait']):.0f} pages/s = "
        f"{r['durable_ratio']:.2f}x (aim >= 0.5; hiredis: {r['hiredis']})"
    )
    for line in scale_brokers.report(r["brokers"]):
        print(line)
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
