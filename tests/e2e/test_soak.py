"""Soak: 32 concurrent agents against one real broker process for several minutes.

Each agent is a guest of its own, in a thread, on the guest agent's own code: frontswap
agents (``Frontswap`` over a persistent pool, with a fallback file), cleancache agents
(``Cleancache`` over a private ephemeral pool) and raw agents (``TmemClient`` put/get/flush and
their batch forms on a persistent pool). Each keeps the truth of what it stored and checks every
answer. At the end every persistent page is read back and compared, and the broker's RSS
(``VmRSS`` of its process, sampled every second) must be flat after the warm-up.

Duration: ``TMEM_SOAK_SECONDS`` (default 180).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from guest_agent import TmemClient
from guest_agent.shims import Cleancache, Frontswap
from tests.e2e.brokerproc import BrokerProcess

AGENTS = 32
SECONDS = float(os.environ.get("TMEM_SOAK_SECONDS", "180"))
WARMUP = 0.3  # of the run
KEYS = 192  # handles per agent: bounds the data held (32 x 192 x 4 KiB ~ 24 MiB)
RSS_GROWTH_LIMIT = 64 << 20  # bytes of RSS growth allowed after the warm-up (generous)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def content(rng: random.Random, agent: int) -> bytes:
    # Mixed contents: mostly unique, some shared by every agent (dedup), some zero pages.
    roll = rng.random()
    if roll < 0.1:
        return bytes(4096)
    if roll < 0.3:
        return bytes([rng.randrange(8)]) * 4096  # one of 8 contents shared by all agents
    return rng.randbytes(4096)


@dataclass
class Tally:
    ops: int = 0
    errors: list[str] = field(default_factory=list)
    verified: int = 0


def frontswap_agent(
    url: str, token: str, n: int, stop: threading.Event, tally: Tally, tmp: Path
) -> None:
    rng = random.Random(n)
    truth: dict[int, bytes] = {}
    with TmemClient(url, token) as client:
        fs = Frontswap(client, fallback=tmp / f"fallback-{n}")
        fs.init(0)
        while not stop.is_set():
            offset = rng.randrange(KEYS)
            roll = rng.random()
            if roll < 0.5:
                page = content(rng, n)
                fs.store(0, offset, page)
                truth[offset] = page
            elif roll < 0.85:
                if offset in truth and fs.load(0, offset) != truth[offset]:
                    tally.errors.append(f"frontswap {n}: wrong page at {offset}")
            elif roll < 0.97:
                fs.invalidate_page(0, offset)
                truth.pop(offset, None)
            else:
                batch = [(rng.randrange(KEYS), content(rng, n)) for _ in range(16)]
                fs.store_many(0, batch)
                truth.update(batch)
            tally.ops += 1
        for offset, page in truth.items():
            if fs.load(0, offset) != page:
                tally.errors.append(f"frontswap {n}: final check failed at {offset}")
            tally.verified += 1
        fs.close(destroy_pool=False)


def cleancache_agent(url: str, token: str, n: int, stop: threading.Event, tally: Tally) -> None:
    rng = random.Random(n)
    truth: dict[tuple[int, int], bytes] = {}
    with TmemClient(url, token) as client:
        cc = Cleancache(client)
        pool = cc.init_fs()
        while not stop.is_set():
            key = (rng.randrange(16), rng.randrange(KEYS // 16))
            roll = rng.random()
            if roll < 0.5:
                page = content(rng, n)
                if cc.put_page(pool, key[0], key[1], page):
                    truth[key] = page
                else:
                    truth.pop(key, None)
            elif roll < 0.9:
                got = cc.get_page(pool, key[0], key[1])
                if got is not None and got != truth.get(key):
                    tally.errors.append(f"cleancache {n}: stale or wrong page at {key}")
                truth.pop(key, None)  # private ephemeral gets are exclusive
            elif roll < 0.98:
                cc.invalidate_page(pool, key[0], key[1])
                truth.pop(key, None)
            else:
                cc.invalidate_inode(pool, key[0])
                for k in [k for k in truth if k[0] == key[0]]:
                    del truth[k]
            tally.ops += 1


def raw_agent(url: str, token: str, n: int, stop: threading.Event, tally: Tally) -> None:
    rng = random.Random(n)
    truth: dict[tuple[int, int], bytes] = {}
    with TmemClient(url, token) as client:
        pool = client.create_pool("persistent")
        while not stop.is_set():
            oid, index = rng.randrange(4), rng.randrange(KEYS // 4)
            roll = rng.random()
            if roll < 0.4:
                page = content(rng, n)
                if not client.put(pool, oid, index, page):
                    tally.errors.append(f"raw {n}: put declined")
                truth[(oid, index)] = page
            elif roll < 0.75:
                got = client.get(pool, oid, index)
                if got != truth.get((oid, index)):
                    tally.errors.append(f"raw {n}: wrong answer at {(oid, index)}")
            elif roll < 0.85:
                client.flush_page(pool, oid, index)
                truth.pop((oid, index), None)
            elif roll < 0.95:
                items = [
                    (rng.randrange(4), rng.randrange(KEYS // 4), content(rng, n)) for _ in range(32)
                ]
                if not all(client.put_many(pool, items)):
                    tally.errors.append(f"raw {n}: batch put declined")
                truth.update({(o, i): p for o, i, p in items})
            else:
                client.flush_object(pool, oid)
                for k in [k for k in truth if k[0] == oid]:
                    del truth[k]
            tally.ops += 1
        handles = sorted(truth)
        for handle, got in zip(handles, client.get_many(pool, handles), strict=True):
            if got != truth[handle]:
                tally.errors.append(f"raw {n}: final check failed at {handle}")
            tally.verified += 1


@pytest.mark.slow
@pytest.mark.timeout(SECONDS + 300)
def test_soak(tmp_path: Path) -> None:
    with BrokerProcess(tmp_path / "data", durability="sync", capacity="1GiB") as broker:
        assert broker.proc is not None
        pid = broker.proc.pid
        stop = threading.Event()
        tallies = [Tally() for _ in range(AGENTS)]
        threads = []
        for n in range(AGENTS):
            _, token = broker.new_guest(f"soak-{n}")
            kind = n % 3
            target: Callable[..., None]
            if kind == 0:
                args: tuple[object, ...] = (broker.url, token, n, stop, tallies[n], tmp_path)
                target = frontswap_agent
            elif kind == 1:
                args, target = (broker.url, token, n, stop, tallies[n]), cleancache_agent
            else:
                args, target = (broker.url, token, n, stop, tallies[n]), raw_agent

            def run(
                target: Callable[..., None] = target, args: tuple[object, ...] = args, n: int = n
            ) -> None:
                try:
                    target(*args)
                except Exception as exc:  # an error of any kind fails the soak
                    tallies[n].errors.append(f"agent {n} raised {exc!r}")

            threads.append(threading.Thread(target=run, name=f"agent-{n}", daemon=True))
        start = time.monotonic()
        for t in threads:
            t.start()
        samples: list[tuple[float, int]] = []
        while (elapsed := time.monotonic() - start) < SECONDS:
            samples.append((elapsed, rss_bytes(pid)))
            time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "an agent did not finish"
        samples.append((time.monotonic() - start, rss_bytes(pid)))
        stats = broker.json("GET", "/v1/stats")

    ops = sum(t.ops for t in tallies)
    verified = sum(t.verified for t in tallies)
    errors = [e for t in tallies for e in t.errors]
    warm = [rss for at, rss in samples if at >= WARMUP * SECONDS]
    base = warm[0]
    growth = max(warm) - base
    print(
        f"\nsoak: {AGENTS} agents, {SECONDS:.0f} s, {ops} ops ({ops / SECONDS:.0f}/s), "
        f"{len(errors)} errors, {verified} persistent pages verified at the end\n"
        f"soak: broker RSS start {samples[0][1] >> 20} MiB, after warm-up {base >> 20} MiB, "
        f"max after warm-up {max(warm) >> 20} MiB, end {samples[-1][1] >> 20} MiB "
        f"(growth after warm-up {growth / (1 << 20):.1f} MiB)\n"
        f"soak: broker logical_pages {stats['logical_pages']}, unique {stats['unique_pages']}, "
        f"puts {stats['puts']}, gets {stats['gets']}"
    )
    assert errors == [], errors[:20]
    assert ops > AGENTS * 10 and verified > 0
    assert growth < RSS_GROWTH_LIMIT, f"broker RSS grew {growth >> 20} MiB after the warm-up"
