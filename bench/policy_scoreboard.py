"""The policy scoreboard: the simulator's workloads replayed against the core, once per policy.

Run: ``.venv/bin/python -m bench.policy_scoreboard [--steps 400] [--png policy_scoreboard.png]``

Each simulated guest has a page cache (an LRU of ``--guest-pages`` pages) in front of its
OS image; the workload (:mod:`guest_agent.sim.workloads`, the simulator's own generators)
says which image pages it reads. A read that misses the page cache asks the broker
(cleancache get, exclusive): a hit is a fault served, a disk read avoided; a miss reads the
disk. A page the cache drops is put to the broker (cleancache put). The core is driven
directly (``Tmem``, no HTTP), every page has real, distinct contents, and the time is a fixed
counter, so every run makes the same operations and the same decisions.

Workloads (from the simulator's generators):

* ``scan-heavy``: a zipf hot set (``hotcold``) and sequential sweeps (``scan``) of the
  image, as many accesses each: a ``find /`` beside a working set.
* ``shifting``: ``phases``, whose hot set moves every 50 steps.
* ``mix``: the demo's mix (half hotcold, a quarter scan, a quarter phases).
* ``8-guests``: eight guests of weights 100, 100, 200, 200, 100, 300, 100, 100 running the
  mix with their own seeds, sharing one broker.

Policies:

* ``xen``: Xen tmem's: LRU, no admission gate, no watermarks (``configure_pressure(None)``).
* ``lru``: today's default: LRU with the watermarks and the hit-rate admission gate.
* ``tinylfu``: the new one: W-TinyLFU (broker/core/policy.py), watermarks and gate.

Figures per policy and workload: faults served (cleancache hits = disk reads avoided), the hit
rate of broker gets, puts declined (policy), evictions, persistent pages lost (0: these
workloads are clean pages only, so it is 0 by construction and printed for the record) and
broker RAM: the page storage held, averaged over the steps, plus the policy's own metadata (the
sketches); hits per MiB of that. The page lists (window/main or LRU) cost the same in both
policies, a page sitting in one of them, and are left out of both.
It is a benchmark: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from broker.core import CoreConfig, Tmem
from broker.core.policy import LRU, TINYLFU
from broker.core.pressure import PressureSettings
from guest_agent.sim.workloads import Mix, PageSpace, Workload, make_workload
from schemas.batch import PAGE_SIZE

_NOISE = os.urandom(PAGE_SIZE)
WEIGHTS_8 = (100, 100, 200, 200, 100, 300, 100, 100)
POLICIES = ("xen", "lru", "tinylfu")
WORKLOADS = ("scan-heavy", "shifting", "mix", "8-guests")


def contents(guest: int, page: int) -> bytes:
    """Distinct, incompressible contents for each guest's page."""
    return guest.to_bytes(4, "little") + page.to_bytes(4, "little") + _NOISE[8:]


@dataclass
class Score:
    workload: str
    policy: str
    gets: int = 0
    hits: int = 0
    puts: int = 0
    declined: int = 0
    evictions: int = 0
    persistent_lost: int = 0
    page_bytes: int = 0
    meta_bytes: int = 0

    @property
    def ram_mib(self) -> float:
        return (self.page_bytes + self.meta_bytes) / (1 << 20)

    @property
    def hits_per_mib(self) -> float:
        return self.hits / self.ram_mib if self.ram_mib else 0.0


class Guest:
    """A guest's page cache in front of the broker's ephemeral pool (cleancache)."""

    def __init__(self, tmem: Tmem, gid: int, workload: Workload, cache_pages: int) -> None:
        self.tmem, self.gid, self.workload = tmem, gid, workload
        self.pool = tmem.create_pool(gid, "ephemeral")
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.cache_pages = cache_pages

    def step(self, step_no: int, score: Score) -> None:
        tmem, gid, pool, cache = self.tmem, self.gid, self.pool, self.cache
        for page, _write in self.workload.step(step_no):
            if page in cache:
                cache.move_to_end(page)
                continue
            score.gets += 1
            if tmem.get(gid, pool, page >> 32, page & 0xFFFFFFFF) is not None:
                score.hits += 1
            cache[page] = None
            if len(cache) > self.cache_pages:
                old = cache.popitem(last=False)[0]
                score.puts += 1
                tmem.put(gid, pool, old >> 32, old & 0xFFFFFFFF, contents(gid, old))


