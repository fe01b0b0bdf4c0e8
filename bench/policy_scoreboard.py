"""The policy scoreboard: the simulator's workloads replayed against the core, once per policy.

Run: ``.venv/bin/python -m bench.policy_scoreboard [--steps 300] [--runs 3] [--png FILE]
[--persistent-share 0.75]``

Each simulated guest has a page cache (an LRU of ``--guest-pages`` pages) in front of its
memory: anonymous pages (an eighth of its page space) and the pages of an OS image of real
files (``/usr/lib``, :class:`guest_agent.sim.images.Image`: real contents, so compression
ratios are real; the oid is the file, the index its page, as cleancache names them). The
workload (:mod:`guest_agent.sim.workloads`, the simulator's generators) says which pages it
touches and writes. A read that misses the page cache asks the broker: a file page is a
cleancache get (exclusive), an anonymous page one the guest swapped out is a frontswap load
(an exclusive-get persistent pool; declined stores went to its swap disk instead). A hit is a
fault served, a disk read avoided; a frontswap store the broker takes is a disk write
avoided. A clean file page the cache drops is put to cleancache; a dirty anonymous page to
frontswap. Shed notices are answered as the agent does: the pages the broker names
(``Tmem.shed_candidates``) go back to the guest's swap. Every frontswap load is checked
against what was stored (``persistent lost``: must be 0). The core is driven directly (no
HTTP) and the time is a step counter, so a run with the same seed makes the same operations.

Workloads: ``scan-heavy`` (the simulator's ``hotcold`` and ``scan``, as many accesses each:
a ``find /`` beside a working set), ``shifting`` (``phases``: the hot set moves every 50
steps), ``mix`` (the demo's mix), ``8-guests`` (eight guests of weights 100, 100, 200, 200,
100, 300, 100, 100 running the mix with their own seeds on one image, sharing one broker).

Policies:

* ``xen``: Xen tmem's: LRU, no admission, no watermarks, no compression.
* ``lru``: today's default: LRU, the watermarks, the hit-rate admission gate, no compression.
* ``zswap``: zswap-like: compress every page, reject pages that compress poorly, LRU, the
  broker's watermarks (no gate).
* ``tinylfu``: the new one: size-aware W-TinyLFU (broker/core/policy.py) with its
  predictions while memory is tight (puts to objects evicted unread, pages on their first
  round trip: broker/core/admission.py), the watermarks and gate, every page compressed
  (``always``) and, as zswap, every poor compressor declined, frontswap pages included;
  idle lz4 pages recompressed with zstd (``CoreConfig.recompress``, broker/core/compression.py).
* ``zswap-zstd``: a reference, not a baseline: zswap-like with every page kept as zstd
  (recompressed at the end of each step: the RAM of zstd on every put, whose price is ~27 us of
  CPU per put and ~5 us more per read, which this count does not show).

Figures per policy and workload: faults served, disk reads and writes avoided, sheds, puts
declined (every reason), persistent pages lost, and broker RAM: the page storage counted
(``counted_bytes``: compressed sizes where compressed) averaged over the steps, plus the
policy's own metadata (the sketches); faults served per MiB of it. The page lists and the
persistent pages' last-access order cost the same under every policy and are left out.
With ``--runs N`` every figure is the median of N runs with different seeds;
``--capacity-percent P`` runs every load on a broker of P % of its default capacity.
It is a benchmark: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields

from broker.core import CoreConfig, Tmem
from broker.core.content import ZERO_KEY, compress, is_zstd
from broker.core.policy import LRU, TINYLFU
from broker.core.pressure import PressurePolicy, PressureSettings
from guest_agent.sim.images import Image
from guest_agent.sim.workloads import Mix, PageSpace, Workload, make_workload
from schemas.batch import PAGE_SIZE, STATUS_DONE

# a reference, not a baseline: zswap-like with every page kept as zstd (recompressed at the
# end of each step, so RAM is as with zstd on every put; its price is ~27 us of CPU per put)
ZSTD_REF = "zswap-zstd"
WEIGHTS_8 = (100, 100, 200, 200, 100, 300, 100, 100)
POLICIES = ("xen", "lru", "zswap", "tinylfu", ZSTD_REF)
BASELINES = ("xen", "lru", "zswap")
WORKLOADS = ("scan-heavy", "shifting", "mix", "8-guests")
ANON_OID = 1 << 40  # anonymous pages' objects in the frontswap pool (Xen's layout below it)
COMPRESS_POOR = int(0.75 * PAGE_SIZE)  # zswap-like: what compresses worse is rejected


@dataclass
class Score:
    workload: str
    policy: str
    gets: int = 0
    hits: int = 0
    reads_avoided: int = 0
    writes_avoided: int = 0
    disk_reads: int = 0
    disk_writes: int = 0
    puts: int = 0
    declined: int = 0
    predicted_useless: int = 0
    sheds: int = 0
    shed_pages: int = 0
    evictions: int = 0
    persistent_lost: int = 0
    page_bytes: int = 0
    meta_bytes: int = 0
    recompressed: int = 0  # pages the idle pass recompressed (~27 us each)
    zstd_hits: int = 0  # faults served from a zstd page (~5 us more each than from lz4)

    @property
    def ram_mib(self) -> float:
        return (self.page_bytes + self.meta_bytes) / (1 << 20)

    @property
    def hits_per_mib(self) -> float:
        return self.hits / self.ram_mib if self.ram_mib else 0.0


class Pages:
    """The image's real pages, read once: ``(oid, index, contents)`` of each image page."""

    def __init__(self, pages: int) -> None:
        image = Image.scan("/usr/lib", max_files=100_000, max_bytes=pages * PAGE_SIZE)
        self.handles: list[tuple[int, int]] = []
        self.contents: list[bytes] = []
        for n in range(image.total_pages):
            fp = image.locate(n)
            self.handles.append((fp.file_no, fp.index))
            self.contents.append(image.read_page(fp))
        if not self.contents:
            raise SystemExit("no image pages under /usr/lib")

    def file_page(self, n: int) -> tuple[int, int, bytes]:
        n %= len(self.contents)
        oid, index = self.handles[n]
        return oid, index, self.contents[n]

    def anon_page(self, gid: int, page: int, version: int) -> bytes:
        """A guest's anonymous page: an image page's bytes (real compressibility) stamped with
        the guest, the page and its version, so that every store is checkably distinct."""
        base = self.contents[(page * 7 + gid) % len(self.contents)]
        return (
            gid.to_bytes(2, "little")
            + page.to_bytes(4, "little")
            + version.to_bytes(4, "little")
            + base[10:]
        )


