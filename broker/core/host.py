"""Host-aware capacity: how big page storage may be on this host, and how it shrinks and grows
back while the host runs short. Pure: the figures come in as a :class:`HostMemory` (read by
:mod:`broker.hostmem`), the time as ``now``; nothing here reads a file.

Sizing (``--capacity auto``)::

    limit    = MemTotal, or the cgroup's memory limit when it is lower      (bytes)
    reserve  = max(RESERVE_FRACTION * limit, RESERVE_MIN_BYTES)            (15 %, 512 MiB)
    capacity = limit - reserve                                              (page bytes)

The reserve is what page storage must leave to everything else when it is full: the kernel
(page tables, slab), the broker's own heap beyond the page bytes capacity counts (measured on
the core: about 110 bytes per persistent page and 220 per ephemeral page, up to 5.4 % of the
page bytes; plus the interpreter's ~100-200 MiB), and the governor's ``short`` floor below
(5 % of the limit), so that a full broker on an otherwise idle host does not count as a host
running short. A host running guests needs more than that: the governor gives it back as
soon as the host is short, which is what tmem has always done with "free" memory.

The governor (:class:`HostGovernor`), called once per pressure interval with the latest
figures, returns the *effective* capacity (never above the base, never below the floor):

``short`` (a reading where the host runs short)
    ``available <= short_available`` where ``available`` is MemAvailable, or the cgroup's
    ``limit - (current - inactive_file)`` when lower, and ``short_available =
    max(short_available_fraction * limit, short_available_min_bytes)``; or PSI memory
    ``some avg10`` (the system's or the cgroup's, the larger) at or above ``psi_short``.
    The effective capacity becomes ``min(effective, counted) - max(deficit, shrink_step)``:
    the bytes the host lacks are given back (``deficit = short_available - available``;
    0 on a PSI-only reading), at least a step. The core's watermarks then evict ephemeral
    pages, and the pressure policy lowers quotas and sends sheds as it always does.
    While the host stays short the governor shrinks again only after ``settle_s`` (PSI
    ``avg10`` needs about that long to show a change; freed bytes need time to reach
    MemAvailable) or at once when the deficit grew by more than a step since the last shrink.
``healthy``
    ``available >= healthy_available`` (``max(healthy_available_fraction * limit,
    short_available_min_bytes)``) and PSI ``some avg10 <= psi_healthy``. After
    ``recover_after`` healthy readings in a row the effective capacity grows by at most
    ``grow_step``, no more than the host can back (``available - unused room - healthy
    level``), never above the base; the count starts again after each step. Between the
    two levels (neither short nor healthy) nothing changes and the count starts again: the
    hysteresis band, as zswap's ``accept_threshold_percent`` keeps a full pool refusing
    until it is well under its limit.

Tunables: :class:`GovernorSettings`, defaults documented there and in docs/pressure.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from schemas.batch import PAGE_SIZE

MiB = 1 << 20


class HostMemoryError(ValueError):
    """The host's memory figures cannot be read or make no sense. ``path`` names the file
    (or directory) at fault when there is one; the message always says what was wrong.

    A ``ValueError`` so that a settings validator that calls the reader reports it as a bad
    setting at start-up."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True, slots=True)
class Psi:
    """One PSI file (``/proc/pressure/memory`` or a cgroup's ``memory.pressure``).

    ``some_*``: percent of wall time in which at least one task stalled on memory over the
    last 10, 60 and 300 s; ``full_*``: in which every non-idle task stalled (``None`` when
    the kernel writes no ``full`` line). ``*_total_us``: stall time since boot, microseconds."""

    some_avg10: float
    some_avg60: float
    some_avg300: float
    some_total_us: int
    full_avg10: float | None = None
    full_avg60: float | None = None
    full_avg300: float | None = None
    full_total_us: int | None = None


