"""What dropping cold ephemeral pages by age would buy: a replay of one scoreboard workload.

Run: ``.venv/bin/python -m bench.policy_ages [--workload shifting] [--policy tinylfu]
[--steps 300] [--seed 7] [--capacity-percent 100]``

It replays the workload as :mod:`bench.policy_scoreboard` does (the same guests, page cache
and core) and follows every cleancache page from its put to its end: a hit (the get that
found it; cleancache gets are exclusive), its eviction, a put over it, or the end of the
run. It prints, for cutoffs ``A`` (steps), what a rule dropping every ephemeral page at
age ``A`` would have done to a first order (the dropped page's later hit is lost, nothing else
changes): faults lost, MiB saved (averaged over the steps, as the scoreboard's RAM), and the
faults per MiB that leaves; and the hits per byte-step of the pages by their TinyLFU estimate
at the put (``--policy tinylfu``). A rule is worth keeping only where it saves bytes without
losing faults: where the hits per byte-step of old pages are far below the average.
It is a benchmark: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from bench import policy_scoreboard as board
from broker.core import Tmem
from broker.core.content import compress
from broker.core.eviction import Account, Eviction
from broker.core.keys import M32, MIX
from broker.core.pages import PageTable
from broker.core.registry import Pool
from schemas.batch import PAGE_SIZE, STATUS_DONE

CUTOFFS = (10, 25, 50, 100, 150, 200, 250)
_MIB = 1 << 20


class Tracker:
    """Every cleancache page's life: (hit, put step, end step, bytes charged, estimate)."""

    def __init__(self, policy: str) -> None:
        self.step = 0
        self.tinylfu = policy == "tinylfu"
        self.compressing = policy in ("zswap", "tinylfu")  # every put compressed
        self.held: dict[tuple[int, int, int], tuple[int, int, int]] = {}
        self.evicting = False  # inside Eviction.evict_one: a page dropped is an eviction
        self.lives: list[tuple[bool, int, int, int, int]] = []

    def end(self, handle: tuple[int, int, int], hit: bool) -> None:
        life = self.held.pop(handle, None)
        if life is not None:
            put, size, seen = life
            self.lives.append((hit, put, self.step, size, seen))

    def estimate(self, tmem: Tmem, gid: int, pool_id: int, oid: int, index: int) -> int:
        if not self.tinylfu:
            return 0
        _g, pool = tmem._reg.pool(gid, pool_id)
        account = pool.account
        if account is None or account.tinylfu is None:
            return 0
        key = (oid << 56) | pool.lru_tag | ((index + (oid & M32) * MIX) & M32)
        return account.tinylfu.sketch.estimate(key)


