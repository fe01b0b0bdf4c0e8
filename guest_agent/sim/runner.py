"""Run several simulated guests in lock-step and collect every figure.

    config = SimConfig(guests=4, steps=200)
    result = run_simulation(config, links)        # links: one GuestLink per guest
    print(result.totals["tmem_hits"])

Guests are stepped one after another in a fixed order, in one thread: what is counted depends
only on the seed and the broker's answers, never on wall time or scheduling. Wall time is
measured (broker latency, for the modelled time saved) but never fed back into the model.

A :class:`GuestLink` is what one guest has of the broker: its page backend and, optionally,
notices, pressure reports and its own stats. :class:`MemoryLink` is the in-memory twin's;
:mod:`guest_agent.sim.agent` builds the real ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from .backends import MemoryBackend, MemoryBroker
from .errors import WorkloadError
from .images import DEFAULT_IMAGE, Image
from .model import GuestBackend, GuestCounters, GuestModel, GuestSpec, SwapSource
from .workloads import WORKLOADS, PageSpace, Workload, derive_seed, make_workload

COMPRESS_CHOICES = ("never", "always", "pressure", "inherit")


@dataclass
class SimConfig:
    """Every knob of a simulation; sizes are in 4 KiB pages, durations in steps."""

    guests: int = 4
    ram_pages: int = 2048
    anon_pages: int = 4096
    file_pages: int = 4096
    steps: int = 200
    accesses_per_step: int = 256
    workload: str = "mix"
    write_fraction: float = 0.3
    skew: float = 1.0
    phase_steps: int = 50
    seed: int = 1
    images: list[str] = field(default_factory=lambda: [DEFAULT_IMAGE])
    max_files: int = 2000
    max_image_bytes: int = 64 << 20
    pressure_every: int = 10
    notices_every: int = 5
    sample_every: int = 10
    disk_latency_us: float = 100.0
    verify: bool = True
    shared_cache: bool = False
    """Guests of one image share one cleancache pool (``init_shared_fs``) instead of each
    having a private one."""
    compress: str = "inherit"
    """How created guests compress (:data:`COMPRESS_CHOICES`): ``never``/``always`` are each
    guest's own setting, ``pressure`` is set on their dedup domain (a guest's own setting is
    only on or off), ``inherit`` leaves it to the domain, else the broker."""
    dedup_domain: str = "default"
    """The dedup domain of created guests."""
    trusted_domain: bool = False
    """Make :attr:`dedup_domain` trusted first (``PUT /v1/domains/{name}``): a content its
    guests share takes page storage once in the broker's capacity decisions."""

    def validate(self) -> None:
        """Raise :class:`WorkloadError` for sizes that cannot work."""
        if self.guests < 1 or self.steps < 1:
            raise WorkloadError("need at least one guest and one step")
        if self.accesses_per_step > self.ram_pages:
            raise WorkloadError("accesses_per_step must not exceed ram_pages")
        if min(self.pressure_every, self.notices_every, self.sample_every) < 1:
            raise WorkloadError("intervals are at least one step")
        if not self.images:
            raise WorkloadError("at least one image tree is needed")
        if self.workload not in WORKLOADS:
            raise WorkloadError(
                f"unknown workload {self.workload!r}; choose one of {', '.join(WORKLOADS)}"
            )
        if min(self.ram_pages, self.anon_pages + self.file_pages) < 1:
            raise WorkloadError("a guest needs RAM and at least one page to touch")
        if self.compress not in COMPRESS_CHOICES:
            raise WorkloadError(
                f"unknown compress mode {self.compress!r}; choose one of "
                f"{', '.join(COMPRESS_CHOICES)}"
            )


class GuestLink(Protocol):
    """One guest's connection to a broker, as the runner uses it."""

    name: str
    backend: GuestBackend

    def report_pressure(self, pressure: dict[str, float | int]) -> None:
        """Send ``POST /v1/self/pressure``."""
        ...

    def service_notices(self) -> tuple[int, int]:
        """Read pending notices and answer sheds; ``(sheds answered, pages returned)``."""
        ...

    def self_stats(self) -> dict[str, Any]:
        """The guest's own stats (``GET /v1/self``)."""
        ...

    def on_step(self, step: int) -> None:
        """Called before the guest's step ``step`` (0-based): advance simulated time."""
        ...


