"""The memory-pressure loop: runs :class:`broker.core.pressure.PressurePolicy` in the service.

Lifecycle (design.md convention 7)::

    loop = PressureLoop(core, repo, hub, reports, settings.pressure_settings(),
                        ready=ready, interval=settings.pressure_interval_s)
    await loop.start()        # reads admin-changed tunables from SQL, then steps every interval
    await loop.step_once()    # one step (tests call it directly): the notices it sent
    loop.heartbeat()          # what /readyz reports: steps taken, seconds since the last one
    await loop.stop()

Each step turns the policy's intents into notices through the ``NoticeHub`` (``quota``,
``shed`` with an ISO deadline, ``evicted``), and acks (``POST /v1/notices/{seq}/ack``) come
back through :meth:`PressureLoop.acked`. Sheds and dynamic quotas are not persisted: after a
restart the first step re-derives them from the pages held (a guest still above its share gets
a fresh quota and shed). Admin-changed tunables (``PATCH /v1/settings``) are stored in SQL
under ``pressure`` and win over the ``TMEM_...`` values at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from broker.api.notices import NoticeHub
from broker.core import Tmem
from broker.core.errors import UnknownGuest
from broker.core.figures import HostFigures, LoopFigures, PressureFigures
from broker.core.figures_build import host_figures
from broker.core.host import HostGovernor, HostMemoryError
from broker.core.pressure import GuestPressure, Intent, PressurePolicy, PressureSettings
from broker.db.repo import Repository
from broker.hostmem import read_host_memory
from schemas.wire import Notice, Pressure

log = logging.getLogger(__name__)

SETTINGS_KEY = "pressure"

Fraction = Annotated[float, Field(gt=0, le=1)]
Seconds = Annotated[float, Field(gt=0, le=86400)]
EphemeralPolicy = Literal["lru", "tinylfu"]


class PressureSettingsView(BaseModel):
    """The pressure tunables as ``GET /v1/settings`` shows them (meaning: docs/pressure.md)."""

    high_watermark: float
    low_watermark: float
    persistent_share: float
    release_share: float
    shed_deadline_s: float
    pressure_boost: float
    pressure_ttl_s: float
    admission_min_hit_rate: float
    admission_min_samples: int
    admission_floor: float
    admission_window: int
    evicted_notice_interval_s: float
    pressure_low_available_bytes: int
    pressure_free_available_bytes: int
    pressure_free_discount: float
    ephemeral_policy: EphemeralPolicy


class PressureSettingsPatch(BaseModel):
    """Any of the pressure tunables (``PATCH /v1/settings``); checked together before use."""

    model_config = ConfigDict(extra="forbid")

    high_watermark: Fraction | None = None
    low_watermark: Fraction | None = None
    persistent_share: Fraction | None = None
    release_share: Fraction | None = None
    shed_deadline_s: Seconds | None = None
    pressure_boost: Annotated[float, Field(ge=0, le=100)] | None = None
    pressure_ttl_s: Seconds | None = None
    admission_min_hit_rate: Annotated[float, Field(ge=0, le=1)] | None = None
    admission_min_samples: Annotated[int, Field(ge=0, le=1 << 30)] | None = None
    admission_floor: Fraction | None = None
    admission_window: Annotated[int, Field(ge=1, le=1 << 30)] | None = None
    evicted_notice_interval_s: Seconds | None = None
    pressure_low_available_bytes: Annotated[int, Field(gt=0, le=1 << 50)] | None = None
    pressure_free_available_bytes: Annotated[int, Field(gt=0, le=1 << 50)] | None = None
    pressure_free_discount: Annotated[float, Field(ge=0, lt=1)] | None = None
    ephemeral_policy: EphemeralPolicy | None = None

    def pressure_changes(self) -> dict[str, Any]:
        names = PressureSettingsPatch.model_fields
        return {k: v for k, v in self.model_dump(include=set(names)).items() if v is not None}


class HostWatch:
    """The host's memory, read once per pressure step, turned into the core's capacity by a
    :class:`broker.core.host.HostGovernor` (docs/pressure.md, "Host-aware capacity")."""

    def __init__(self, governor: HostGovernor, root: Path) -> None:
        self.governor = governor
        self.root = root
        self.read_errors = 0

    def step(self, core: Tmem, now: float) -> None:
        """Read the host and apply the effective capacity; a failed read keeps the last one."""
        try:
            host = read_host_memory(self.root)
        except HostMemoryError as exc:
            self.read_errors += 1
            if self.read_errors == 1 or self.read_errors % 100 == 0:
                log.warning("host memory not read (%d so far): %s", self.read_errors, exc)
            return
        effective = self.governor.observe(host, core.counted_bytes, now)
        if effective != core.capacity_bytes:
            log.info(
                "capacity %d -> %d bytes (host: %s)",
                core.capacity_bytes,
                effective,
                self.governor.last_reason,
            )
            core.capacity_bytes = effective

    def set_base(self, base: int) -> int:
        """An admin set the capacity: the governor's new base; the capacity in force."""
        return self.governor.set_base(base)

    def figures(self) -> HostFigures:
        return host_figures(self.governor.figures(), self.read_errors)


@dataclass(frozen=True, slots=True)
class PressureReport:
    """A guest's latest ``POST /v1/self/pressure`` and when it arrived."""

    report: Pressure
    received_at: datetime


