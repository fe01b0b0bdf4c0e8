"""Typed figures: what ``GET /v1/stats``, ``GET /v1/self`` and ``/metrics`` report.

Each figure is a field of a frozen dataclass, declared once with what it is (``kind``) and a
help text a person can read; ``GET /v1/stats`` is :func:`as_json` of a :class:`StatsFigures`
and ``/metrics`` is derived from the same fields (:mod:`broker.api.metrics`), so a field
cannot be renamed in one and silently vanish from the other. ``docs/metrics.md`` lists the
metric names.

Shape (``inline`` fields read as their parent's in JSON; the others nest)::

    StatsFigures                      GET /v1/stats
    ├── BrokerFigures (inline)        Tmem.stats(): global figures
    │   ├── OpFigures (inline)        operation counters
    │   ├── guests: [GuestFigures]    one per guest (the admin's view)
    │   └── shared_pools: [SharedPoolFigures]
    ├── sheds_issued                  shed notices sent (the service's)
    └── pressure: PressureFigures     the pressure policy, with its loop's heartbeat
    GuestFigures                      Tmem.guest_stats(): what a guest may see of itself
    PoolFigures                       Tmem.pool_stats()
    ServiceFigures                    /metrics only: readiness, guests, notices published

The kinds (``metadata["kind"]``) and what ``/metrics`` makes of each:

``counter`` / ``gauge``
    a number (a bool is a 0/1 gauge; ``None`` is no sample).
``label``
    the id of a list entry (``guest_id``, ``uuid``): a label of every metric of the entry.
``info``
    a descriptive string: a label of the entry's ``..._info`` gauge, whose value is 1.
``inline`` / ``nested``
    a dataclass whose fields read as the parent's / under a prefix of their own.
``reasons``
    a dataclass of counts by reason: one metric with a ``reason`` label.
``each``
    a list of dataclasses: one series per entry, labelled by the entry's ``label`` fields.
``state``
    a string out of ``states``: a one-hot gauge with a ``state`` label.
``by_guest``
    ``{guest id: number}``: one metric with a ``guest_id`` label.
``count``
    a list exported as its length.

``private`` marks a figure a guest must not see (it depends on other guests' contents): the
guest's own view leaves it ``None``, and JSON and ``/metrics`` leave out a ``None`` private
figure (and a ``None`` nested one). A ``/metrics`` scrape without the admin token leaves out
every private figure, the broker-wide ones included (docs/security.md). The builders (:func:`broker.core.figures_build.op_figures` ...) fill them from the core's
objects.
"""

# The helpers below (counter, inline, ...) return dataclasses.field(...), not a shared mutable
# default, which is what RUF009 looks for.
# ruff: noqa: RUF009

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

# -- declaring a figure ---------------------------------------------------------------------


def counter(help: str, *, metric: str | None = None, private: bool = False) -> Any:
    """A count that only grows; ``metric`` names it in ``/metrics`` when the field's name
    lacks the unit (``_total`` is added there)."""
    return field(metadata={"kind": "counter", "help": help, "metric": metric, "private": private})


def gauge(help: str, *, metric: str | None = None, private: bool = False) -> Any:
    """A value that goes up and down (a bool reads 0/1; ``None`` is no sample)."""
    return field(metadata={"kind": "gauge", "help": help, "metric": metric, "private": private})


def label(help: str) -> Any:
    """The id of a list entry; a label of each of its metrics."""
    return field(metadata={"kind": "label", "help": help})


def info(help: str) -> Any:
    """A descriptive string; a label of its entry's ``_info`` metric."""
    return field(metadata={"kind": "info", "help": help})


def inline(model: type, help: str) -> Any:
    """A dataclass whose fields read as this one's (in JSON and in ``/metrics``)."""
    return field(metadata={"kind": "inline", "help": help, "model": model})