class MemoryLink:
    """A guest of the in-memory twin: no notices, pressure reports kept for inspection."""

    def __init__(
        self, name: str, broker: MemoryBroker, guest_id: int, *, shared: str | None = None
    ) -> None:
        self.name = name
        self.broker = broker
        self.guest_id = guest_id
        self.backend: GuestBackend = MemoryBackend(broker, guest_id, shared=shared)
        self.pressure_reports: list[dict[str, float | int]] = []

    def report_pressure(self, pressure: dict[str, float | int]) -> None:
        self.pressure_reports.append(pressure)

    def service_notices(self) -> tuple[int, int]:
        """Answer the twin's pending sheds: the oldest broker pages go to the fallback."""
        sheds = returned = 0
        for pages in self.broker.take_sheds(self.guest_id):
            sheds += 1
            backend = self.backend
            assert isinstance(backend, MemoryBackend)
            returned += backend.shed(pages)
        return sheds, returned

    def self_stats(self) -> dict[str, Any]:
        return {"pages": len(self.broker.keys(self.guest_id))}

    def on_step(self, step: int) -> None:
        pass


@dataclass
class Timing:
    """Wall time spent waiting for the broker (measured, never counted)."""

    seconds: float = 0.0
    calls: int = 0
    pages: int = 0

    @property
    def per_page_us(self) -> float:
        return 1e6 * self.seconds / self.pages if self.pages else 0.0


class TimedBackend:
    """Wraps a backend and measures the wall time of each batched call."""

    def __init__(self, inner: GuestBackend) -> None:
        self.inner = inner
        self.timing = Timing()

    def _tick(self, t0: float, pages: int) -> None:
        self.timing.seconds += time.perf_counter() - t0
        self.timing.calls += 1
        self.timing.pages += pages

    def swap_store(self, items: Sequence[tuple[int, bytes]]) -> list[str | None]:
        t0 = time.perf_counter()
        out = self.inner.swap_store(items)
        self._tick(t0, len(items))
        return out

    def swap_load(self, offsets: Sequence[int]) -> list[tuple[SwapSource, bytes | None]]:
        t0 = time.perf_counter()
        out = self.inner.swap_load(offsets)
        self._tick(t0, len(offsets))
        return out

    def swap_at_broker(self, offsets: Sequence[int]) -> list[bool]:
        return self.inner.swap_at_broker(offsets)

    def swap_invalidate(self, offsets: Sequence[int]) -> None:
        t0 = time.perf_counter()
        self.inner.swap_invalidate(offsets)
        self._tick(t0, len(offsets))

    def cache_put(self, items: Sequence[tuple[int, int, bytes]]) -> list[str | None]:
        t0 = time.perf_counter()
        out = self.inner.cache_put(items)
        self._tick(t0, len(items))
        return out

    def cache_get(self, keys: Sequence[tuple[int, int]]) -> list[bytes | None]:
        t0 = time.perf_counter()
        out = self.inner.cache_get(keys)
        self._tick(t0, len(keys))
        return out


@dataclass
class Sample:
    """One point of the timeline: hit rate over the last interval, broker memory, dedup."""

    step: int
    hit_rate: float
    tmem_hits: int
    tmem_misses: int
    used_bytes: int | None
    dedup_ratio: float | None
    logical_pages: int | None


@dataclass
class SimGuest:
    """A guest in a run: its link, model, workload and measured timing."""

    name: str
    link: GuestLink
    model: GuestModel
    workload: Workload
    timed: TimedBackend