def _broker(policy: str, capacity_pages: int) -> Tmem:
    eph = TINYLFU if policy == TINYLFU else LRU
    tmem = Tmem(CoreConfig(capacity_bytes=capacity_pages * PAGE_SIZE, ephemeral_policy=eph))
    if policy != "xen":
        tmem.configure_pressure(PressureSettings(ephemeral_policy=eph))
    return tmem


def _workloads(name: str, gid: int, space: PageSpace, k: int) -> Workload:
    seed = 7 + gid
    if name == "scan-heavy":
        half = k // 2
        return Mix(
            [
                make_workload("hotcold", space, seed=seed, accesses_per_step=half),
                make_workload("scan", space, seed=seed, accesses_per_step=k - half),
            ],
            seed=seed,
        )
    if name == "shifting":
        return make_workload("phases", space, seed=seed, accesses_per_step=k)
    return make_workload("mix", space, seed=seed, accesses_per_step=k)


def run(workload: str, policy: str, steps: int, scale: int) -> Score:
    """Replay ``workload`` for ``steps`` steps against a fresh core under ``policy``."""
    score = Score(workload, policy)
    if workload == "8-guests":
        weights: tuple[int, ...] = WEIGHTS_8
        space = PageSpace(0, 4096 * scale)
        cache_pages, capacity, k = 512 * scale, 8192 * scale, 128
    else:
        weights = (100,)
        space = PageSpace(0, 16384 * scale)
        cache_pages, capacity, k = 2048 * scale, 4096 * scale, 512
    tmem = _broker(policy, capacity)
    guests = []
    for i, weight in enumerate(weights, start=1):
        tmem.add_guest(i, name=f"g{i}", weight=weight)
        guests.append(Guest(tmem, i, _workloads(workload, i, space, k), cache_pages))
    held = 0
    for step_no in range(steps):
        for g in guests:
            g.step(step_no, score)
        held += tmem.counted_bytes
    stats = tmem.stats()
    score.evictions = stats.ops.evictions
    score.declined = stats.policy_declines.low_hit_rate
    score.page_bytes = held // steps
    score.meta_bytes = sum(
        a.tinylfu.sketch.nbytes for a in tmem._ev.accounts.values() if a.tinylfu is not None
    )
    return score


def table(scores: list[Score]) -> str:
    best: dict[str, float] = {}
    for s in scores:
        if s.policy != TINYLFU:
            best[s.workload] = max(best.get(s.workload, 0.0), s.hits_per_mib)
    lines = [
        "| workload | policy | gets | faults served | hit rate | declined | evictions "
        "| persistent lost | RAM MiB (pages + sketch) | hits / MiB | vs best baseline |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in scores:
        rel = s.hits_per_mib / best[s.workload] - 1 if best.get(s.workload) else 0.0
        lines.append(
            f"| {s.workload} | {s.policy} | {s.gets} | {s.hits} | {s.hits / max(1, s.gets):.1%} "
            f"| {s.declined} | {s.evictions} | {s.persistent_lost} "
            f"| {s.page_bytes / (1 << 20):.1f} + {s.meta_bytes / (1 << 20):.2f} "
            f"| {s.hits_per_mib:.0f} | {rel:+.1%} |"
        )
    return "\n".join(lines)


def plot(scores: list[Score], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(POLICIES)
    for i, policy in enumerate(POLICIES):
        values = [
            next(s.hits_per_mib for s in scores if s.workload == w and s.policy == policy)
            for w in WORKLOADS
        ]
        ax.bar([x + i * width for x in range(len(WORKLOADS))], values, width, label=policy)
    ax.set_xticks([x + width for x in range(len(WORKLOADS))], WORKLOADS)
    ax.set_ylabel("faults served per MiB of broker RAM")
    ax.set_title("tmem broker: ephemeral policy scoreboard")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> list[Score]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--scale", type=int, default=1, help="multiply every size by this")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--png", default=None, help="write the bar chart here")
    args = parser.parse_args(argv)
    chosen = args.workloads.split(",")
    scores = [run(w, p, args.steps, args.scale) for w in chosen for p in POLICIES]
    out(table(scores))
    if args.png and set(chosen) == set(WORKLOADS):
        plot(scores, args.png)
        out(f"wrote {args.png}")
    return scores


if __name__ == "__main__":
    main()