def nested(model: type, help: str, *, prefix: str) -> Any:
    """A dataclass (or ``None``) shown as a JSON object; its metrics are named ``prefix...``."""
    return field(
        default=None, metadata={"kind": "nested", "help": help, "model": model, "prefix": prefix}
    )


def reasons(model: type, help: str, *, metric: str | None = None) -> Any:
    """Counts by reason (a dataclass of counters): one metric labelled ``reason``."""
    return field(metadata={"kind": "reasons", "help": help, "model": model, "metric": metric})


def each(model: type, help: str, *, prefix: str, guest_view: bool = False) -> Any:
    """A list of entries; each one's metrics are named ``prefix...`` and carry its labels.
    ``guest_view``: export each entry as its guest may see it (``private`` figures left out)."""
    return field(
        metadata={
            "kind": "each",
            "help": help,
            "model": model,
            "prefix": prefix,
            "guest_view": guest_view,
        }
    )


def state(help: str, *, states: tuple[str, ...]) -> Any:
    """One of ``states``: a one-hot gauge labelled ``state``."""
    return field(metadata={"kind": "state", "help": help, "states": states})


def by_guest(help: str, *, metric: str) -> Any:
    """``{guest id (decimal string): number}``: a gauge labelled ``guest_id``."""
    return field(metadata={"kind": "by_guest", "help": help, "metric": metric})


def count(help: str, *, metric: str) -> Any:
    """A list, exported as how many entries it has."""
    return field(metadata={"kind": "count", "help": help, "metric": metric})


# -- the figures ----------------------------------------------------------------------------

COMPRESS_MODES = ("never", "always", "pressure")


@dataclass(slots=True, frozen=True, kw_only=True)
class Declines:
    """Puts declined (not stored), by reason; the reasons of a 409 ``not_stored``."""

    quota: int = counter("the guest was at its quota (cap or dynamic quota)")
    capacity: int = counter("no room: persistent pages fill the broker")
    frozen: int = counter("the guest was frozen")
    policy: int = counter("the admission policy declined an ephemeral put")


@dataclass(slots=True, frozen=True, kw_only=True)
class PolicyDeclines:
    """Puts the admission policy declined, by its sub-reason."""

    low_hit_rate: int = counter(
        "ephemeral puts declined because the guest's ephemeral pages were rarely got back"
    )
    predicted_useless: int = counter(
        "ephemeral puts declined because the policy predicted them useless (their object's "
        "pages kept being evicted unread; tinylfu only)"
    )
    poor_compression: int = counter(
        "ephemeral puts declined because they compressed poorly and were seen at most once "
        "lately (compressing guests, tinylfu only)"
    )


@dataclass(slots=True, frozen=True, kw_only=True)
class OpFigures:
    """Operation counters (of a pool, a guest, or the whole broker)."""

    puts: int = counter("page puts, stored or declined")
    puts_stored: int = counter("page puts that stored their page")
    puts_declined: Declines = reasons(Declines, "page puts declined (not stored), by reason")
    gets: int = counter("page gets, hit or miss")
    get_hits: int = counter("page gets that found their page")
    flushes: int = counter("page flushes, whether or not the page was there")
    flushes_found: int = counter("page flushes that found their page")
    object_flushes: int = counter("object flushes (every page of one object)")
    evictions: int = counter("ephemeral pages evicted to make room")
    compress_poor: int = counter(
        "pages of compressing guests stored raw because lz4 did not shrink them enough"
    )
    dedup_hits: int | None = counter(
        "puts whose content was already stored and was shared instead of copied",
        private=True,
        # None in a guest's own view
    )


@dataclass(slots=True, frozen=True, kw_only=True)
class PoolFigures:
    """One pool (``Tmem.pool_stats``); a shared pool's counters count every member's
    operations."""

    pool_id: int = label("the pool's id, per guest")
    kind: str = info("persistent (frontswap) or ephemeral (cleancache)")
    shared: bool = gauge("1 for a shared ephemeral pool")
    uuid: str | None = info("a shared pool's UUID (null for a private pool)")
    logical_pages: int = gauge("handles holding a page in the pool")
    zero_pages: int = gauge("handles holding an all-zero page in the pool")
    charged_bytes: int = gauge("the sum of the pool's pages' own stored sizes (charges)")
    compression_ratio: float = gauge(
        "non-zero pages x 4096 / charged bytes of the pool (1.0 when empty)"
    )
    ops: OpFigures = inline(OpFigures, "the pool's operation counters")