@dataclass(frozen=True, slots=True)
class HostMemory:
    """The host's memory as read at one moment. Bytes and percent; ``None`` where the host
    does not offer the figure.

    ``mem_*``/``swap_*``: ``/proc/meminfo``. ``psi``: ``/proc/pressure/memory``.
    ``cgroup_version``: 2, or 1 when the memory controller is on cgroup v1 (``None``: no
    cgroup). ``cgroup_path``: the process's cgroup in that hierarchy. ``cgroup_limit_bytes``:
    the lowest limit (``memory.max``; v1 ``memory.limit_in_bytes``) from that cgroup up to
    the mount's root (``None``: no limit anywhere); ``cgroup_limit_path``: the
    cgroup it came from (``None`` without a limit). The ``memory.current``, ``memory.stat``
    ``inactive_file`` and ``memory.pressure`` of that cgroup (of the process's own when there
    is no limit) are ``cgroup_current_bytes``, ``cgroup_inactive_file_bytes`` and
    ``cgroup_psi``. ``source``: the
    files read, comma-separated, as paths on the host (plus a note when a cgroup was not
    read).
    """

    mem_total_bytes: int
    mem_available_bytes: int | None = None
    swap_total_bytes: int | None = None
    swap_free_bytes: int | None = None
    psi: Psi | None = None
    cgroup_version: int | None = None
    cgroup_path: str | None = None
    cgroup_limit_path: str | None = None
    cgroup_limit_bytes: int | None = None
    cgroup_current_bytes: int | None = None
    cgroup_inactive_file_bytes: int | None = None
    cgroup_psi: Psi | None = None
    source: str = ""

    @property
    def limit_bytes(self) -> int:
        """What the broker's process may use at most: MemTotal or the cgroup limit."""
        if self.cgroup_limit_bytes is not None:
            return min(self.mem_total_bytes, self.cgroup_limit_bytes)
        return self.mem_total_bytes

    @property
    def limited_by(self) -> str:
        """``cgroup`` when the cgroup limit is below MemTotal, else ``host``."""
        return "cgroup" if self.limit_bytes < self.mem_total_bytes else "host"

    @property
    def cgroup_available_bytes(self) -> int | None:
        """``memory.max - (memory.current - inactive_file)``: the cgroup's room, counting
        its inactive page cache as reclaimable (as the kubelet's working set does), since a
        cgroup's ``memory.current`` sits near the limit whenever it has read files."""
        if self.cgroup_limit_bytes is None or self.cgroup_current_bytes is None:
            return None
        working = self.cgroup_current_bytes - (self.cgroup_inactive_file_bytes or 0)
        return max(0, self.cgroup_limit_bytes - max(0, working))

    @property
    def available_bytes(self) -> int | None:
        """The lowest of MemAvailable, the cgroup's room and the limit; ``None`` when neither
        MemAvailable nor the cgroup's room is known."""
        known = [
            v for v in (self.mem_available_bytes, self.cgroup_available_bytes) if v is not None
        ]
        return min(*known, self.limit_bytes) if known else None

    @property
    def used_percent(self) -> float | None:
        """``100 * (1 - available / limit)``, the host's memory in use as the broker sees it."""
        available = self.available_bytes
        if available is None or self.limit_bytes <= 0:
            return None
        return round(100.0 * max(0.0, 1.0 - available / self.limit_bytes), 2)

    @property
    def psi_some_avg10(self) -> float | None:
        """PSI memory ``some avg10`` (percent): the larger of the system's and the cgroup's."""
        known = [p.some_avg10 for p in (self.psi, self.cgroup_psi) if p is not None]
        return max(known) if known else None

    def as_dict(self) -> dict[str, Any]:
        """Every figure, flat, JSON-ready (what ``/v1/stats`` shows under ``host``)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Psi):
                out.update({f"{f.name}_{k}": v for k, v in asdict(value).items()})
            elif value is None and f.name in ("psi", "cgroup_psi"):
                out.update({f"{f.name}_{k.name}": None for k in fields(Psi)})
            else:
                out[f.name] = value
        out["limit_bytes"] = self.limit_bytes
        out["limited_by"] = self.limited_by
        out["available_bytes"] = self.available_bytes
        out["used_percent"] = self.used_percent
        return out


RESERVE_FRACTION = 0.15
RESERVE_MIN_BYTES = 512 * MiB


def reserve_bytes(
    limit: int, fraction: float = RESERVE_FRACTION, minimum: int = RESERVE_MIN_BYTES
) -> int:
    """The default reserve for a host whose limit is ``limit`` bytes: ``max(fraction * limit,
    minimum)`` (see the module docstring for why 15 % and 512 MiB)."""
    if limit < 0 or minimum < 0 or not 0.0 <= fraction < 1.0:
        raise ValueError("need limit >= 0, minimum >= 0 and 0 <= fraction < 1")
    return max(math.ceil(fraction * limit), minimum)


def auto_capacity(host: HostMemory, reserve: int | None = None) -> int:
    """Page storage for ``--capacity auto``: the host's limit (MemTotal, or the cgroup limit
    when lower) less ``reserve`` bytes (``None``: :func:`reserve_bytes` of the limit),
    rounded down to whole pages.

    Raises :class:`HostMemoryError` when what is left would not hold one page, naming the
    limit and where it came from."""
    limit = host.limit_bytes
    if reserve is None:
        reserve = reserve_bytes(limit)
    if reserve < 0:
        raise ValueError("reserve must be >= 0")
    capacity = (limit - reserve) // PAGE_SIZE * PAGE_SIZE
    if capacity < PAGE_SIZE:
        where = (
            f"the cgroup limit ({host.cgroup_limit_path})"
            if host.limited_by == "cgroup"
            else "MemTotal (/proc/meminfo)"
        )
        raise HostMemoryError(
            f"capacity auto: {where} is {limit} bytes; less the reserve of {reserve} bytes "
            "that leaves no room for a page (give --capacity explicitly)",
            host.cgroup_limit_path if host.limited_by == "cgroup" else "/proc/meminfo",
        )
    return capacity


@dataclass(frozen=True, slots=True)
class GovernorSettings:
    """The governor's tunables (fractions are of the host's limit, steps of the base capacity).

    ``short_available_fraction`` 0.05, ``short_available_min_bytes`` 128 MiB
        the host is short when available memory is at or under the larger of the two: at
        5 % little reclaimable cache is left, while the kernel's free-page watermarks are far
        lower (well under 1 %), so there is time to give memory back; the minimum keeps
        small containers from running to the wire. (Under earlyoom, set it above earlyoom's
        ``-m``.)
    ``healthy_available_fraction`` 0.10
        available memory at or above this (and the minimum above) counts toward recovery;
        the band between 5 % and 10 % is the hysteresis.
    ``psi_short`` 10.0, ``psi_healthy`` 1.0 (percent, PSI ``some avg10``)
        10 % of the last 10 s with some task stalled on memory is a real slowdown and far
        below systemd-oomd's kill limit (60 % ``full`` for 20-30 s); recovery waits until
        stalls are rare again.
    ``shrink_step`` 0.05, ``grow_step`` 0.05 (of the base capacity)
        the least a shrink gives back and the most a grow takes.
    ``recover_after`` 5
        healthy readings in a row before each grow (5 s at the default pressure interval).
    ``settle_s`` 10.0
        the least time between two shrinks of one episode unless the deficit grew by more
        than a step (PSI ``avg10`` averages over 10 s).
    ``min_capacity_fraction`` 0.10 (of the base)
        the effective capacity never goes below this (nor below one page).
    """

    short_available_fraction: float = 0.05
    short_available_min_bytes: int = 128 * MiB
    healthy_available_fraction: float = 0.10
    psi_short: float = 10.0
    psi_healthy: float = 1.0
    shrink_step: float = 0.05
    grow_step: float = 0.05
    recover_after: int = 5
    settle_s: float = 10.0
    min_capacity_fraction: float = 0.10

    def __post_init__(self) -> None:
        if not 0.0 <= self.short_available_fraction <= self.healthy_available_fraction < 1.0:
            raise ValueError("need 0 <= short_available_fraction <= healthy_available_fraction < 1")
        if self.short_available_min_bytes < 0:
            raise ValueError("short_available_min_bytes must be >= 0")
        if not 0.0 <= self.psi_healthy <= self.psi_short <= 100.0:
            raise ValueError("need 0 <= psi_healthy <= psi_short <= 100")
        if not (0.0 < self.shrink_step <= 1.0 and 0.0 < self.grow_step <= 1.0):
            raise ValueError("shrink_step and grow_step must be within (0, 1]")
        if self.recover_after < 1:
            raise ValueError("recover_after must be >= 1")
        if self.settle_s < 0:
            raise ValueError("settle_s must be >= 0")
        if not 0.0 <= self.min_capacity_fraction <= 1.0:
            raise ValueError("min_capacity_fraction must be within [0, 1]")

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


NORMAL = "normal"  # effective == base
SHRUNK = "shrunk"  # below the base, the host short on the last reading
RECOVERING = "recovering"  # below the base, the host no longer short

# the reasons a reading is short (``last_reason``), and a grow's
REASON_AVAILABLE = "mem_available"
REASON_CGROUP = "cgroup"
REASON_PSI = "psi"
REASON_RECOVERED = "recovered"


@dataclass(frozen=True, slots=True)
class Reading:
    """What the governor made of one :class:`HostMemory`: ``short`` with its ``reason`` and
    ``deficit`` bytes, or ``healthy``, or neither (the hysteresis band)."""

    short: bool
    healthy: bool
    reason: str | None
    deficit: int
    short_level: int
    healthy_level: int


def judge(host: HostMemory, settings: GovernorSettings) -> Reading:
    """Classify one reading (see the module docstring for the levels)."""
    limit = host.limit_bytes
    short_level = max(
        math.ceil(settings.short_available_fraction * limit), settings.short_available_min_bytes
    )
    healthy_level = max(
        math.ceil(settings.healthy_available_fraction * limit),
        settings.short_available_min_bytes,
    )
    available = host.available_bytes
    psi = host.psi_some_avg10
    deficit = 0
    reason: str | None = None
    if available is not None and available <= short_level:
        deficit = short_level - available
        # which figure ran short: the cgroup's room when it is the lower one
        reason = REASON_CGROUP if host.cgroup_available_bytes == available else REASON_AVAILABLE
    elif psi is not None and psi >= settings.psi_short:
        reason = REASON_PSI
    healthy = (
        reason is None
        and (available is None or available >= healthy_level)
        and (psi is None or psi <= settings.psi_healthy)
    )
    return Reading(reason is not None, healthy, reason, deficit, short_level, healthy_level)


class HostGovernor:
    """Turns the host's memory figures into the broker's effective capacity.

    Not thread-safe; call from the pressure loop, once per interval, then apply the result::

        governor = HostGovernor(base_capacity, GovernorSettings())
        host = read_host_memory()                       # broker.hostmem
        tmem.capacity_bytes = governor.observe(host, tmem.counted_bytes, clock())
        stats["host"] = governor.figures()

    ``base`` is the configured capacity (``--capacity``, or :func:`auto_capacity`); the
    effective capacity starts there. See the module docstring for the rules.
    """

    def __init__(self, base: int, settings: GovernorSettings | None = None) -> None:
        if base < PAGE_SIZE:
            raise ValueError(f"base capacity must hold a page ({PAGE_SIZE} bytes)")
        self.settings = settings if settings is not None else GovernorSettings()
        self.base = base
        self.effective = base
        self.host: HostMemory | None = None
        self.last_reason: str | None = None
        self.last_change_at: float | None = None
        self.healthy_streak = 0
        self.shrinks = 0
        self.grows = 0
        self.readings = 0
        self._short_now = False
        self._last_shrink_at: float | None = None
        self._last_deficit = 0

    # -- figures ----------------------------------------------------------------------------

    @property
    def floor(self) -> int:
        """The least effective capacity: ``min_capacity_fraction`` of the base, whole pages,
        at least one page."""
        pages = math.floor(self.settings.min_capacity_fraction * self.base) // PAGE_SIZE
        return max(PAGE_SIZE, pages * PAGE_SIZE)

    @property
    def state(self) -> str:
        if self.effective >= self.base:
            return NORMAL
        return SHRUNK if self._short_now else RECOVERING

    def figures(self) -> dict[str, Any]:
        """The governor's state and the latest host figures (``host``: ``None`` before the
        first reading), for ``/v1/stats`` and ``/metrics``."""
        return {
            "state": self.state,
            "base_capacity_bytes": self.base,
            "effective_capacity_bytes": self.effective,
            "shrunk_by_bytes": self.base - self.effective,
            "floor_bytes": self.floor,
            "last_reason": self.last_reason,
            "last_change_at": self.last_change_at,
            "healthy_streak": self.healthy_streak,
            "shrinks": self.shrinks,
            "grows": self.grows,
            "readings": self.readings,
            "host": self.host.as_dict() if self.host is not None else None,
        }

    # -- changes ----------------------------------------------------------------------------

    def set_base(self, base: int) -> int:
        """A new configured capacity (an admin changed it): an unshrunk governor follows it,
        a shrunk one keeps its effective capacity, never above the new base. Returns the
        effective capacity."""
        if base < PAGE_SIZE:
            raise ValueError(f"base capacity must hold a page ({PAGE_SIZE} bytes)")
        unshrunk = self.effective >= self.base
        self.base = base
        self.effective = base if unshrunk else max(self.floor, min(self.effective, base))
        return self.effective

    def observe(self, host: HostMemory, counted_bytes: int, now: float) -> int:
        """One reading: the host's figures, the page storage the broker counts against its
        capacity (``Tmem.counted_bytes``) and the time (seconds, monotonic). Returns the
        effective capacity in bytes, a whole number of pages."""
        s = self.settings
        self.host = host
        self.readings += 1
        reading = judge(host, s)
        self._short_now = reading.short
        if reading.short:
            self.healthy_streak = 0
            episode_start = self._last_shrink_at is None
            settled = self._last_shrink_at is not None and now - self._last_shrink_at >= s.settle_s
            step = max(PAGE_SIZE, math.ceil(s.shrink_step * self.base))
            worse = reading.deficit >= self._last_deficit + step
            if self.effective > self.floor and (episode_start or settled or worse):
                reference = min(self.effective, max(0, counted_bytes))
                target = reference - max(reading.deficit, step)
                self._set(max(self.floor, target), reading.reason, now)
                self.shrinks += 1
                self._last_shrink_at = now
                self._last_deficit = reading.deficit
            return self.effective
        # not short: the episode is over (the next short reading shrinks at once)
        self._last_shrink_at = None
        self._last_deficit = 0
        if not reading.healthy:
            self.healthy_streak = 0
            return self.effective
        self.healthy_streak += 1
        if self.effective >= self.base or self.healthy_streak < s.recover_after:
            return self.effective
        self.healthy_streak = 0
        grow = min(max(PAGE_SIZE, math.ceil(s.grow_step * self.base)), self.base - self.effective)
        available = host.available_bytes
        if available is not None:
            # no more than the host can back once the broker fills the room it already has
            unused = max(0, self.effective - max(0, counted_bytes))
            grow = min(grow, available - unused - reading.healthy_level)
        if grow >= PAGE_SIZE or (grow > 0 and self.effective + grow >= self.base):
            self._set(self.effective + grow, REASON_RECOVERED, now)
            self.grows += 1
        return self.effective

    def _set(self, capacity: int, reason: str | None, now: float) -> None:
        # whole pages below the base; the base itself as configured (it may not be)
        capped = self.base if capacity >= self.base else capacity // PAGE_SIZE * PAGE_SIZE
        self.effective = max(self.floor, capped)
        self.last_reason = reason
        self.last_change_at = now
