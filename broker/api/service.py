"""The broker's shell state and the operations that touch both SQL and the core.

:class:`BrokerService` owns the core (``Tmem``), the repository, the token registry, the notice
hub and the journal. Routes stay thin: they authenticate, parse, and call one method here (or,
on the hot path, the core directly). SQL runs in the thread pool (a synchronous engine): admin
and pool operations are rare, so a thread hop per call is cheap and keeps one simple code path
for SQLite and PostgreSQL, while the event loop never waits on the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from broker.api.auth import TokenRegistry, hash_token, new_token
from broker.api.limits import GuestLimits
from broker.api.notices import NoticeHub
from broker.api.pressure_loop import HostWatch, PressureLoop, PressureReport
from broker.core import Tmem
from broker.core.errors import BadPageSize, TmemError, UnknownGuest
from broker.core.figures import StatsFigures, as_json
from broker.core.host import HostGovernor
from broker.db.repo import DomainRecord, GuestRecord, PoolRecord, Repository
from broker.settings import Settings
from schemas.batch import PAGE_SIZE
from schemas.wire import (
    DomainInfo,
    DomainPut,
    GuestCreate,
    GuestInfo,
    PoolCreate,
    PoolInfo,
    Pressure,
)

if TYPE_CHECKING:
    from broker.cluster.control import ClusterControl

log = logging.getLogger(__name__)


class ServiceBox:
    """Where the lifespan puts the service, so routes built before it started can reach it."""

    service: BrokerService | None = None


class BrokerService:
    """Everything the routes need; built by ``create_app``'s lifespan."""

    def __init__(
        self,
        settings: Settings,
        core: Tmem,
        repo: Repository,
        tokens: TokenRegistry,
        hub: NoticeHub,
        journal: Any,
    ) -> None:
        self.settings = settings
        self.core = core
        self.repo = repo
        self.tokens = tokens
        self.hub = hub
        self.journal = journal
        self.guests: dict[int, GuestRecord] = {}
        # cluster mode (serve --cluster): which guests this broker serves, where the others
        # live (broker/cluster/control.py); None in single-host mode
        self.cluster: ClusterControl | None = None
        # guests moved away by `tmem-broker migrate`: token hash -> the new broker's URL
        self.moved: dict[bytes, str] = {}
        self.pressure: dict[int, PressureReport] = {}
        self.ready = asyncio.Event()
        self.started_at = time.time()
        self.limits = GuestLimits.from_settings(settings)  # per-guest rate and waiter limits
        # Admin and pool changes are serialised: each is a core change plus a SQL write, and
        # two interleaved ones (say, delete guest while creating its pool) must not cross.
        self.lock = asyncio.Lock()
        # called with a guest's id as it is deleted, under ``lock``, before the core forgets
        # it: what serves the guest outside the core stops (the broker's NBD exports)
        self.guest_removers: list[Callable[[int], Awaitable[None]]] = []
        # memory-pressure policy (docs/pressure.md); the lifespan starts and stops it
        self.pressure_loop = PressureLoop(
            core,
            repo,
            hub,
            self.pressure,
            settings.pressure_settings(),
            ready=self.ready,
            interval=settings.pressure_interval_s,
            host=(
                HostWatch(HostGovernor(settings.capacity_bytes), settings.host_root)
                if settings.host_watch
                else None
            ),
        )

    # start -------------------------------------------------------------------------------

    def load_from_sql(self) -> tuple[int, int]:
        """Put guests, authorisations and pools from SQL back into the core (at start).

        Returns ``(guests, pools)`` loaded. Admin-changed settings win over the flags.
        """
        stored = self.repo.settings()
        if "compress_default" in stored:
            self.core.compress_default = str(stored["compress_default"])
        for d in self.repo.domains():
            self.core.set_domain(d.name, trusted=d.trusted, compress=d.compress)
        if "capacity_bytes" in stored:
            self.core.capacity_bytes = self._base_capacity(int(stored["capacity_bytes"]))
            log.info(
                "capacity %d bytes (set by an admin, overrides --capacity)",
                stored["capacity_bytes"],
            )
        for g in self.repo.guests():
            self.core.add_guest(
                g.guest_id,
                name=g.name,
                weight=g.weight,
                cap_pages=g.cap_pages,
                dedup_domain=g.dedup_domain,
                compress=g.compress,
                frozen=g.frozen,
            )
            self.tokens.add(g.token_hash, g.guest_id)
            self.guests[g.guest_id] = g
        for uuid, guest_id in self.repo.shared_auths():
            self.core.authorise_shared(uuid, guest_id, True)
        pools = 0
        for p in self.repo.pools():
            try:
                self.core.create_pool(
                    p.guest_id,
                    p.kind,
                    shared=p.shared,
                    uuid=p.uuid,
                    exclusive_gets=p.exclusive_gets,
                    pool_id=p.pool_id,
                )
                pools += 1
            except TmemError as exc:
                # e.g. the shared-pool authorisation was withdrawn while the broker was down.
                log.warning("pool %d of guest %d not restored: %s", p.pool_id, p.guest_id, exc)
        return len(self.guests), pools

    # cluster mode --------------------------------------------------------------------------

    def install_guest(self, record: GuestRecord, pools: list[PoolRecord]) -> None:
        """Bring a guest this broker is about to serve up to date with SQL: its settings,
        token and pools (cluster mode: another broker may have changed them)."""
        gid = record.guest_id
        if gid in self.guests:
            self.core.update_guest(
                gid,
                weight=record.weight,
                cap_pages=record.cap_pages,
                compress=record.compress,
                dedup_domain=record.dedup_domain,
            )
            (self.core.freeze if record.frozen else self.core.thaw)(gid)
        else:
            self.core.add_guest(
                gid,
                name=record.name,
                weight=record.weight,
                cap_pages=record.cap_pages,
                dedup_domain=record.dedup_domain,
                compress=record.compress,
                frozen=record.frozen,
            )
            self.tokens.add(record.token_hash, gid)
        self.guests[gid] = record
        have = {p.pool_id for p in self.core.pools(gid)}
        for p in pools:
            if p.pool_id in have:
                continue
            try:
                self.core.create_pool(
                    gid,
                    p.kind,
                    shared=p.shared,
                    uuid=p.uuid,
                    exclusive_gets=p.exclusive_gets,
                    pool_id=p.pool_id,
                )
            except TmemError as exc:
                log.warning("pool %d of guest %d not restored: %s", p.pool_id, gid, exc)

    def sync_guests(self, records: list[GuestRecord], *, keep: set[int], known: set[int]) -> None:
        """Learn guests created through other brokers and forget deleted ones (cluster mode);
        the ones in ``keep`` (served here) keep their state, the others take SQL's record.
        Only guests in ``known`` (known before ``records`` were read) can be found deleted."""
        seen = set()
        for record in records:
            gid = record.guest_id
            seen.add(gid)
            if gid not in self.guests:
                self.install_guest(record, [])
            elif gid not in keep:
                self.guests[gid] = record
        for gid in [g for g in self.guests if g not in seen and g in known]:
            self.tokens.remove_guest(gid)
            self.guests.pop(gid, None)
            self.pressure.pop(gid, None)
            self.limits.forget(gid)
            with contextlib.suppress(TmemError):
                self.core.remove_guest(gid)

    # guests ------------------------------------------------------------------------------

    def guest_record(self, guest_id: int) -> GuestRecord:
        record = self.guests.get(guest_id)
        if record is None:
            raise UnknownGuest(f"no guest {guest_id}")
        return record

    def pool_infos(self, guest_id: int) -> list[PoolInfo]:
        return [
            PoolInfo(
                pool_id=p.pool_id,
                kind=p.kind,
                shared=p.shared,
                uuid=p.uuid,
                page_size=PAGE_SIZE,
                exclusive_gets=p.exclusive_gets,
                pages=p.pages,
            )
            for p in self.core.pools(guest_id)
        ]

    def guest_info(self, guest_id: int) -> dict[str, Any]:
        """The guest as ``GuestInfo`` fields, with pools, its own stats and its pressure."""
        g = self.guest_record(guest_id)
        own = self.core.guest_stats(guest_id)
        info = GuestInfo(
            guest_id=g.guest_id,
            name=g.name,
            weight=g.weight,
            cap_pages=g.cap_pages,
            quota_pages=own.quota_pages,
            dedup_domain=g.dedup_domain,
            compress=g.compress,
            compress_mode=self.core.compress_mode_of(guest_id),
            frozen=g.frozen,
            pools=self.pool_infos(guest_id),
            stats=as_json(own),
        ).model_dump(mode="json")
        pressure = self.pressure.get(guest_id)
        info["pressure"] = (
            None
            if pressure is None
            else {
                **pressure.report.model_dump(mode="json"),
                "received_at": pressure.received_at.isoformat(),
            }
        )
        return info

    async def create_guest(
        self, body: GuestCreate, *, token_hash: bytes | None = None
    ) -> tuple[GuestRecord, str]:
        """Create a guest; returns it and its token (shown once, stored only as a hash).
        ``token_hash``: the guest keeps the token of that hash (a migration; the token
        returned is then empty: this broker never knew it)."""
        token = "" if token_hash is not None else new_token()
        digest = token_hash if token_hash is not None else hash_token(token)
        async with self.lock:
            record = await run_in_threadpool(
                lambda: self.repo.create_guest(
                    name=body.name,
                    token_hash=digest,
                    weight=body.weight,
                    cap_pages=body.cap_pages,
                    dedup_domain=body.dedup_domain,
                    compress=body.compress,
                )
            )
            try:
                self.core.add_guest(
                    record.guest_id,
                    name=record.name,
                    weight=record.weight,
                    cap_pages=record.cap_pages,
                    dedup_domain=record.dedup_domain,
                    compress=record.compress,
                )
            except BaseException:
                # The core refused (say, too many dedup domains): the guest must not exist.
                await run_in_threadpool(self.repo.delete_guest, record.guest_id)
                raise
            self.guests[record.guest_id] = record
            self.tokens.add(record.token_hash, record.guest_id)
            if self.moved.pop(record.token_hash, None) is not None:
                # the guest comes back to this broker: its token is served here again
                await run_in_threadpool(self.repo.forget_move, record.token_hash)
        if self.cluster is not None:
            await self.cluster.place_new_guest(record.guest_id)
        log.info("created guest %d (%s)", record.guest_id, record.name)
        return record, token

    async def update_guest(self, guest_id: int, changes: dict[str, Any]) -> None:
        """Apply a PATCH (only the fields it set); a changed cap sends a ``quota`` notice."""
        async with self.lock:
            old = self.guest_record(guest_id)
            # The core first: it is the one that may refuse a value. If SQL then fails, the
            # core gets the old values back, so a failed PATCH changes nothing.
            self.core.update_guest(guest_id, **changes)
            try:
                record = await run_in_threadpool(self.repo.update_guest, guest_id, changes)
            except BaseException:
                self.core.update_guest(guest_id, **{k: getattr(old, k) for k in changes})
                raise
            self.guests[guest_id] = record
        if "cap_pages" in changes and changes["cap_pages"] != old.cap_pages:
            # the effective quota: the pressure policy's dynamic quota may be lower than the cap
            await self.hub.publish(guest_id, "quota", cap_pages=self.core.quota_of(guest_id))

    async def set_frozen(self, guest_id: int, frozen: bool) -> None:
        """Freeze or thaw (Xen's tmem freeze/thaw) and tell the guest."""
        async with self.lock:
            self.guest_record(guest_id)
            record = await run_in_threadpool(self.repo.update_guest, guest_id, {"frozen": frozen})
            if frozen:
                self.core.freeze(guest_id)
            else:
                self.core.thaw(guest_id)
            self.guests[guest_id] = record
        await self.hub.publish(guest_id, "freeze" if frozen else "thaw")

    async def flush_guest(self, guest_id: int) -> int:
        self.guest_record(guest_id)
        pages = self.core.flush_guest(guest_id)
        await self.barrier()
        return pages

    async def delete_guest(self, guest_id: int) -> None:
        async with self.lock:
            self.guest_record(guest_id)
            # Stop its token first, so no request of the guest runs against a half-gone guest.
            self.tokens.remove_guest(guest_id)
            self.guests.pop(guest_id, None)
            self.pressure.pop(guest_id, None)
            self.limits.forget(guest_id)
            for remover in self.guest_removers:
                await remover(guest_id)
            self.core.remove_guest(guest_id)
            if self.cluster is not None:
                self.cluster.serving.pop(guest_id, None)
            await self.barrier()
            await run_in_threadpool(self.repo.delete_guest, guest_id)
            self.hub.forget(guest_id)
        log.info("deleted guest %d", guest_id)

    async def move_away(self, guest_id: int, url: str) -> None:
        """The guest now lives at the broker ``url`` (``tmem-broker migrate`` verified it there):
        delete it here and answer its token's calls with a redirect to ``url`` from now on."""
        record = self.guest_record(guest_id)
        await run_in_threadpool(self.repo.add_move, record.token_hash, record.name, url)
        self.moved[record.token_hash] = url
        await self.delete_guest(guest_id)
        log.info("guest %d (%s) moved to %s", guest_id, record.name, url)

    async def set_shared_auth(self, uuid: str, guest_id: int, allow: bool) -> None:
        async with self.lock:
            self.guest_record(guest_id)
            await run_in_threadpool(self.repo.set_shared_auth, uuid, guest_id, allow)
            self.core.authorise_shared(uuid, guest_id, allow)

    # dedup domains --------------------------------------------------------------------------

    def domain_infos(self, overridden: dict[str, list[int]] | None = None) -> list[DomainInfo]:
        """Every dedup domain known: named by a guest, or set by an admin."""
        default = self.core.compress_default
        return [
            DomainInfo(
                name=d.name,
                trusted=d.trusted,
                compress=d.compress,
                compress_mode=d.compress or default,
                guests=d.guests,
                charged_bytes=d.charged_bytes,
                used_bytes=d.used_bytes,
                overridden_by=(overridden or {}).get(d.name, []),
            )
            for d in self.core.domains()
        ]

    async def put_domain(self, name: str, body: DomainPut) -> DomainInfo:
        """Set a domain's trust and compression mode (kept in SQL); the answer names the
        guests whose own explicit setting overrides the domain's mode."""
        async with self.lock:
            current = {d.name: d for d in self.core.domains()}.get(name)
            trusted = current.trusted if current is not None else False
            compress = current.compress if current is not None else None
            if "trusted" in body.model_fields_set and body.trusted is not None:
                trusted = body.trusted
            if "compress" in body.model_fields_set:
                compress = body.compress
            record = DomainRecord(name, trusted, compress)
            await run_in_threadpool(self.repo.put_domain, record)
            overridden = self.core.set_domain(name, trusted=trusted, compress=compress)
        log.info("domain %s: trusted=%s compress=%s", name, trusted, compress)
        (info,) = [d for d in self.domain_infos({name: overridden}) if d.name == name]
        return info

    async def set_compress_default(self, mode: str) -> None:
        async with self.lock:
            self.core.compress_default = mode  # raises on a bad mode before SQL changes
            await run_in_threadpool(self.repo.set_setting, "compress_default", mode)

    async def set_capacity(self, capacity_bytes: int) -> None:
        async with self.lock:
            await run_in_threadpool(self.repo.set_setting, "capacity_bytes", capacity_bytes)
            self.core.capacity_bytes = self._base_capacity(capacity_bytes)

    def _base_capacity(self, capacity_bytes: int) -> int:
        """The capacity in force once an admin set ``capacity_bytes``: that, or what the host
        watch leaves of it while the host runs short."""
        host = self.pressure_loop.host
        return capacity_bytes if host is None else host.set_base(capacity_bytes)

    def record_pressure(self, guest_id: int, report: Pressure) -> None:
        self.pressure[guest_id] = PressureReport(report, datetime.now(UTC))

    # pools -------------------------------------------------------------------------------

    async def create_pool(
        self, guest_id: int, body: PoolCreate, *, pool_id: int | None = None
    ) -> PoolInfo:
        """Create a pool in the core and in SQL (or in neither). ``pool_id``: the id an imported
        pool had (by default the core picks the next free one)."""
        if body.page_size != PAGE_SIZE:
            raise BadPageSize(f"page_size must be {PAGE_SIZE}, not {body.page_size}")
        uuid = str(body.uuid) if body.uuid is not None else None
        async with self.lock:
            self.guest_record(guest_id)
            joined = {p.pool_id for p in self.core.pools(guest_id) if p.shared}
            pool_id = self.core.create_pool(
                guest_id,
                body.kind,
                shared=body.shared,
                uuid=uuid,
                exclusive_gets=body.exclusive_gets,
                pool_id=pool_id,
            )
            if pool_id in joined:
                # joining a shared pool the guest is already in answers its id (idempotent);
                # SQL has that pool already, and rolling back would make the guest leave it
                pages = next(p.pages for p in self.core.pools(guest_id) if p.pool_id == pool_id)
                return PoolInfo(
                    pool_id=pool_id,
                    kind=body.kind,
                    shared=True,
                    uuid=body.uuid,
                    page_size=PAGE_SIZE,
                    exclusive_gets=False,
                    pages=pages,
                )
            record = PoolRecord(
                guest_id, pool_id, body.kind, body.shared, uuid, body.exclusive_gets
            )
            try:
                await run_in_threadpool(self.repo.add_pool, record)
            except BaseException:
                # The pool exists only if SQL has it: a pool the broker forgets at restart
                # would take acknowledged persistent pages with it.
                self.core.destroy_pool(guest_id, pool_id)
                raise
        return PoolInfo(
            pool_id=pool_id,
            kind=body.kind,
            shared=body.shared,
            uuid=body.uuid,
            page_size=PAGE_SIZE,
            exclusive_gets=body.exclusive_gets,
            pages=0,
        )

    async def destroy_pool(self, guest_id: int, pool_id: int) -> None:
        async with self.lock:
            self.core.destroy_pool(guest_id, pool_id)
            await self.barrier()
            await run_in_threadpool(self.repo.delete_pool, guest_id, pool_id)

    # the rest ----------------------------------------------------------------------------

    async def barrier(self) -> None:
        """Wait until the journal holds everything recorded so far."""
        if self.journal.pending:
            await self.journal.barrier()

    def stats(self) -> StatsFigures:
        """``GET /v1/stats``: the core's global figures, one entry per guest and per shared
        pool, the shed notices sent and the pressure policy's figures."""
        return StatsFigures(
            broker=self.core.stats(),
            # Sheds are notices, which the shell sends; the core does not see them.
            sheds_issued=self.hub.issued.get("shed", 0),
            pressure=None if self.pressure_loop is None else self.pressure_loop.figures(),
            host=None if self.pressure_loop.host is None else self.pressure_loop.host.figures(),
        )
