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
``persistent_share`` / ``release_share`` (fractions of capacity)
    When persistent pages take more than ``persistent_share`` of capacity, each guest's fair
    share of ``persistent_share * capacity`` is computed (:func:`fair_shares`); guests above
    their share get a lower quota (``quota`` notice) and a ``shed`` notice for the excess.
    When persistent pages fall under ``release_share``, quotas return to the admin caps.
``shed_deadline_s``
    How long a guest has to come under its lowered quota before its persistent puts are
    declined with ``quota``.
``pressure_boost`` / ``pressure_ttl_s``
    A guest's reported memory pressure (PSI ``some avg10``, percent) raises its weight in the
    fair-share computation: ``weight * (1 + pressure_boost * psi / 100)``. Reports older than
    ``pressure_ttl_s`` are ignored.
``admission_min_hit_rate`` / ``admission_min_samples`` / ``admission_floor`` / ``admission_window``
    While memory is tight (above the low watermark), a guest whose ephemeral pages are rarely
    got back (hit rate, over roughly the last ``admission_window`` ephemeral puts, below
    ``admission_min_hit_rate``) has only a fraction of its ephemeral puts admitted:
    ``max(admission_floor, hit_rate / admission_min_hit_rate)``. The others are declined with
    ``policy``. Zero pages cost nothing and are always admitted.
``evicted_notice_interval_s``
    ``evicted`` notices are batched: at most one per guest per interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any


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


def effective_weight(weight: int, psi_some: float | None, settings: PressureSettings) -> float:
    """A guest's weight raised by its reported pressure (``None``: no fresh report)."""
    if psi_some is None:
        return float(weight)
    return weight * (1.0 + settings.pressure_boost * max(0.0, min(psi_some, 100.0)) / 100.0)


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
    """A shed request to one guest: return ``pages`` persistent pages by ``deadline``."""

    seq: int
    pages: int
    deadline: float
    acked: bool = False
    pages_returned: int = 0


class AdmissionGate:
    """Hit-rate feedback for one guest's ephemeral puts (zcache wanted "high quality" pages).

    ``puts`` and ``hits`` are decayed counts over roughly the last ``window`` ephemeral puts.
    :meth:`admit` is deterministic: a credit accumulator admits exactly the fraction the hit
    rate earns, so two runs with the same operations make the same decisions.
    """

    __slots__ = ("credit", "hits", "puts")

    def __init__(self) -> None:
        self.puts = 0.0
        self.hits = 0.0
        self.credit = 0.0

    def record_put(self, window: int) -> None:
        self.puts += 1.0
        if self.puts > window:
            # Halve both counts: an exponential window with O(1) work per put.
            self.puts *= 0.5
            self.hits *= 0.5

    def record_hit(self) -> None:
        self.hits += 1.0

    def hit_rate(self) -> float:
        return self.hits / self.puts if self.puts else 1.0

    def admit_fraction(self, settings: PressureSettings) -> float:
        if self.puts < settings.admission_min_samples or settings.admission_min_hit_rate <= 0:
            return 1.0
        rate = self.hit_rate()
        if rate >= settings.admission_min_hit_rate:
            return 1.0
        return max(settings.admission_floor, rate / settings.admission_min_hit_rate)

    def admit(self, settings: PressureSettings) -> bool:
        fraction = self.admit_fraction(settings)
        if fraction >= 1.0:
            return True
        self.credit += fraction
        if self.credit >= 1.0:
            self.credit -= 1.0
            return True
        return False