@dataclass
class SimResult:
    """Everything a run produced; :meth:`as_dict` is what ``--json`` writes."""

    config: SimConfig
    images: list[str]
    guests: dict[str, dict[str, object]]
    guest_timing: dict[str, Timing]
    totals: dict[str, object]
    timing: Timing
    broker_stats: dict[str, Any] | None
    self_stats: dict[str, dict[str, Any]]
    timeline: list[Sample]
    modelled: dict[str, float]
    models: dict[str, GuestModel] = field(default_factory=dict, repr=False)
    """The guests' final models (what each believes the broker holds); not in JSON."""
    domain: dict[str, Any] | None = None
    """The guests' dedup domain at the end (``GET /v1/domains``), when the admin token was
    given."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "images": self.images,
            "guests": {
                name: {**figures, "broker_us_per_page": self.guest_timing[name].per_page_us}
                for name, figures in self.guests.items()
            },
            "totals": self.totals,
            "broker_latency": {
                "seconds": self.timing.seconds,
                "calls": self.timing.calls,
                "pages": self.timing.pages,
                "us_per_page": self.timing.per_page_us,
            },
            "broker_stats": self.broker_stats,
            "self_stats": self.self_stats,
            "timeline": [asdict(s) for s in self.timeline],
            "modelled": self.modelled,
            "domain": self.domain,
        }


def load_images(config: SimConfig) -> list[Image]:
    """Scan each distinct image tree once; guests on the same tree share one :class:`Image`."""
    by_root: dict[str, Image] = {}
    for root in config.images:
        if root not in by_root:
            by_root[root] = Image.scan(
                root, max_files=config.max_files, max_bytes=config.max_image_bytes
            )
    return [by_root[config.images[i % len(config.images)]] for i in range(config.guests)]


def build_guests(
    config: SimConfig, links: Sequence[GuestLink], images: Sequence[Image]
) -> list[SimGuest]:
    """Models and workloads for each link; guest ``i`` runs on ``images[i]``."""
    config.validate()
    guests: list[SimGuest] = []
    for i, link in enumerate(links):
        image = images[i]
        spec = GuestSpec(
            ram_pages=config.ram_pages,
            anon_pages=config.anon_pages,
            file_pages=min(config.file_pages, image.total_pages),
        )
        timed = TimedBackend(link.backend)
        model = GuestModel(
            i,
            spec,
            image,
            timed,
            seed=config.seed,
            verify=config.verify,
            shared_cache=config.shared_cache,
        )
        workload = make_workload(
            config.workload,
            PageSpace(spec.anon_pages, spec.file_pages),
            seed=derive_seed(config.seed, "guest", i),
            accesses_per_step=config.accesses_per_step,
            write_fraction=config.write_fraction,
            skew=config.skew,
            phase_steps=config.phase_steps,
        )
        guests.append(SimGuest(link.name, link, model, workload, timed))
    return guests


def _sum_counters(counters: Sequence[GuestCounters]) -> dict[str, object]:
    total: dict[str, object] = {}
    for c in counters:
        for key, value in c.as_dict().items():
            if isinstance(value, dict):
                bucket = total.setdefault(key, {})
                assert isinstance(bucket, dict)
                for k, v in value.items():
                    bucket[k] = bucket.get(k, 0) + v
            else:
                assert isinstance(value, int)
                prev = total.get(key, 0)
                assert isinstance(prev, int)
                total[key] = prev + value
    for key, value in total.items():
        if isinstance(value, dict):
            total[key] = dict(sorted(value.items()))
    return total


def run_simulation(
    config: SimConfig,
    links: Sequence[GuestLink],
    *,
    images: Sequence[Image] | None = None,
    broker_stats: Callable[[], dict[str, Any] | None] | None = None,
    on_step: Callable[[int, Sequence[SimGuest]], None] | None = None,
) -> SimResult:
    """Run ``config.steps`` steps of every guest and return the figures.

    ``broker_stats`` (e.g. ``GET /v1/stats`` with the admin token) is sampled every
    ``sample_every`` steps for the timeline; without it the first guest's own stats are used
    when they carry ``used_bytes``. ``on_step(step, guests)`` is called after each step
    (progress bars).
    """
    config.validate()
    if len(links) != config.guests:
        raise WorkloadError(f"{config.guests} guests configured but {len(links)} links given")
    imgs = list(images) if images is not None else load_images(config)
    guests = build_guests(config, links, imgs)
    timeline: list[Sample] = []
    last_hits = last_misses = 0

    def stats_now() -> dict[str, Any] | None:
        if broker_stats is not None:
            return broker_stats()
        return own_view([g.link.self_stats() for g in guests])

    for step in range(config.steps):
        for g in guests:
            g.link.on_step(step)
            g.model.step(g.workload.step(step))
        done = step + 1
        for g in guests:
            c = g.model.counters
            if done % config.notices_every == 0:
                sheds, returned = g.link.service_notices()
                c.sheds_answered += sheds
                c.shed_pages_returned += returned
                if sheds:
                    g.model.resync_swap()
            if done % config.pressure_every == 0:
                g.link.report_pressure(g.model.pressure())
                c.pressure_reports += 1
        if done % config.sample_every == 0 or done == config.steps:
            hits = sum(g.model.counters.tmem_hits for g in guests)
            misses = sum(g.model.counters.tmem_misses for g in guests)
            dh, dm = hits - last_hits, misses - last_misses
            last_hits, last_misses = hits, misses
            st = stats_now()
            timeline.append(
                Sample(
                    step=done,
                    hit_rate=dh / (dh + dm) if dh + dm else 0.0,
                    tmem_hits=dh,
                    tmem_misses=dm,
                    used_bytes=_int_or_none(st, "used_bytes"),
                    dedup_ratio=_float_or_none(st, "dedup_ratio"),
                    logical_pages=_int_or_none(st, "logical_pages"),
                )
            )
        if on_step is not None:
            on_step(done, guests)

    per_guest = {g.name: g.model.counters.as_dict() for g in guests}
    totals = _sum_counters([g.model.counters for g in guests])
    guest_timing = {g.name: _guest_timing(g) for g in guests}
    timing = Timing()
    for t in guest_timing.values():
        timing.seconds += t.seconds
        timing.calls += t.calls
        timing.pages += t.pages
    self_stats = {g.name: g.link.self_stats() for g in guests}
    return SimResult(
        config=config,
        images=sorted({img.describe() for img in imgs}),
        guests=per_guest,
        guest_timing=guest_timing,
        totals=totals,
        timing=timing,
        broker_stats=stats_now(),
        self_stats=self_stats,
        timeline=timeline,
        modelled=modelled_time(totals, timing, config.disk_latency_us),
        models={g.name: g.model for g in guests},
    )


def own_view(selves: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """What the guests can see without the admin token: the sum of their own ``GET /v1/self``
    stats (pages held, zero pages, bytes charged). No dedup ratio: a guest must not learn
    whether other guests hold the same content."""
    logical = zero = charged = 0
    seen = False
    for info in selves:
        st = info.get("stats")
        if not isinstance(st, dict) or "logical_pages" not in st:
            continue
        seen = True
        logical += int(st.get("logical_pages", 0))
        zero += int(st.get("zero_pages", 0))
        charged += int(st.get("charged_bytes", 0))
    if not seen:
        return None
    return {
        "source": "self",
        "logical_pages": logical,
        "zero_pages": zero,
        "charged_bytes": charged,
        "used_bytes": charged,
    }


def _guest_timing(g: SimGuest) -> Timing:
    # A link that measures its own HTTP time (the real agent) is more exact than the wrapper
    # around the backend, which also counts the shim's work and its fallback file.
    own = getattr(g.link, "timing", None)
    if isinstance(own, Timing):
        return Timing(seconds=own.seconds, calls=own.calls, pages=g.timed.timing.pages)
    return g.timed.timing


def modelled_time(
    totals: dict[str, object], timing: Timing, disk_latency_us: float
) -> dict[str, float]:
    """Disk time the broker saved against the broker time actually paid, in seconds.

    Every disk read and write avoided would have cost ``disk_latency_us``; every broker call
    (hits, misses, declined puts, invalidations alike) cost what was measured in this run.
    """
    reads = totals.get("disk_reads_avoided", 0)
    writes = totals.get("disk_writes_avoided", 0)
    assert isinstance(reads, int) and isinstance(writes, int)
    disk_s = (reads + writes) * disk_latency_us / 1e6
    return {
        "disk_latency_us": disk_latency_us,
        "disk_seconds_avoided": disk_s,
        "broker_seconds": timing.seconds,
        "broker_us_per_page": timing.per_page_us,
        "seconds_saved": disk_s - timing.seconds,
    }


def _int_or_none(d: dict[str, Any] | None, key: str) -> int | None:
    if d is None or not isinstance(d.get(key), int | float):
        return None
    return int(d[key])


def _float_or_none(d: dict[str, Any] | None, key: str) -> float | None:
    if d is None or not isinstance(d.get(key), int | float):
        return None
    return float(d[key])


def memory_links(
    config: SimConfig, broker: MemoryBroker, *, cap_pages: int | None = None
) -> list[MemoryLink]:
    """Guests ``guest-0 ..`` of the in-memory twin, ids 1.. (for tests and dry runs)."""
    links = []
    for i in range(config.guests):
        broker.add_guest(i + 1, cap_pages=cap_pages)
        shared = config.images[i % len(config.images)] if config.shared_cache else None
        links.append(MemoryLink(f"guest-{i}", broker, i + 1, shared=shared))
    return links