class Guest:
    """A guest's page cache in front of cleancache (file pages) and frontswap (anon pages)."""

    def __init__(
        self,
        tmem: Tmem,
        gid: int,
        workload: Workload,
        space: PageSpace,
        cache_pages: int,
        pages: Pages,
        zswap: bool,
    ) -> None:
        self.tmem, self.gid, self.workload, self.space = tmem, gid, workload, space
        self.clean = tmem.create_pool(gid, "ephemeral")
        self.swap = tmem.create_pool(gid, "persistent", exclusive_gets=True)
        self.cache: OrderedDict[int, bool] = OrderedDict()  # page -> dirty
        self.cache_pages = cache_pages
        self.pages = pages
        self.zswap = zswap
        self.version: dict[int, int] = {}  # anon page -> version last written
        self.in_broker: set[int] = set()  # anon pages frontswap holds
        self.on_disk: set[int] = set()  # anon pages on the swap disk

    def _zstd(self, pool_id: int, oid: int, index: int) -> bool:
        """Whether the page at the handle is held as zstd (read before a get)."""
        obj = self.tmem._reg.pool(self.gid, pool_id)[1].objects.get(oid)
        key = None if obj is None else obj.get(index)
        if key is None or key == ZERO_KEY:
            return False
        held = self.tmem._contents.get(key)
        return held is not None and is_zstd(held)

    def _put(self, oid: int, index: int, data: bytes, pool: int, score: Score) -> int:
        score.puts += 1
        if self.zswap and len(compress(data)) > COMPRESS_POOR:
            self.tmem.flush_page(self.gid, pool, oid, index)  # a rejected store leaves nothing
            score.declined += 1
            return -1
        status = self.tmem.put(self.gid, pool, oid, index, data)
        if status != STATUS_DONE:
            score.declined += 1
        return status

    def step(self, step_no: int, score: Score) -> None:
        tmem, gid, cache, anon = self.tmem, self.gid, self.cache, self.space.anon_pages
        for page, write in self.workload.step(step_no):
            if page in cache:
                cache.move_to_end(page)
                cache[page] = cache[page] or write
            else:
                score.gets += 1
                if page < anon:
                    self._swap_in(page, score)
                else:
                    oid, index, _data = self.pages.file_page(page - anon)
                    zstd = self._zstd(self.clean, oid, index)
                    if tmem.get(gid, self.clean, oid, index) is not None:
                        score.hits += 1
                        score.zstd_hits += zstd
                        score.reads_avoided += 1
                    else:
                        score.disk_reads += 1
                cache[page] = write
            if write:
                self.version[page] = self.version.get(page, 0) + 1
            if len(cache) > self.cache_pages:
                old, dirty = cache.popitem(last=False)
                if old < anon:
                    if dirty or (old not in self.in_broker and old not in self.on_disk):
                        self._swap_out(old, score)
                else:
                    oid, index, data = self.pages.file_page(old - anon)
                    self._put(oid, index, data, self.clean, score)

    def _swap_out(self, page: int, score: Score) -> None:
        data = self.pages.anon_page(self.gid, page, self.version.get(page, 0))
        if self._put(ANON_OID + page, 0, data, self.swap, score) == STATUS_DONE:
            self.in_broker.add(page)
            self.on_disk.discard(page)
            score.writes_avoided += 1
        else:
            self.in_broker.discard(page)
            self.on_disk.add(page)
            score.disk_writes += 1

    def _swap_in(self, page: int, score: Score) -> None:
        if page in self.in_broker:
            zstd = self._zstd(self.swap, ANON_OID + page, 0)
            got = self.tmem.get(self.gid, self.swap, ANON_OID + page, 0)
            self.in_broker.discard(page)
            if got != self.pages.anon_page(self.gid, page, self.version.get(page, 0)):
                score.persistent_lost += 1
            else:
                score.hits += 1
                score.zstd_hits += zstd
                score.reads_avoided += 1
        elif page in self.on_disk:
            self.on_disk.discard(page)
            score.disk_reads += 1
        # else: a page never written (zero-filled on first touch): no I/O

    def shed(self, pages: int, score: Score) -> None:
        """Answer a shed as the agent does: the broker's coldest pages go to the swap disk."""
        score.sheds += 1
        for pool, oid, index in self.tmem.shed_candidates(self.gid, pages):
            page = oid - ANON_OID
            data = self.tmem.get(self.gid, pool, oid, index)
            if data != self.pages.anon_page(self.gid, page, self.version.get(page, 0)):
                score.persistent_lost += 1
            self.in_broker.discard(page)
            self.on_disk.add(page)
            score.disk_writes += 1
            score.shed_pages += 1