def replay(args: argparse.Namespace) -> tuple[board.Score, Tracker]:
    """Run the scoreboard's replay with the cleancache puts and gets followed."""
    track = Tracker(args.policy)
    put = board.Guest._put
    step = board.Guest.step
    evict_one = Eviction.evict_one
    drop = PageTable.drop

    def tracked_evict_one(self: Eviction, account: Account) -> None:
        track.evicting = True
        try:
            evict_one(self, account)
        finally:
            track.evicting = False

    def tracked_drop(
        self: PageTable, pool: Pool, oid: int, index: int, key: int, in_lru: bool = True
    ) -> None:
        if track.evicting and pool.owner is not None:
            track.end((pool.owner.guest_id, oid, index), hit=False)
        drop(self, pool, oid, index, key, in_lru)

    def tracked_put(
        self: board.Guest, oid: int, index: int, data: bytes, pool: int, score: board.Score
    ) -> int:
        status = put(self, oid, index, data, pool, score)
        if pool == self.clean:
            handle = (self.gid, oid, index)
            track.end(handle, hit=False)
            if status == STATUS_DONE:
                seen = track.estimate(self.tmem, self.gid, pool, oid, index)
                size = min(len(compress(data)), PAGE_SIZE) if track.compressing else PAGE_SIZE
                track.held[handle] = (track.step, size, seen)
        return status

    def tracked_step(self: board.Guest, step_no: int, score: board.Score) -> None:
        track.step = step_no
        tmem = self.tmem
        get: Callable[[int, int, int, int], bytes | None] = tmem.get

        def tracked_get(gid: int, pool: int, oid: int, index: int) -> bytes | None:
            page = get(gid, pool, oid, index)
            if pool == self.clean:
                track.end((gid, oid, index), hit=page is not None)
            return page

        tmem.get = tracked_get  # type: ignore[method-assign,assignment]
        try:
            step(self, step_no, score)
        finally:
            del tmem.get

    board.Guest._put = tracked_put  # type: ignore[method-assign]
    board.Guest.step = tracked_step  # type: ignore[method-assign]
    Eviction.evict_one = tracked_evict_one  # type: ignore[method-assign]
    PageTable.drop = tracked_drop  # type: ignore[method-assign]
    try:
        pages = board.Pages(16384)
        score = board.run(
            args.workload,
            args.policy,
            args.steps,
            1,
            args.seed,
            pages,
            capacity_percent=args.capacity_percent,
        )
    finally:
        board.Guest._put = put  # type: ignore[method-assign]
        board.Guest.step = step  # type: ignore[method-assign]
        Eviction.evict_one = evict_one  # type: ignore[method-assign]
        PageTable.drop = drop  # type: ignore[method-assign]
    track.step = args.steps
    for handle in list(track.held):
        track.end(handle, hit=False)
    return score, track


def main(
    argv: list[str] | None = None, out: Callable[[str], None] = print
) -> tuple[board.Score, Tracker]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="shifting", choices=board.WORKLOADS)
    parser.add_argument("--policy", default="tinylfu", choices=board.POLICIES)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--capacity-percent", type=int, default=100)
    args = parser.parse_args(argv)
    score, track = replay(args)
    lives = track.lives
    held = sum((end - put) * size for _h, put, end, size, _s in lives)
    hits = sum(1 for life in lives if life[0])
    out(
        f"{args.workload} / {args.policy}: {score.hits} faults served ({hits} cleancache), "
        f"{score.ram_mib:.2f} MiB, {score.hits_per_mib:.0f} per MiB; cleancache pages "
        f"{len(lives)}, {held / (args.steps * _MIB):.2f} MiB held on average, "
        f"{sum((e - p) * s for h, p, e, s, _ in lives if not h) / max(1, held):.0%} of it "
        "by pages never hit"
    )
    out("| drop at age (steps) | faults lost | MiB saved | faults / MiB | vs now |")
    out("|---|---|---|---|---|")
    for cutoff in CUTOFFS:
        lost = sum(1 for h, put, end, _s, _e in lives if h and end - put > cutoff)
        saved = sum((end - put - cutoff) * s for _h, put, end, s, _e in lives if end - put > cutoff)
        mib = score.ram_mib - saved / (args.steps * _MIB)
        per_mib = (score.hits - lost) / mib if mib > 0 else 0.0
        out(
            f"| {cutoff} | {lost} ({lost / max(1, score.hits):.1%}) "
            f"| {saved / (args.steps * _MIB):.2f} | {per_mib:.0f} "
            f"| {per_mib / score.hits_per_mib - 1:+.1%} |"
        )
    if track.tinylfu:
        out("| estimate at the put | pages | hit | hits per MiB-step held |")
        out("|---|---|---|---|")
        for seen in range(7):
            group = [life for life in lives if min(life[4], 6) == seen]
            if not group:
                continue
            got = sum(1 for life in group if life[0])
            mib_steps = sum((end - put) * s for _h, put, end, s, _e in group) / _MIB
            label = f"{seen}+" if seen == 6 else str(seen)
            out(
                f"| {label} | {len(group)} | {got / len(group):.0%} "
                f"| {got / mib_steps if mib_steps else 0.0:.2f} |"
            )
    return score, track


if __name__ == "__main__":
    main()
