"""Memory-pressure policy: watermarks, weighted fair shares, sheds and ephemeral admission.

Pure functions and small state objects; the caller passes the time (``now``, seconds on a
monotonic clock) and the figures, and acts on what they return. Nothing here drops a
persistent page: the policy only lowers quotas, asks guests to shed (``shed`` notices) and,
past a shed's deadline, declines the overdue guest's persistent puts with ``quota``.

The tunables (:class:`PressureSettings`) and what they do:

``high_watermark`` / ``low_watermark`` (fractions of capacity)
    Once page storage rises above the high watermark the broker evicts ephemeral pages
    (weight-fair LRU) until it is back under the low watermark: hysteresis in the spirit of
    zswap's ``accept_threshold_percent``, so the broker does not evict a page per put while
    it hovers at the limit.
    Storage is counted as ``counted_bytes``, as in every capacity decision: each page's own
    stored size, shared or not, in untrusted dedup domains (so no guest can read other
    guests' contents off evictions), and the bytes actually held in trusted ones.
``persistent_share`` / ``release_share`` (fractions of capacity)
    When persistent pages take more than ``persistent_share`` of capacity, each guest's fair
    share of ``persistent_share * capacity`` is computed (:func:`fair_shares`); guests above
    their share get a lower quota (``quota`` notice) and a ``shed`` notice for the excess.
    When persistent pages fall under ``release_share``, quotas return to the admin caps.
``shed_deadline_s``
    How long a guest has to come under its lowered quota before its persistent puts are
    declined with ``quota``.
``pressure_boost`` / ``pressure_ttl_s`` / ``pressure_low_available_bytes`` /
``pressure_free_available_bytes`` / ``pressure_free_discount``
    A guest's pressure report (PSI some and full, MemAvailable, swap used) turns into a
    multiplier of its weight (:func:`pressure_multiplier`, the formula is in
    docs/pressure.md): between ``1 - pressure_free_discount`` (plenty of memory free) and
    ``1 + pressure_boost`` (close to OOM). It weighs in the fair share of persistent pages
    (more headroom, shed last) and in the choice of the account whose ephemeral pages go
    (:mod:`broker.core.eviction`); sheds go out to the lowest multipliers first. With PSI
    some alone it is ``1 + pressure_boost * psi / 100``, the rule before the other fields
    counted. Reports older than ``pressure_ttl_s`` are ignored (multiplier 1).
``ephemeral_policy``
    Which page of an eviction account goes: ``lru`` or ``tinylfu`` (:mod:`broker.core.policy`).
``admission_min_hit_rate`` / ``admission_min_samples`` / ``admission_floor`` / ``admission_window``
    While memory is tight (above the low watermark), a guest whose ephemeral pages are rarely
    got back (hit rate, over roughly the last ``admission_window`` ephemeral puts, below
    ``admission_min_hit_rate``) has only a fraction of its ephemeral puts admitted:
    ``max(admission_floor, hit_rate / admission_min_hit_rate)``. The others are declined with
    ``policy``. Zero pages cost nothing and are always admitted.
``evicted_notice_interval_s``
    ``evicted`` notices are batched: at most one per guest per interval.

:class:`PressurePolicy` puts these together. The service calls ``step(now, reports)`` from a
background loop (tests call it with a fake clock) and turns the returned :class:`Intent`
objects into notices; it reports back the sequence number of each shed it sent
(:meth:`PressurePolicy.shed_sent`) and the guests' acks (:meth:`PressurePolicy.acked`).
The put path's part (reclaim step, admission gate, the quota limit) is in the core
(:meth:`broker.core.Tmem.configure_pressure`, :meth:`broker.core.Tmem.set_quota`).
Sheds and dynamic quotas live in memory only: after a restart the first step re-derives them
from the pages held (a guest still above its share gets a new quota and a new shed with a
fresh deadline).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from broker.core.figures import PRESSURE_STATES, PressureFigures
from broker.core.policy import LRU, check_policy
from schemas.batch import PAGE_SIZE


class PressureTarget(Protocol):
    """What the policy reads and drives: :class:`broker.core.Tmem` (a protocol here, so that
    this module and the core's modules do not import each other)."""

    @property
    def capacity_bytes(self) -> int: ...

    @property
    def counted_bytes(self) -> int: ...

    @property
    def reclaiming(self) -> bool: ...

    def configure_pressure(self, settings: PressureSettings | None) -> None: ...

    def evict(self, bytes_to_free: int) -> int: ...

    def compress_cold(self, max_pages: int) -> int: ...

    def recompress_idle(self, max_pages: int = ...) -> int: ...

    def persistent_pages_of(self) -> dict[int, tuple[int, int, int | None]]: ...

    def set_quota(
        self, guest_id: int, quota_pages: int | None, *, hold: int | None = None
    ) -> None: ...

    def quota_of(self, guest_id: int) -> int | None: ...

    def drain_evicted(self, guest_id: int) -> int: ...

    def set_pressure_bias(self, guest_id: int, bias: float) -> None: ...


@dataclass
class PressureSettings:
    """Every tunable of the pressure policy; see the module docstring for their meaning."""

    high_watermark: float = 0.95
    low_watermark: float = 0.85
    persistent_share: float = 0.75
    release_share: float = 0.60
    shed_deadline_s: float = 30.0
    pressure_boost: float = 1.0
    pressure_ttl_s: float = 30.0
    admission_min_hit_rate: float = 0.05
    admission_min_samples: int = 512
    admission_floor: float = 0.10
    admission_window: int = 8192
    evicted_notice_interval_s: float = 5.0
    pressure_low_available_bytes: int = 256 << 20
    pressure_free_available_bytes: int = 1 << 30
    pressure_free_discount: float = 0.5
    ephemeral_policy: str = LRU

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError when the settings contradict each other."""
        if not 0.0 < self.low_watermark <= self.high_watermark <= 1.0:
            raise ValueError("need 0 < low_watermark <= high_watermark <= 1")
        if not 0.0 < self.release_share <= self.persistent_share <= 1.0:
            raise ValueError("need 0 < release_share <= persistent_share <= 1")
        if self.shed_deadline_s <= 0 or self.pressure_ttl_s <= 0:
            raise ValueError("deadlines and ttls must be positive")
        if self.evicted_notice_interval_s <= 0:
            raise ValueError("evicted_notice_interval_s must be positive")
        if self.pressure_boost < 0:
            raise ValueError("pressure_boost must be >= 0")
        if not 0.0 <= self.admission_min_hit_rate <= 1.0:
            raise ValueError("admission_min_hit_rate must be within [0, 1]")
        if not 0.0 < self.admission_floor <= 1.0:
            raise ValueError("admission_floor must be within (0, 1]")
        if self.admission_min_samples < 0 or self.admission_window < 1:
            raise ValueError("admission_min_samples >= 0 and admission_window >= 1")
        if 2 * self.admission_min_samples > self.admission_window:
            # the decayed put count swings between window/2 and window: a larger minimum would
            # be reached only now and then, or never, and the gate would silently stay open
            raise ValueError("admission_min_samples must be at most admission_window / 2")
        if not 0 < self.pressure_low_available_bytes < self.pressure_free_available_bytes:
            raise ValueError(
                "need 0 < pressure_low_available_bytes < pressure_free_available_bytes"
            )
        if not 0.0 <= self.pressure_free_discount < 1.0:
            raise ValueError("pressure_free_discount must be within [0, 1)")
        check_policy(self.ephemeral_policy)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def updated(self, changes: dict[str, Any]) -> PressureSettings:
        """A validated copy with ``changes`` applied (unknown names raise KeyError)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise KeyError(", ".join(sorted(unknown)))
        merged = self.as_dict() | changes
        return PressureSettings(**merged)


def bytes_to_reclaim(used: int, capacity: int, settings: PressureSettings) -> int:
    """How many bytes the background loop should evict now: nothing until used storage is
    above the high watermark, then down to the low watermark."""
    if capacity <= 0 or used <= settings.high_watermark * capacity:
        return 0
    return max(0, used - math.floor(settings.low_watermark * capacity))


@dataclass(frozen=True, slots=True)
class Claim:
    """One guest's standing in the fair-share computation."""

    guest_id: int
    weight: float
    cap: int | None
    demand: int


# PSI full counts this many times PSI some: every task stalled is much closer to OOM than one
PSI_FULL_GAIN = 4.0


def _clamp(x: float) -> float:
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else x


def memory_need(report: GuestPressure, settings: PressureSettings) -> float:
    """How close the guest is to OOM, 0..1 (docs/pressure.md, "Feedback from the guest")::

        need = max(psi_some / 100, min(1, PSI_FULL_GAIN * psi_full / 100),
                   (L - available) / L  (clamped to 0..1),
                   swap_used / (swap_used + available))

    ``L``: ``pressure_low_available_bytes``. A field not reported counts 0."""
    need = 0.0
    if report.psi_some is not None:
        need = _clamp(report.psi_some / 100.0)
    if report.psi_full is not None:
        need = max(need, _clamp(PSI_FULL_GAIN * report.psi_full / 100.0))
    available = report.mem_available
    if available is not None:
        low = settings.pressure_low_available_bytes
        need = max(need, _clamp((low - available) / low))
        swap = report.swap_used
        if swap is not None and swap + available > 0:
            need = max(need, swap / (swap + available))
    return need


def memory_free(report: GuestPressure, settings: PressureSettings, need: float) -> float:
    """How much memory the guest has to spare, 0..1::

        free = (available - L) / (F - L)  (clamped to 0..1)  *  (1 - need)

    ``L``, ``F``: ``pressure_low_available_bytes``, ``pressure_free_available_bytes``; 0 when
    MemAvailable is not reported."""
    if report.mem_available is None:
        return 0.0
    low, high = settings.pressure_low_available_bytes, settings.pressure_free_available_bytes
    return _clamp((report.mem_available - low) / (high - low)) * (1.0 - need)


def pressure_multiplier(report: GuestPressure | None, settings: PressureSettings) -> float:
    """What the guest's weight is multiplied by (``None``: no fresh report, 1)::

        multiplier = (1 + pressure_boost * need) * (1 - pressure_free_discount * free)

    within ``[1 - pressure_free_discount, 1 + pressure_boost]``."""
    if report is None:
        return 1.0
    need = memory_need(report, settings)
    free = memory_free(report, settings, need)
    return (1.0 + settings.pressure_boost * need) * (1.0 - settings.pressure_free_discount * free)


def effective_weight(weight: int, psi_some: float | None, settings: PressureSettings) -> float:
    """A guest's weight raised by its reported PSI some alone (``None``: no fresh report);
    :func:`pressure_multiplier` weighs every field of a report."""
    if psi_some is None:
        return float(weight)
    return weight * pressure_multiplier(GuestPressure(psi_some, 0.0), settings)


def fair_shares(budget: int, claims: Sequence[Claim]) -> dict[int, int]:
    """Weighted max-min fair shares of ``budget`` pages (water filling).

    Each guest is entitled to ``level * weight`` pages, never more than its cap; ``level`` is
    the highest value at which the guests' demands, each limited to its entitlement, fit the
    budget. A guest below the level keeps room to grow to it. When every demand fits, every
    guest's share is its cap (``None``: unbounded, returned as the budget).
    """
    if budget < 0:
        raise ValueError("budget must be >= 0")
    live = [c for c in claims if c.weight > 0]
    want = {c.guest_id: c.demand if c.cap is None else min(c.demand, c.cap) for c in live}
    if sum(want.values()) <= budget:
        return {c.guest_id: budget if c.cap is None else min(c.cap, budget) for c in live}
    remaining = float(budget)
    weight_left = sum(c.weight for c in live)
    level = math.inf
    for c in sorted(live, key=lambda c: want[c.guest_id] / c.weight):
        need = want[c.guest_id]
        if need <= c.weight * remaining / weight_left:
            remaining -= need
            weight_left -= c.weight
            continue
        level = remaining / weight_left
        break
    shares: dict[int, int] = {}
    for c in live:
        entitled = math.floor(level * c.weight) if level != math.inf else budget
        shares[c.guest_id] = entitled if c.cap is None else min(c.cap, entitled)
    return shares


@dataclass(slots=True)
class Shed:
    """A shed request to one guest: return ``pages`` persistent pages by ``deadline``.

    ``seq`` is the notice's sequence number once the service sent it (0 until then)."""

    seq: int
    pages: int
    deadline: float
    acked: bool = False
    pages_returned: int = 0
    overdue: bool = False
    admin: bool = False  # asked by an admin (POST /v1/guests/{id}/shed), not by the shares


@dataclass(frozen=True, slots=True)
class GuestPressure:
    """A guest's latest pressure report and when it arrived (``at``, on the policy's
    monotonic clock): PSI ``some avg10`` and ``full avg10`` (percent), MemAvailable and swap
    used (bytes); None: not reported."""

    psi_some: float | None
    at: float
    psi_full: float | None = None
    mem_available: int | None = None
    swap_used: int | None = None


@dataclass(frozen=True, slots=True)
class Intent:
    """Something the service should tell a guest.

    ``kind`` ``quota``: the effective quota is now ``cap_pages``; ``shed``: return ``pages``
    persistent pages by ``deadline`` (policy clock); ``evicted``: ``pages`` ephemeral pages
    were evicted since the last such notice."""

    kind: str
    guest_id: int
    cap_pages: int | None = None
    pages: int | None = None
    deadline: float | None = None


# declared with the figures, which export the state as a one-hot gauge
NORMAL, RECLAIMING, QUOTAS_LOWERED = PRESSURE_STATES


@dataclass
class _Counters:
    sheds_issued: int = 0
    sheds_acked: int = 0
    sheds_met: int = 0
    sheds_overdue: int = 0
    admin_sheds: int = 0
    pages_returned: int = 0
    quotas_lowered: int = 0
    quotas_raised: int = 0
    reclaim_runs: int = 0
    reclaimed_pages: int = 0
    compressed_pages: int = 0
    evicted_notices: int = 0
    steps: int = 0
    last: dict[str, int] = field(default_factory=dict)


class PressurePolicy:
    """The broker's memory-pressure decisions; see the module docstring for the rules.

    Not thread-safe; call from the thread that uses the ``Tmem`` (the event loop)::

        policy = PressurePolicy(tmem, PressureSettings(), now=clock())
        for intent in policy.step(clock(), reports):   # reports: guest_id -> GuestPressure
            seq = send(intent)                          # a notice
            if intent.kind == "shed":
                policy.shed_sent(intent.guest_id, seq)
        policy.acked(guest_id, seq, pages_returned)     # when the guest acks
    """

    # the largest single eviction a step makes, so one step never holds the loop for long
    MAX_EVICT_BYTES_PER_STEP = 64 << 20
    # at most this many cold pages compressed per step (~6 us each: ~25 ms a step)
    MAX_COMPRESS_PER_STEP = 4096
    # closed sheds kept for a late ack; beyond this the oldest are forgotten (a guest that
    # never acks must not grow the broker's memory)
    MAX_UNACKED = 4096

    def __init__(self, tmem: PressureTarget, settings: PressureSettings, *, now: float) -> None:
        self.tmem = tmem
        self.settings = settings
        tmem.configure_pressure(settings)
        self.started = now
        self.lowered = False
        self.reclaiming = False
        self.quotas: dict[int, int] = {}  # dynamic quotas in force
        # open admin sheds: the quota each guest must come down to (on top of self.quotas)
        self.admin_targets: dict[int, int] = {}
        self.sheds: dict[int, Shed] = {}  # the open shed of each guest
        self._unacked: dict[tuple[int, int], Shed] = {}  # closed sheds still awaiting an ack
        self._last_evicted: dict[int, float] = {}
        self.counters = _Counters()

    # -- settings ---------------------------------------------------------------------------

    def update_settings(self, settings: PressureSettings) -> None:
        """Use new settings from the next step on (the core's hooks at once)."""
        self.settings = settings
        self.tmem.configure_pressure(settings)

    # -- figures ----------------------------------------------------------------------------

    @property
    def state(self) -> str:
        if self.lowered:
            return QUOTAS_LOWERED
        return RECLAIMING if self.reclaiming or self.tmem.reclaiming else NORMAL

    def budget_pages(self) -> tuple[int, int]:
        """(persistent pages above which quotas are lowered, below which they are released)."""
        cap = self.tmem.capacity_bytes
        s = self.settings
        return (
            math.floor(s.persistent_share * cap) // PAGE_SIZE,
            math.floor(s.release_share * cap) // PAGE_SIZE,
        )

    def figures(self) -> PressureFigures:
        """What ``/v1/stats`` shows under ``pressure`` (the loop adds its heartbeat)."""
        cap = self.tmem.capacity_bytes
        s = self.settings
        trigger, release = self.budget_pages()
        c = self.counters
        return PressureFigures(
            state=self.state,
            high_watermark_bytes=math.floor(s.high_watermark * cap),
            low_watermark_bytes=math.floor(s.low_watermark * cap),
            persistent_trigger_pages=trigger,
            persistent_release_pages=release,
            sheds_issued=c.sheds_issued,
            sheds_acked=c.sheds_acked,
            sheds_met=c.sheds_met,
            sheds_overdue=c.sheds_overdue,
            admin_sheds=c.admin_sheds,
            sheds_open=len(self.sheds),
            guests_overdue=sum(1 for sh in self.sheds.values() if sh.overdue),
            pages_returned=c.pages_returned,
            quotas_lowered=c.quotas_lowered,
            quotas_raised=c.quotas_raised,
            reclaim_runs=c.reclaim_runs,
            reclaimed_pages=c.reclaimed_pages,
            compressed_pages=c.compressed_pages,
            evicted_notices=c.evicted_notices,
            steps=c.steps,
            dynamic_quotas={str(g): q for g, q in sorted(self.quotas.items())},
        )

    # -- feedback from the service ----------------------------------------------------------

    def shed_sent(self, guest_id: int, seq: int) -> None:
        """The shed intent for ``guest_id`` went out as notice ``seq``."""
        shed = self.sheds.get(guest_id)
        if shed is not None and shed.seq == 0:
            shed.seq = seq

    def acked(self, guest_id: int, seq: int, pages_returned: int) -> bool:
        """A guest acked notice ``seq``; True when it was one of our sheds."""
        shed = self.sheds.get(guest_id)
        if shed is None or shed.seq != seq:
            shed = self._unacked.pop((guest_id, seq), None)
        if shed is None or shed.acked:
            return False
        shed.acked = True
        shed.pages_returned = pages_returned
        self.counters.sheds_acked += 1
        self.counters.pages_returned += pages_returned
        return True

    def _set_quota(self, gid: int, quota: int | None, *, hold: int | None = None) -> None:
        """Set the guest's dynamic quota in the core: the policy's ``quota``, or an open
        admin shed's target when that is lower."""
        target = self.admin_targets.get(gid)
        if target is not None and (quota is None or target < quota):
            quota = target
        self.tmem.set_quota(gid, quota, hold=hold)

    def admin_shed(
        self, now: float, guest_id: int, pages: int, deadline_s: float | None = None
    ) -> list[Intent]:
        """An admin asks the guest to return ``pages`` persistent pages within
        ``deadline_s`` (default ``shed_deadline_s``): its quota becomes what it holds minus
        ``pages`` (at most what it holds), held at the current count until the deadline, as a
        shed of the shares is (docs/pressure.md, "Sheds"). Returns the ``quota`` and ``shed``
        intents to send (none when the guest holds no persistent page). The shed is met
        once the guest is down by ``pages``; then its quota is the policy's again.
        UnknownGuest (from the core) for a guest not known."""
        held = self.tmem.persistent_pages_of()
        if guest_id not in held:
            self.tmem.quota_of(guest_id)  # raises UnknownGuest
        have = held[guest_id][0]
        pages = min(pages, have)
        if pages <= 0:
            return []
        deadline = now + (self.settings.shed_deadline_s if deadline_s is None else deadline_s)
        old = self.sheds.get(guest_id)
        if old is not None and old.seq and not old.acked:
            self._unacked[(guest_id, old.seq)] = old
        target = have - pages
        prior = self.admin_targets.get(guest_id)
        self.admin_targets[guest_id] = target if prior is None else min(prior, target)
        overdue = old is not None and old.overdue
        self.sheds[guest_id] = Shed(seq=0, pages=pages, deadline=deadline, admin=True)
        self.sheds[guest_id].overdue = overdue
        self._set_quota(guest_id, self.quotas.get(guest_id), hold=None if overdue else have)
        self.counters.sheds_issued += 1
        self.counters.admin_sheds += 1
        return [
            Intent("quota", guest_id, cap_pages=self.tmem.quota_of(guest_id)),
            Intent("shed", guest_id, pages=pages, deadline=deadline),
        ]

    def forget(self, guest_id: int) -> None:
        """The guest was removed."""
        self.admin_targets.pop(guest_id, None)
        self.quotas.pop(guest_id, None)
        self.sheds.pop(guest_id, None)
        self._last_evicted.pop(guest_id, None)
        for key in [k for k in self._unacked if k[0] == guest_id]:
            del self._unacked[key]

    # -- the step ---------------------------------------------------------------------------

    def step(self, now: float, reports: Mapping[int, GuestPressure]) -> list[Intent]:
        """One round of every rule; returns what the guests must be told, in order."""
        intents: list[Intent] = []
        self.counters.steps += 1
        held = self.tmem.persistent_pages_of()
        multipliers = self._multipliers(now, held, reports)
        self._watermarks()
        known = self.quotas.keys() | self.sheds.keys() | self._last_evicted.keys()
        for gid in [g for g in known if g not in held]:
            self.forget(gid)
        self._quotas(now, held, multipliers, intents)
        self._deadlines(now, held, intents)
        self._evicted(now, held, intents)
        return intents

    def _watermarks(self) -> None:
        tmem = self.tmem
        # Guests in the pressure compression mode first keep their coldest pages compressed
        # (a no-op when none is in that mode or storage is under the high watermark).
        self.counters.compressed_pages += tmem.compress_cold(self.MAX_COMPRESS_PER_STEP)
        tmem.recompress_idle()  # idle lz4 pages as zstd, when enabled (docs/pressure.md)
        # counted_bytes, as every capacity decision: in untrusted domains what sharing saved
        # must not show
        reclaim = bytes_to_reclaim(tmem.counted_bytes, tmem.capacity_bytes, self.settings)
        self.reclaiming = reclaim > 0
        if reclaim:
            self.counters.reclaim_runs += 1
            self.counters.reclaimed_pages += tmem.evict(min(reclaim, self.MAX_EVICT_BYTES_PER_STEP))

    def _multipliers(
        self,
        now: float,
        held: Mapping[int, tuple[int, int, int | None]],
        reports: Mapping[int, GuestPressure],
    ) -> dict[int, float]:
        """Each guest's pressure multiplier (1 without a fresh report), also given to the
        core as its eviction bias before this step evicts anything."""
        ttl = self.settings.pressure_ttl_s
        out: dict[int, float] = {}
        for gid in held:
            report = reports.get(gid)
            fresh = report if report is not None and now - report.at <= ttl else None
            m = pressure_multiplier(fresh, self.settings)
            shed = self.sheds.get(gid)
            if shed is not None and shed.overdue:
                # escalation: a guest past a shed's deadline weighs least (its ephemeral
                # pages go first, its persistent share is the smallest) until it is met
                m = min(m, 1.0 - self.settings.pressure_free_discount)
            out[gid] = m
            self.tmem.set_pressure_bias(gid, m)
        return out

    def _quotas(
        self,
        now: float,
        held: Mapping[int, tuple[int, int, int | None]],
        multipliers: Mapping[int, float],
        intents: list[Intent],
    ) -> None:
        trigger, release = self.budget_pages()
        total = sum(pages for pages, _, _ in held.values())
        if total <= release:
            if self.lowered:
                self._release(held, intents)
            return
        if total <= trigger:
            return  # hysteresis: quotas stay as they are between the two shares
        self.lowered = True
        claims = [
            Claim(gid, weight * multipliers[gid], cap, pages)
            for gid, (pages, weight, cap) in held.items()
        ]
        shares = fair_shares(trigger, claims)
        # changes smaller than this are not worth a notice (the level moves by a few pages
        # whenever a small guest grows)
        slack = max(1, trigger // 256)
        # the guests with memory to spare hear first, those closest to OOM last (sorted is
        # stable: equal multipliers keep the order the guests were added)
        for gid in sorted(held, key=multipliers.__getitem__):
            pages, _, cap = held[gid]
            share = shares.get(gid, 0)
            old = self.quotas.get(gid)
            if old is None and cap is not None and share >= cap:
                continue  # the admin's cap binds before the share does
            if old is not None and abs(share - old) <= slack:
                continue
            self.quotas[gid] = share
            if old is None or share < old:
                self.counters.quotas_lowered += 1
            else:
                self.counters.quotas_raised += 1
            shed = self.sheds.get(gid)
            if pages <= share:
                # under its share: no grace needed (an open shed is met at the next check)
                self._set_quota(gid, share)
                intents.append(Intent("quota", gid, cap_pages=self.tmem.quota_of(gid)))
                continue
            if shed is not None and (old is None or share >= old):
                # a raised quota while a shed is open: the shed stands, with less to return
                self._set_quota(gid, share, hold=None if shed.overdue else pages)
                intents.append(Intent("quota", gid, cap_pages=self.tmem.quota_of(gid)))
                continue
            # lowered (first time or further): a quota notice and a shed for the excess
            if shed is not None and shed.seq and not shed.acked:
                self._unacked[(gid, shed.seq)] = shed
            overdue = shed is not None and shed.overdue
            deadline = now + self.settings.shed_deadline_s
            self.sheds[gid] = Shed(
                seq=0,
                pages=pages - share,
                deadline=deadline,
                overdue=overdue,
                admin=shed is not None and shed.admin,
            )
            # grace until the deadline: it keeps what it holds but cannot grow (an overdue
            # guest gets no new grace)
            self._set_quota(gid, share, hold=None if overdue else pages)
            self.counters.sheds_issued += 1
            intents.append(Intent("quota", gid, cap_pages=self.tmem.quota_of(gid)))
            intents.append(Intent("shed", gid, pages=pages - share, deadline=deadline))

    def _release(
        self, held: Mapping[int, tuple[int, int, int | None]], intents: list[Intent]
    ) -> None:
        """Pressure eased: every dynamic quota goes; the guests hear their admin caps again."""
        self.lowered = False
        for gid in sorted(self.quotas):
            if gid not in held:
                continue
            self._set_quota(gid, None)  # an open admin shed's target stays
            self.counters.quotas_raised += 1
            intents.append(Intent("quota", gid, cap_pages=self.tmem.quota_of(gid)))
        self.quotas.clear()
        for gid, shed in list(self.sheds.items()):
            if shed.admin:
                continue  # an admin's shed stands until met
            if not shed.acked and shed.seq:
                self._unacked[(gid, shed.seq)] = shed
            del self.sheds[gid]

    def _deadlines(
        self, now: float, held: Mapping[int, tuple[int, int, int | None]], intents: list[Intent]
    ) -> None:
        while len(self._unacked) > self.MAX_UNACKED:
            del self._unacked[next(iter(self._unacked))]
        for gid in list(self.sheds):
            shed = self.sheds[gid]
            pages = held[gid][0] if gid in held else 0
            quota = self.tmem.quota_of(gid) if gid in held else None
            if quota is None or pages <= quota:
                # met: the grace hold goes (nothing to hold any more)
                del self.sheds[gid]
                if not shed.overdue:
                    self.counters.sheds_met += 1
                if not shed.acked and shed.seq:
                    self._unacked[(gid, shed.seq)] = shed
                self.admin_targets.pop(gid, None)  # met: the policy's quota again
                if gid in held:
                    self._set_quota(gid, self.quotas.get(gid))
            elif not shed.overdue and now >= shed.deadline:
                # past the deadline and still above: the lowered quota is enforced from now on
                # (its persistent puts are declined with ``quota`` until it is under)
                shed.overdue = True
                self.counters.sheds_overdue += 1
                self._set_quota(gid, self.quotas.get(gid))
                # the guest hears that its quota binds now (its puts are declined: quota)
                intents.append(Intent("quota", gid, cap_pages=self.tmem.quota_of(gid)))

    def _evicted(
        self, now: float, held: Mapping[int, tuple[int, int, int | None]], intents: list[Intent]
    ) -> None:
        interval = self.settings.evicted_notice_interval_s
        for gid in held:
            last = self._last_evicted.get(gid)
            if last is not None and now - last < interval:
                continue
            pages = self.tmem.drain_evicted(gid)
            if pages:
                self._last_evicted[gid] = now
                self.counters.evicted_notices += 1
                intents.append(Intent("evicted", gid, pages=pages))