def _broker(
    policy: str, capacity_pages: int, persistent_share: float
) -> tuple[Tmem, PressurePolicy | None]:
    eph = TINYLFU if policy == TINYLFU else LRU
    # the new policy compresses every put as zswap does: the ``pressure`` mode (compress
    # above the low watermark, the cold pass) served fewer faults per MiB here (README)
    compress_mode = "always" if policy in ("zswap", TINYLFU, ZSTD_REF) else "never"
    tmem = Tmem(
        CoreConfig(
            capacity_bytes=capacity_pages * PAGE_SIZE,
            ephemeral_policy=eph,
            compress_default=compress_mode,
            # the new policy keeps idle lz4 pages as zstd (docs/pressure.md)
            recompress=policy in (TINYLFU, ZSTD_REF),
        ),
        salt=1,
    )
    if policy == ZSTD_REF:
        assert tmem._idle is not None
        tmem._idle.share = 1.0  # every page, not only idle ones
    if policy in ("zswap", ZSTD_REF):
        # the broker's watermarks (reclaim from 95 % down to 85 % of the capacity), as the
        # lru and tinylfu policies have them: without, zswap-like held more for the same
        # choices, and scored 0.6-3.5 % fewer faults per MiB (bench/README.md). Eviction
        # only: no hit-rate gate
        tmem._ev.configure(PressureSettings())
        return tmem, None
    if policy == "xen":
        return tmem, None
    # the default persistent share (3/4 of the capacity) is never reached by these loads:
    # --persistent-share 0.25 makes the policies with a pressure loop shed
    settings = PressureSettings(
        ephemeral_policy=eph,
        persistent_share=persistent_share,
        release_share=min(persistent_share, PressureSettings.release_share),
    )
    return tmem, PressurePolicy(tmem, settings, now=0.0)


def _workload(name: str, space: PageSpace, k: int, seed: int) -> Workload:
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