@dataclass(slots=True, frozen=True, kw_only=True)
class GuestFigures:
    """One guest. ``Tmem.guest_stats`` is what the guest itself may see (``private`` figures
    ``None``); ``Tmem.stats`` holds the admin's view of each."""

    guest_id: int = label("the guest's id")
    name: str = info("the guest's name")
    weight: int = gauge("the guest's eviction and fair-share weight")
    cap_pages: int | None = gauge(
        "the admin's cap on the guest's persistent pages (none: unbounded)"
    )
    quota_pages: int | None = gauge(
        "the guest's effective persistent quota: the lower of its cap and the pressure "
        "policy's dynamic quota (none: unbounded)"
    )
    frozen: bool = gauge("1 while the guest is frozen (its puts are declined)")
    compress: bool | None = gauge(
        "the guest's own compress setting: 1 always, 0 never (none: it inherits its dedup "
        "domain's mode, else the broker's)"
    )
    compress_mode: str = state(
        "the compression mode in force for the guest: never, always or pressure",
        states=COMPRESS_MODES,
    )
    dedup_domain: str = info("the guest's dedup domain (contents are shared only within one)")
    pools: int = gauge("pools the guest has (shared pools it joined included)")
    logical_pages: int = gauge("handles holding a page in the guest's private pools")
    zero_pages: int = gauge("handles holding an all-zero page in the guest's private pools")
    persistent_pages: int = gauge("persistent pages the guest holds (what its quota counts)")
    ephemeral_pages: int = gauge("ephemeral pages in the guest's private pools")
    charged_bytes: int = gauge(
        "the sum of the guest's pages' own stored sizes (charges), shared or not"
    )
    compression_ratio: float = gauge(
        "the guest's non-zero pages x 4096 / its charged bytes (1.0 when empty)"
    )
    ops: OpFigures = inline(OpFigures, "the guest's operation counters")
    policy_declines: PolicyDeclines = reasons(
        PolicyDeclines, "the guest's puts the admission policy declined, by reason"
    )


@dataclass(slots=True, frozen=True, kw_only=True)
class SharedPoolFigures:
    """One shared ephemeral pool (admin view); its pages count here, not in its members'."""

    uuid: str = label("the shared pool's UUID")
    members: list[int] = count("guests that have joined the shared pool", metric="members")
    weight: int = gauge("eviction weight: the largest weight of its members")
    evictions: int = counter("pages of the shared pool evicted to make room")
    logical_pages: int = gauge("handles holding a page in the shared pool")
    zero_pages: int = gauge("handles holding an all-zero page in the shared pool")
    charged_bytes: int = gauge("the sum of the shared pool's pages' own stored sizes")
    compression_ratio: float = gauge(
        "non-zero pages x 4096 / charged bytes of the shared pool (1.0 when empty)"
    )