class PressureLoop:
    """Runs the pressure policy every ``interval`` seconds; see the module docstring.

    ``reports`` are the guests' latest pressure reports (read at each step, kept by the
    service); ``ready`` is set once the journal is reloaded, and the loop steps only after it.
    """

    def __init__(
        self,
        core: Tmem,
        repo: Repository,
        hub: NoticeHub,
        reports: Mapping[int, PressureReport],
        settings: PressureSettings,
        *,
        ready: asyncio.Event,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        host: HostWatch | None = None,
    ) -> None:
        self.core = core
        self.host = host
        self.repo = repo
        self.hub = hub
        self.reports = reports
        self.ready = ready
        self.interval = interval
        self.clock = clock
        self.policy = PressurePolicy(core, settings, now=clock())
        self._task: asyncio.Task[None] | None = None
        self._step_lock = asyncio.Lock()
        self.last_step: float | None = None
        self.failures = 0

    # -- settings ---------------------------------------------------------------------------

    @property
    def settings(self) -> PressureSettings:
        return self.policy.settings

    def load_stored_settings(self, stored: dict[str, Any]) -> None:
        """Apply the admin-changed tunables kept in SQL (they win over ``TMEM_...``)."""
        changes = stored.get(SETTINGS_KEY)
        if not isinstance(changes, dict) or not changes:
            return
        try:
            self.policy.update_settings(self.settings.updated(changes))
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("stored pressure settings not applied: %s", exc)
            return
        log.info("pressure settings changed by an admin: %s", changes)

    async def update_settings(self, changes: dict[str, Any]) -> PressureSettings:
        """Validate, store in SQL (merged with earlier changes) and apply at once.

        Raises ValueError when the result contradicts itself (say, low above high)."""
        if not changes:
            return self.settings
        new = self.settings.updated(changes)
        repo = self.repo

        def store() -> None:
            stored = repo.settings().get(SETTINGS_KEY)
            merged = (stored if isinstance(stored, dict) else {}) | changes
            repo.set_setting(SETTINGS_KEY, merged)

        await run_in_threadpool(store)
        self.policy.update_settings(new)
        log.info("pressure settings changed: %s", changes)
        return new

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Load stored tunables and start stepping (once the broker is ready)."""
        stored = await run_in_threadpool(self.repo.settings)
        self.load_stored_settings(stored)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="tmem-pressure-loop")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        await self.ready.wait()
        while True:
            try:
                await self.step_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A failed step (say, SQL briefly unavailable for a notice) must not end the
                # loop: the next step derives everything again from the core's state.
                self.failures += 1
                log.exception("pressure step failed")
            await asyncio.sleep(self.interval)

    def heartbeat(self) -> LoopFigures:
        """For ``/readyz``: whether the loop runs, steps taken, seconds since the last one."""
        age = None if self.last_step is None else round(self.clock() - self.last_step, 3)
        return LoopFigures(
            running=self._task is not None and not self._task.done(),
            steps=self.policy.counters.steps,
            last_step_age_s=age,
            failures=self.failures,
        )

    # -- the step ---------------------------------------------------------------------------

    def _reports(self, now: float) -> dict[int, GuestPressure]:
        """The guests' pressure reports on the policy's clock."""
        wall = datetime.now(UTC)
        out: dict[int, GuestPressure] = {}
        for guest_id, pressure in self.reports.items():
            age = max(0.0, (wall - pressure.received_at).total_seconds())
            report = pressure.report
            out[guest_id] = GuestPressure(
                report.psi_some_avg10,
                now - age,
                psi_full=report.psi_full_avg10,
                mem_available=report.mem_available_bytes,
                swap_used=report.swap_used_bytes,
            )
        return out

    async def step_once(self) -> list[Notice]:
        """One policy step; sends its notices and returns them."""
        async with self._step_lock:
            now = self.clock()
            if self.host is not None:
                # the host first: a shrunk capacity is what the policy then works with
                self.host.step(self.core, now)
            intents = self.policy.step(now, self._reports(now))
            sent: list[Notice] = []
            for intent in intents:
                notice = await self._send(intent, now)
                if notice is not None:
                    sent.append(notice)
            self.last_step = self.clock()
            return sent

    async def _send(self, intent: Intent, now: float) -> Notice | None:
        hub = self.hub
        try:
            if intent.kind == "shed":
                assert intent.deadline is not None
                deadline = datetime.now(UTC) + timedelta(seconds=intent.deadline - now)
                notice = await hub.publish(
                    intent.guest_id, "shed", pages=intent.pages, deadline=deadline
                )
                self.policy.shed_sent(intent.guest_id, notice.seq)
                return notice
            if intent.kind == "quota":
                return await hub.publish(intent.guest_id, "quota", cap_pages=intent.cap_pages)
            return await hub.publish(intent.guest_id, intent.kind, pages=intent.pages)
        except UnknownGuest:
            self.policy.forget(intent.guest_id)  # deleted while the step ran
            return None

    async def admin_shed(
        self, guest_id: int, pages: int, deadline_s: float | None
    ) -> tuple[int, Notice | None, int | None]:
        """An admin's shed (:meth:`PressurePolicy.admin_shed`), its notices sent: (pages
        asked, the shed notice or None when the guest holds nothing, its quota now)."""
        async with self._step_lock:
            now = self.clock()
            intents = self.policy.admin_shed(now, guest_id, pages, deadline_s)
            shed: Notice | None = None
            for intent in intents:
                notice = await self._send(intent, now)
                if intent.kind == "shed":
                    shed = notice
            asked = next((i.pages or 0 for i in intents if i.kind == "shed"), 0)
            return asked, shed, self.core.quota_of(guest_id)

    def acked(self, guest_id: int, seq: int, pages_returned: int) -> None:
        """A guest acked notice ``seq`` (the route calls this after storing the ack)."""
        self.policy.acked(guest_id, seq, pages_returned)

    def figures(self) -> PressureFigures:
        """``/v1/stats`` ``pressure``: the policy's figures and the loop's heartbeat."""
        return dataclasses.replace(self.policy.figures(), loop=self.heartbeat())