def run(
    workload: str,
    policy: str,
    steps: int,
    scale: int,
    seed: int,
    pages: Pages,
    persistent_share: float = PressureSettings.persistent_share,
    capacity_percent: int = 100,
) -> Score:
    """Replay ``workload`` for ``steps`` steps against a fresh core under ``policy``."""
    score = Score(workload, policy)
    if workload == "8-guests":
        weights: tuple[int, ...] = WEIGHTS_8
        total, cache_pages, capacity, k = 4096 * scale, 512 * scale, 8192 * scale, 128
    else:
        weights = (100,)
        total, cache_pages, capacity, k = 16384 * scale, 2048 * scale, 4096 * scale, 512
    space = PageSpace(total // 8, total - total // 8)
    capacity = capacity * capacity_percent // 100
    tmem, pressure = _broker(policy, capacity, persistent_share)
    guests: dict[int, Guest] = {}
    for gid, weight in enumerate(weights, start=1):
        tmem.add_guest(gid, name=f"g{gid}", weight=weight)
        work = _workload(workload, space, k, seed + gid)
        zswap = policy in ("zswap", ZSTD_REF)
        guests[gid] = Guest(tmem, gid, work, space, cache_pages, pages, zswap)
    held = 0
    for step_no in range(steps):
        for g in guests.values():
            g.step(step_no, score)
        if policy == ZSTD_REF:
            tmem.recompress_idle(1 << 30)
        if pressure is not None:
            for intent in pressure.step(float(step_no), {}):
                if intent.kind == "shed" and intent.pages:
                    guests[intent.guest_id].shed(intent.pages, score)
        held += tmem.counted_bytes
    stats = tmem.stats()
    score.evictions = stats.ops.evictions
    score.predicted_useless = stats.policy_declines.predicted_useless
    score.recompressed = stats.recompressed_pages
    score.page_bytes = held // steps
    score.meta_bytes = sum(
        a.tinylfu.nbytes for a in tmem._ev.accounts.values() if a.tinylfu is not None
    )
    return score


def median(scores: list[Score]) -> Score:
    """Every figure's median over runs of one workload and policy."""
    out = Score(scores[0].workload, scores[0].policy)
    for f in fields(Score):
        if f.type in ("int", int):
            setattr(out, f.name, int(statistics.median(getattr(s, f.name) for s in scores)))
    return out


def table(scores: list[Score]) -> str:
    best: dict[str, float] = {}
    for s in scores:
        if s.policy in BASELINES:
            best[s.workload] = max(best.get(s.workload, 0.0), s.hits_per_mib)
    lines = [
        "| workload | policy | faults served | hit rate | disk reads avoided | disk writes "
        "avoided | sheds (pages) | declined (useless) | evictions | persistent lost "
        "| RAM MiB (pages + sketch) | faults / MiB | vs best baseline | recompressed "
        "| faults from zstd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in scores:
        rel = s.hits_per_mib / best[s.workload] - 1 if best.get(s.workload) else 0.0
        lines.append(
            f"| {s.workload} | {s.policy} | {s.hits} | {s.hits / max(1, s.gets):.1%} "
            f"| {s.reads_avoided} | {s.writes_avoided} | {s.sheds} ({s.shed_pages}) "
            f"| {s.declined} ({s.predicted_useless}) | {s.evictions} | {s.persistent_lost} "
            f"| {s.page_bytes / (1 << 20):.1f} + {s.meta_bytes / (1 << 20):.2f} "
            f"| {s.hits_per_mib:.0f} | {rel:+.1%} | {s.recompressed} | {s.zstd_hits} |"
        )
    return "\n".join(lines)


def plot(scores: list[Score], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / len(POLICIES)
    for i, policy in enumerate(POLICIES):
        values = [
            next(s.hits_per_mib for s in scores if s.workload == w and s.policy == policy)
            for w in WORKLOADS
        ]
        ax.bar([x + i * width for x in range(len(WORKLOADS))], values, width, label=policy)
    ax.set_xticks([x + (len(POLICIES) - 1) / 2 * width for x in range(len(WORKLOADS))], WORKLOADS)
    ax.set_ylabel("faults served per MiB of broker RAM")
    ax.set_title("tmem broker: policy scoreboard (median of runs)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> list[Score]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--runs", type=int, default=1, help="seeds per figure (the median)")
    parser.add_argument("--scale", type=int, default=1, help="multiply every size by this")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--png", default=None, help="write the bar chart here")
    parser.add_argument(
        "--persistent-share",
        type=float,
        default=PressureSettings.persistent_share,
        help="shed persistent pages above this share of capacity (lru and tinylfu)",
    )
    parser.add_argument(
        "--capacity-percent",
        type=int,
        default=100,
        help="the broker's capacity in percent of the default (a smaller one: under pressure)",
    )
    args = parser.parse_args(argv)
    chosen = args.workloads.split(",")
    policies = args.policies.split(",")
    pages = Pages(16384 * args.scale)
    scores = [
        median(
            [
                run(
                    w,
                    p,
                    args.steps,
                    args.scale,
                    7 + 1000 * r,
                    pages,
                    args.persistent_share,
                    args.capacity_percent,
                )
                for r in range(args.runs)
            ]
        )
        for w in chosen
        for p in policies
    ]
    out(table(scores))
    if args.png and set(chosen) == set(WORKLOADS) and set(policies) == set(POLICIES):
        plot(scores, args.png)
        out(f"wrote {args.png}")
    return scores


if __name__ == "__main__":
    main()