@dataclass(slots=True, frozen=True, kw_only=True)
class BrokerFigures:
    """The whole broker (``Tmem.stats``, the admin's view)."""

    capacity_bytes: int = gauge("page storage the broker may use")
    used_bytes: int = gauge("page storage actually held (each stored content once)", private=True)
    charged_bytes: int = gauge("the sum of every page's own stored size (charge), shared or not")
    counted_bytes: int = gauge(
        "page storage counted against capacity: charges in untrusted dedup domains, bytes "
        "actually held in trusted ones; every capacity decision and the watermarks use this",
        private=True,
    )
    logical_pages: int = gauge("handles holding a page")
    unique_pages: int = gauge("distinct stored contents (all-zero pages not counted)", private=True)
    zero_pages: int = gauge("handles holding an all-zero page (no storage)")
    persistent_pages: int = gauge("pages in persistent pools")
    ephemeral_pages: int = gauge("pages in ephemeral pools, shared ones included")
    dedup_ratio: float = gauge(
        "non-zero logical pages / unique pages (1.0 when empty)", private=True
    )
    compression_ratio: float = gauge(
        "unique pages x 4096 / used bytes (1.0 when empty)", private=True
    )
    ops: OpFigures = inline(OpFigures, "operation counters of every guest, removed ones included")
    policy_declines: PolicyDeclines = reasons(
        PolicyDeclines, "puts the admission policy declined, by reason"
    )
    reclaimed_on_put: int = counter(
        "ephemeral pages evicted by puts above the high watermark",
        metric="reclaimed_on_put_pages",
    )
    compress_default: str = state(
        "the broker's compression mode for guests and domains that set none",
        states=COMPRESS_MODES,
    )
    compressed_cold: int = counter(
        "stored pages the pressure mode's background pass compressed", private=True
    )
    recompressed_pages: int = counter(
        "idle lz4 pages the idle pass keeps as zstd (--recompress)", private=True
    )
    recompressed_saved_bytes: int = counter(
        "bytes of charges the idle pass's recompression saved", private=True
    )
    guests: list[GuestFigures] = each(
        GuestFigures, "one entry per guest", prefix="guest_", guest_view=True
    )
    shared_pools: list[SharedPoolFigures] = each(
        SharedPoolFigures, "one entry per shared pool", prefix="shared_pool_"
    )


PRESSURE_STATES = ("normal", "reclaiming", "quotas_lowered")


@dataclass(slots=True, frozen=True, kw_only=True)
class LoopFigures:
    """The pressure loop's heartbeat (also ``/readyz``'s ``pressure_loop``)."""

    running: bool = gauge("1 while the pressure loop runs")
    steps: int = counter("pressure policy steps taken")
    last_step_age_s: float | None = gauge(
        "seconds since the last step (none before the first)",
        metric="last_step_age_seconds",
    )
    failures: int = counter("pressure steps that failed (the loop carries on)")


@dataclass(slots=True, frozen=True, kw_only=True)
class PressureFigures:
    """The memory-pressure policy (``docs/pressure.md``)."""

    state: str = state(
        "the pressure state: normal, reclaiming (evicting down to the low watermark) or "
        "quotas_lowered (persistent quotas lowered, sheds open)",
        states=PRESSURE_STATES,
    )
    high_watermark_bytes: int = gauge("page storage above which ephemeral pages are evicted")
    low_watermark_bytes: int = gauge("page storage eviction brings the broker back under")
    persistent_trigger_pages: int = gauge("persistent pages above which quotas are lowered")
    persistent_release_pages: int = gauge("persistent pages below which quotas are released")
    sheds_issued: int = counter("shed requests the policy issued (admins' included)")
    admin_sheds: int = counter("shed requests admins made (POST /v1/guests/{id}/shed)")
    sheds_acked: int = counter("shed requests guests acknowledged")
    sheds_met: int = counter("sheds a guest met (came under its quota) by the deadline")
    sheds_overdue: int = counter("sheds whose deadline passed with the guest still over")
    sheds_open: int = gauge("sheds not yet met")
    guests_overdue: int = gauge("guests past a shed's deadline (their puts declined: quota)")
    pages_returned: int = counter("persistent pages guests said they returned in shed acks")
    quotas_lowered: int = counter("dynamic quotas lowered")
    quotas_raised: int = counter("dynamic quotas raised or released")
    reclaim_runs: int = counter("policy steps that evicted ephemeral pages")
    reclaimed_pages: int = counter("ephemeral pages the policy steps evicted")
    compressed_pages: int = counter(
        "cold pages the policy steps compressed (guests in the pressure compression mode)",
        private=True,
    )
    evicted_notices: int = counter("evicted notices sent to guests")
    steps: int = counter("policy steps taken")
    dynamic_quotas: dict[str, int] = by_guest(
        "the dynamic persistent quota in force for a guest", metric="dynamic_quota_pages"
    )
    loop: LoopFigures | None = nested(LoopFigures, "the loop's heartbeat", prefix="loop_")


