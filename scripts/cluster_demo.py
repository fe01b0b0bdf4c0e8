"""``make cluster-demo``: three brokers as one pool over a real Redis Cluster and PostgreSQL.

Starts a Redis Cluster of 3 masters + 3 replicas on loopback (``scripts/redis-cluster.sh``), a
fresh database on the PostgreSQL server (``TMEM_DEMO_PG``, default the local one on 5432),
and three ``tmem-broker serve --cluster`` processes. Simulated guests, each talking to a
broker picked at random (their agents follow the 307 to their home), write pages of real file
contents (``/usr/lib``, so guests of the same image share contents); the demo then prints the
pooled ``/v1/stats`` as any broker shows it, with the per-broker breakdown and the guests'
homes; kills one broker with SIGKILL and prints how long until its guests had new homes and
answered again, and that every acknowledged page read back byte-exact. Everything started is
stopped (and the database dropped) at the end. ``python -m scripts.cluster_demo --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from guest_agent.client import TmemClient
from scripts.cluster_brokers import ClusterBrokers
from scripts.pgdb import temp_database
from scripts.procs import BrokerProcess
from scripts.redis_proc import start_cluster

PG = os.environ.get("TMEM_DEMO_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")


_IMAGE: list[bytes] = []


def _image(limit: int) -> list[bytes]:
    """Pages of real file contents from /usr/lib (the guests' common "image"), read once."""
    if not _IMAGE:
        for path in sorted(Path("/usr/lib").rglob("*.so*")):
            if len(_IMAGE) >= limit:
                break
            try:
                data = path.read_bytes()[: 64 * 4096]
            except OSError:
                continue
            for off in range(0, len(data) - 4095, 4096):
                _IMAGE.append(data[off : off + 4096])
    return _IMAGE


def _pages(count: int, seed: int) -> list[bytes]:
    """A guest's pages: a random share of the image (guests of one image share contents)."""
    image = _image(count * 3)
    return random.Random(seed).sample(image, min(count, len(image)))


def _port_of(broker_id: str, brokers: list[BrokerProcess]) -> int:
    return brokers[int(broker_id.removeprefix("b"))].port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guests", type=int, default=6)
    parser.add_argument("--pages", type=int, default=2000, help="pages per guest")
    parser.add_argument("--lease", type=float, default=2.0, help="lease seconds")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="tmem-cluster-demo-"))
    with ExitStack() as stack:
        rc = start_cluster(work / "redis")  # 3 masters + 3 replicas on free loopback ports
        stack.callback(rc.down)
        db = stack.enter_context(temp_database(PG, prefix="tmem_demo"))
        pool_of = ClusterBrokers(work, rc.seeds, db, n=3, lease_s=args.lease, capacity="512MiB")
        stack.enter_context(pool_of)
        return _run(args, pool_of.brokers, rc.ports[0])


def _run(args: argparse.Namespace, brokers: list[BrokerProcess], base: int) -> int:
    """The demo proper, once the cluster, the database and the brokers run."""
    print(f"3 brokers: {', '.join(b.url for b in brokers)}; Redis Cluster on {base}..")

    written: dict[int, tuple[str, int, dict[tuple[int, int], bytes]]] = {}
    contents = [_pages(args.pages, seed=g) for g in range(args.guests)]
    began = time.perf_counter()
    for g in range(args.guests):
        gid, token = brokers[g % 3].new_guest(f"vm-{g}")
        pages = contents[g]
        entry = random.Random(g).choice(brokers)
        with TmemClient(entry.url, token, timeout=30) as client:
            pool = client.create_pool("persistent")
            results = client.put_many(pool, [(1, i, p) for i, p in enumerate(pages)])
            kept = {(1, i): p for i, (p, r) in enumerate(zip(pages, results, strict=True)) if r}
            written[gid] = (token, pool, kept)
            print(
                f"  guest {gid}: entered at {entry.url}, home {client.base_url}, "
                f"{len(kept)}/{len(pages)} pages stored"
            )
    took = time.perf_counter() - began
    total = sum(len(k) for _, _, k in written.values())
    print(f"{total} pages put in {took:.1f} s ({total / took:,.0f} pages/s through 3 brokers)")

    time.sleep(args.lease / 2)  # every broker has published its figures since (L/4)
    stats: dict[str, Any] = brokers[2].json("GET", "/v1/stats")
    print("\npooled /v1/stats (asked of b2):")
    for key in (
        "logical_pages",
        "unique_pages",
        "zero_pages",
        "persistent_pages",
        "puts",
        "puts_stored",
        "dedup_ratio",
    ):
        print(f"  {key:>18}: {stats.get(key)}")
    for b in stats["brokers"]:
        s = b["stats"]
        print(
            f"  {b['broker_id']}: alive={b['alive']} logical_pages={s.get('logical_pages')}"
            f" puts={s.get('puts')} guests={len(s.get('guests', []))}"
        )
    homes = {g["guest_id"]: g["home_broker"] for g in brokers[0].json("GET", "/v1/guests")}
    print(f"homes: {json.dumps(homes)}")

    # what a redirect costs: a fresh agent per get, entering at the home or at another
    gid0 = next(iter(written))
    token0, pool0, kept0 = written[gid0]
    home0 = next(b for b in brokers if b.url.endswith(str(_port_of(homes[gid0], brokers))))
    away0 = next(b for b in brokers if b is not home0)
    handle0 = next(iter(kept0))
    for label, entry in (("at its home", home0), ("elsewhere (307)", away0)):
        t0 = time.perf_counter()
        for _ in range(200):
            with TmemClient(entry.url, token0, timeout=10) as client:
                assert client.get(pool0, *handle0) == kept0[handle0]
        per = (time.perf_counter() - t0) / 200 * 1e6
        print(f"a fresh agent's first get, entering {label}: {per:,.0f} µs")

    # kill -9 the broker serving the most guests; time until each of its guests answers
    victim_id = max({"b0", "b1", "b2"}, key=lambda b: list(homes.values()).count(b))
    victim = brokers[int(victim_id[1])]
    orphans = [g for g, h in homes.items() if h == victim_id]
    victim.kill()
    killed = time.perf_counter()
    survivor = next(b for b in brokers if b is not victim)
    waits = []
    for gid in orphans:
        token = written[gid][0]
        while True:
            try:
                with TmemClient(survivor.url, token, timeout=5) as client:
                    client.self_info()
                    break
            except Exception:
                time.sleep(0.05)
        waits.append(time.perf_counter() - killed)
    if waits:
        print(
            f"\nkilled {victim_id} (SIGKILL): its {len(orphans)} guests answered again "
            f"after {min(waits):.2f}-{max(waits):.2f} s (lease {args.lease} s)"
        )
    for gid, (token, pool, kept) in written.items():
        with TmemClient(survivor.url, token, timeout=30) as client:
            got = client.get_many(pool, sorted(kept))
        assert got == [kept[h] for h in sorted(kept)], f"guest {gid} lost pages"
    print(f"audit: all {total} acknowledged pages read back byte-exact through {survivor.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