HOST_STATES = ("normal", "shrunk", "recovering")


@dataclass(slots=True, frozen=True, kw_only=True)
class HostFigures:
    """The host the broker runs on and what it did to the capacity (docs/pressure.md,
    "Host-aware capacity"); present when the broker watches its host."""

    state: str = state(
        "normal (capacity as configured), shrunk (the host ran short on the last reading) or "
        "recovering (below the configured capacity, growing back)",
        states=HOST_STATES,
    )
    base_capacity_bytes: int = gauge("the configured capacity (--capacity, or auto's size)")
    effective_capacity_bytes: int = gauge("the capacity in force after the host's readings")
    shrunk_by_bytes: int = gauge("how far the host's readings lowered the capacity")
    floor_bytes: int = gauge("the least capacity the host's readings may leave")
    last_reason: str | None = info("why the capacity last changed (mem_available, psi, ...)")
    shrinks: int = counter("times the capacity shrank because the host ran short")
    grows: int = counter("times the capacity grew back")
    readings: int = counter("host readings taken")
    read_errors: int = counter("host readings that failed (the last capacity kept)")
    mem_total_bytes: int | None = gauge("MemTotal of the host")
    mem_available_bytes: int | None = gauge("MemAvailable of the host")
    limit_bytes: int | None = gauge("MemTotal, or the cgroup's memory limit when lower")
    available_bytes: int | None = gauge(
        "the least of MemAvailable and the cgroup's room (limit less working set)"
    )
    used_percent: float | None = gauge("100 x (1 - available / limit)")
    swap_free_bytes: int | None = gauge("SwapFree of the host")
    psi_some_avg10: float | None = gauge(
        "PSI memory some avg10: percent of the last 10 s some task stalled on memory"
    )
    psi_full_avg10: float | None = gauge(
        "PSI memory full avg10: percent of the last 10 s every task stalled on memory"
    )
    cgroup_limit_bytes: int | None = gauge("the broker's cgroup memory limit (none: no limit)")
    limited_by: str | None = info("host or cgroup: what sets the limit")


@dataclass(slots=True, frozen=True, kw_only=True)
class StatsFigures:
    """``GET /v1/stats``: the core's figures, the shed notices sent and the pressure policy."""

    broker: BrokerFigures = inline(BrokerFigures, "the core's global figures")
    sheds_issued: int = counter("shed notices sent to guests")
    pressure: PressureFigures | None = nested(
        PressureFigures, "the pressure policy", prefix="pressure_"
    )
    host: HostFigures | None = nested(HostFigures, "the host's memory", prefix="host_")


@dataclass(slots=True, frozen=True, kw_only=True)
class ServiceFigures:
    """``/metrics`` only: the service around the core."""

    ready: bool = gauge("1 when the broker serves (its journal is reloaded)")
    guests: int = gauge("guests known to the broker")
    notices_published: int = counter("notices sent to guests, of every type")


# -- JSON -----------------------------------------------------------------------------------


def as_json(figures: Any) -> dict[str, Any]:
    """The figures as the JSON object the API shows: ``inline`` fields merged into their
    parent, ``None`` private or nested figures left out, every other field under its own name
    (``None`` as null)."""
    out: dict[str, Any] = {}
    for f in fields(figures):
        value = getattr(figures, f.name)
        if f.metadata.get("kind") == "inline":
            out.update(as_json(value))
        elif value is None and (f.metadata.get("private") or f.metadata.get("kind") == "nested"):
            continue  # absent, not null: a guest's view, or no pressure loop
        else:
            out[f.name] = _json_value(value)
    return out


def _json_value(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return as_json(value)
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value
