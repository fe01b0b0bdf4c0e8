"""A broker's part in a cluster: which guests it serves, and where it sends the others.

:class:`ClusterControl` is built by the app's lifespan in cluster mode (``serve --cluster``)
and kept as ``BrokerService.cluster``. It holds the set of guests this broker serves (their
leases, :mod:`broker.cluster.leases`) and runs the control loop::

    control = ClusterControl(service, leases, lease_s=10.0)
    await control.start()      # register, first heartbeat, claim orphans; then every lease/4:
    await control.step()       # heartbeat + renew, release lost guests, adopt won ones,
                               # take over orphans, refresh the homes and the guests from SQL
    await control.route(guest_id, "/v1/pools/0/batch")   # returns, or raises NotHome (307)
    await control.stop()       # releases every lease: the survivors take the guests at once

The hot path costs one set lookup and one clock read (:meth:`serves`): this broker serves a
guest while it holds its lease, and it knows it holds it until ``lease_s`` after the start of
its last successful renewal (by the monotonic clock, minus a margin). A broker that was paused
past that point refuses to serve from memory before asking PostgreSQL again; the epoch fence
in the page store covers what is already in flight.

Adopting a guest (``engine.adopt(guest, epoch)`` on a cluster engine) loads only its handle
map's metadata: no page bytes move when a guest changes home.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from broker.api.errors import NotHome
from broker.cluster.collector import CollectorThread
from broker.cluster.errors import ClusterUnavailable, Fenced
from broker.cluster.leases import Home, Lease, LeaseManager, rendezvous
from broker.core.errors import TmemError, UnknownGuest
from broker.core.figures import as_json

if TYPE_CHECKING:
    from broker.api.service import BrokerService

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# How often each broker collects the pool's leaked references (broker/cluster/collector.py: a
# run scans every content and handle map of the namespace; two at once are safe)
COLLECT_EVERY_S = 300.0

# A lease is trusted locally for this share of the lease time after the renewal began: the
# rest is the margin for a renewal in flight and for clock rates.
_TRUST = 0.8


class ClusterControl:
    """Leases, adoption and routing of one broker of a cluster (see the module doc)."""

    def __init__(self, service: BrokerService, leases: LeaseManager, *, lease_s: float) -> None:
        self.service = service
        self.leases = leases
        self.broker_id = leases.broker_id
        self.url = leases.url
        self.lease_s = lease_s
        self.interval = lease_s / 4
        self.serving: dict[int, int] = {}  # guest id -> epoch it is served under
        self.valid_until = 0.0  # monotonic: the leases renewed by the last step, until then
        self.renewed: dict[int, float] = {}  # guests renewed one by one since (route), until
        self.homes: dict[int, Home] = {}  # the last view of every guest's home
        self.brokers: list[dict[str, Any]] = []  # the last view of the brokers
        self.steps = 0
        self.last_step_error: str | None = None
        self._lock = asyncio.Lock()  # adoption, release and the step do not interleave
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._last_sync = 0.0
        self.collector: CollectorThread | None = None

    # the hot path -------------------------------------------------------------------------

    def serves(self, guest_id: int) -> bool:
        """Whether this broker serves ``guest_id`` now (one dict lookup, one clock read)."""
        if guest_id not in self.serving:
            return False
        now = time.monotonic()
        return now < self.valid_until or now < self.renewed.get(guest_id, 0.0)

    async def route(self, guest_id: int, target: str, *, fresh: bool = False) -> None:
        """Return when this broker serves ``guest_id`` (adopting it first if it is this
        broker's, or nobody's); raise :class:`NotHome` with the home's URL + ``target``
        otherwise. ``target`` is the request's path with its query string. ``fresh``: the
        request was redirected here already, so ask PostgreSQL, not the last step's view
        (after a move, that view may still name the broker that sent it)."""
        if self.serves(guest_id):
            return
        cached = None if fresh else self.homes.get(guest_id)
        if (
            cached is not None
            and cached.live
            and cached.url
            and cached.broker_id not in (None, self.broker_id)
            and guest_id not in self.serving
        ):
            # the view of the last step (at most L/4 old): a redirect without a SQL round
            # trip; a home that died since sends the agent back here, and the next step knows
            raise NotHome(cached.url + target, cached.broker_id or "")
        async with self._lock:
            if self.serves(guest_id):
                return
            home = await _db(self.leases.home, guest_id)
            if home.broker_id != self.broker_id and home.live and home.url:
                self._drop(guest_id)  # not ours (any more)
                self.homes[guest_id] = home
                raise NotHome(home.url + target, home.broker_id or "")
            # ours (a lease not yet adopted, or one this broker let lapse) or nobody's
            began = time.monotonic()
            lease = await _db(self.leases.acquire, guest_id)
            if lease is not None and lease.broker_id == self.broker_id:
                if self.serving.get(guest_id) not in (None, lease.epoch):
                    self._drop(guest_id)  # held under an older epoch: load it afresh
                await self._adopt(lease)
                if guest_id in self.serving:
                    self.renewed[guest_id] = self._trust_from(began)
                    return
            home = await _db(self.leases.home, guest_id)
        if home.url and home.broker_id != self.broker_id:
            raise NotHome(home.url + target, home.broker_id or "")
        raise UnknownGuest(f"guest {guest_id} has no home broker that answers")

    async def fenced(self, guest_id: int, target: str) -> NotHome:
        """The page store said another broker took ``guest_id`` (a higher epoch): stop serving
        it and return the redirect to its new home (the caller raises it)."""
        async with self._lock:
            self._drop(guest_id)
        home = await _db(self.leases.home, guest_id)
        return NotHome((home.url or self.url) + target, home.broker_id or "")

    def _trust_from(self, began: float) -> float:
        return began + self.lease_s * _TRUST

    # adoption -----------------------------------------------------------------------------

    async def _adopt(self, lease: Lease) -> None:
        """Serve ``lease.guest_id`` at ``lease.epoch``: its settings and pools from SQL into the
        core, then (on a cluster engine) the fence and its handle map's metadata."""
        gid = lease.guest_id
        if self.serving.get(gid) == lease.epoch:
            return
        service = self.service
        try:
            record = await run_in_threadpool(service.repo.guest, gid)
            pools = await run_in_threadpool(service.repo.pools_of, gid)
        except UnknownGuest:
            return  # deleted meanwhile
        service.install_guest(record, pools)
        adopt = getattr(service.core, "adopt", None)
        if adopt is not None:
            try:
                # Redis round trips: off the event loop
                await run_in_threadpool(adopt, gid, lease.epoch)
            except Fenced as exc:
                # a higher epoch holds the guest in Redis: this lease is stale already
                log.warning("guest %d not adopted: %s", gid, exc)
                return
        self.serving[gid] = lease.epoch
        log.info("serving guest %d at epoch %d", gid, lease.epoch)

    def _drop(self, guest_id: int) -> None:
        self.renewed.pop(guest_id, None)
        if self.serving.pop(guest_id, None) is None:
            return
        # its notice WebSockets here end (their reconnect is redirected to the new home)
        self.service.hub.forget(guest_id)
        release = getattr(self.service.core, "release", None)
        if release is not None:
            try:
                release(guest_id)
            except TmemError as exc:  # already gone from the core: nothing left to drop
                log.debug("release of guest %d: %s", guest_id, exc)
        log.info("stopped serving guest %d", guest_id)

    # the loop -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Register, run a first step, and start the loop."""
        await run_in_threadpool(self.leases.register)
        await self.step()
        pages = getattr(self.service.core, "pages", None)
        if pages is not None:
            self.collector = CollectorThread(pages, interval=COLLECT_EVERY_S)
            self.collector.start()
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="tmem-cluster-control")

    async def stop(self) -> None:
        """Stop the loop and hand every guest back (released leases are taken at once)."""
        self._stopping.set()
        if self.collector is not None:
            await run_in_threadpool(self.collector.stop)  # interrupts a run's grace wait
            self.collector = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        async with self._lock:
            for gid in list(self.serving):
                self._drop(gid)
        try:
            await run_in_threadpool(self.leases.leave)
        except Exception:
            log.exception("could not release the leases; they run out in %.1f s", self.lease_s)

    async def _run(self) -> None:
        # steps start every ``interval`` (not ``interval`` after the last one ended): a step
        # slowed down by a loaded host must not stretch the time between two heartbeats
        next_at = time.monotonic() + self.interval
        rounds = 0
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), max(0.0, next_at - time.monotonic()))
                return
            next_at = max(next_at + self.interval, time.monotonic())
            rounds += 1
            try:
                # every other round is light (heartbeat, renewals and takeover only): the
                # views and the published figures are caches with on-demand fallbacks, and
                # the light round cut an idle broker's housekeeping CPU (docs/scale.md)
                await self.step(light=rounds % 2 == 1)
            except Exception as exc:
                # PostgreSQL away (restarting): keep serving until the leases run out locally,
                # then refuse; the next step that reaches it renews or gives guests up.
                self.last_step_error = repr(exc)
                log.warning("cluster step failed: %r", exc)

    async def step(self, *, light: bool = False) -> None:
        """One round of the loop (the tests call it directly). ``light``: heartbeat, renew
        and take over only, unless a guest was won or lost: no figures published (the last
        ones stay), no refresh of the views nor of the guests from SQL."""
        figures = None if light else self.figures()
        began = time.monotonic()
        held = await run_in_threadpool(self.leases.heartbeat, figures)
        async with self._lock:
            self.valid_until = self._trust_from(began)
            self.renewed.clear()
            mine = {lease.guest_id: lease for lease in held}
            changed = set(mine) != set(self.serving)
            for gid in list(self.serving):
                lease = mine.get(gid)
                if lease is None or lease.epoch != self.serving[gid]:
                    # moved by an admin, or taken over while this broker was late: say so (a
                    # home that changes without a dead broker is worth a look)
                    log.warning("guest %d is no longer served here (lease lost)", gid)
                    self._drop(gid)
            won = await run_in_threadpool(self.leases.take_over)
            changed = changed or bool(won)
            for lease in [*held, *won]:
                await self._adopt(lease)
        if not light or changed:
            await self.step_views()
            await self.sync_guests(force=True)
        self.steps += 1
        self.last_step_error = None

    async def step_views(self) -> None:
        """Refresh the views of the homes and the brokers (admin listings, routing)."""
        self.homes = await run_in_threadpool(self.leases.homes)
        self.brokers = [
            {
                "broker_id": b.broker_id,
                "url": b.url,
                "alive": b.alive,
                "heartbeat_at": b.heartbeat_at.isoformat(),
                "stats": b.figures,
            }
            for b in await run_in_threadpool(self.leases.brokers)
        ]

    async def sync_guests(self, *, force: bool = False) -> None:
        """Learn guests created or deleted through other brokers (their tokens included);
        at most every 0.2 s unless ``force``."""
        now = time.monotonic()
        if not force and now - self._last_sync < 0.2:
            return
        self._last_sync = now
        # only guests known before the read may be found deleted: one created here while SQL
        # was being read is simply not in the answer yet
        known = set(self.service.guests)
        records = await run_in_threadpool(self.service.repo.guests)
        async with self._lock:
            self.service.sync_guests(records, keep=set(self.serving), known=known)

    async def know(self, guest_id: int) -> None:
        """Make sure a guest created through another broker is known here (admin calls)."""
        if guest_id not in self.service.guests:
            await self.sync_guests(force=True)

    async def learn_token(self, token_hash: bytes) -> int | None:
        """The guest of a token this broker does not know yet (created through another
        broker since the last sync), installed here; None: no such guest."""
        record = await _db(self.service.repo.guest_by_token_hash, token_hash)
        if record is None:
            return None
        async with self._lock:
            if record.guest_id not in self.service.guests:
                self.service.install_guest(record, [])
        return record.guest_id

    # placement ----------------------------------------------------------------------------

    async def place_new_guest(self, guest_id: int) -> None:
        """Give a guest just created a home: the live broker rendezvous hashing picks."""
        live = await run_in_threadpool(self.leases.live_brokers)
        target = rendezvous(guest_id, live or [self.broker_id]) or self.broker_id
        if target == self.broker_id:
            lease = await _db(self.leases.acquire, guest_id)
            if lease is not None:
                async with self._lock:
                    await self._adopt(lease)
            return
        await run_in_threadpool(self.leases.move, guest_id, target)

    async def move(self, guest_id: int, to_broker: str) -> Lease:
        """An admin's move: ``to_broker`` becomes the home at a higher epoch; no page bytes
        move (the new home adopts the handle map's metadata)."""
        lease = await run_in_threadpool(self.leases.move, guest_id, to_broker)
        async with self._lock:
            if to_broker == self.broker_id:
                await self._adopt(lease)
            else:
                self._drop(guest_id)
            self.homes[guest_id] = await _db(self.leases.home, guest_id)
        return lease

    # views --------------------------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        """What this broker publishes with its heartbeat: its ``/v1/stats`` and, per guest it
        serves, the guest's own figures (for the admin views of the other brokers)."""
        service = self.service
        out = as_json(service.stats())
        # the guests this broker serves (the others are loaded with no pages: not counted)
        out["guests"] = [
            g
            for g in out.get("guests", [])
            if isinstance(g, dict) and g.get("guest_id") in self.serving
        ]
        guests: dict[str, Any] = {}
        for gid in self.serving:
            with contextlib.suppress(TmemError):
                guests[str(gid)] = as_json(service.core.guest_stats(gid))
        out["guests_served"] = guests
        held = getattr(service.core, "redis_contents_held", None)
        if held is not None:  # the pool replaces the brokers' shares by one count (aggregate)
            out["redis_contents_held"] = held
        return out

    def home_of(self, guest_id: int) -> dict[str, Any]:
        """A guest's home for the admin views: broker id, URL and epoch (nulls: nobody)."""
        if guest_id in self.serving:
            return {
                "home_broker": self.broker_id,
                "home_url": self.url,
                "home_epoch": self.serving[guest_id],
            }
        home = self.homes.get(guest_id)
        if home is None or home.broker_id is None:
            return {"home_broker": None, "home_url": None, "home_epoch": None}
        return {"home_broker": home.broker_id, "home_url": home.url, "home_epoch": home.epoch}

    def guest_stats_elsewhere(self, guest_id: int) -> dict[str, Any] | None:
        """The figures a guest's home published for it with its last heartbeat."""
        home = self.homes.get(guest_id)
        if home is None:
            return None
        for b in self.brokers:
            if b["broker_id"] == home.broker_id and b["stats"]:
                found = b["stats"].get("guests_served", {}).get(str(guest_id))
                return found if isinstance(found, dict) else None
        return None

    def status(self) -> dict[str, Any]:
        """``/readyz``-style facts of the loop."""
        return {
            "broker_id": self.broker_id,
            "url": self.url,
            "guests_served": len(self.serving),
            "lease_s": self.lease_s,
            "leases_valid_for_s": max(0.0, round(self.valid_until - time.monotonic(), 3)),
            "steps": self.steps,
            "last_step_error": self.last_step_error,
            "last_collect": (
                asdict(self.collector.last)
                if self.collector is not None and self.collector.last is not None
                else None
            ),
        }


async def _db(fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` (a PostgreSQL call) off the event loop, for a guest's request: the
    database away (restarting) is a 503 ``cluster_unavailable`` with ``Retry-After`` (nothing
    was done), never a 500."""
    try:
        return await run_in_threadpool(fn, *args)
    except SQLAlchemyError as exc:
        raise ClusterUnavailable(
            f"the cluster's database did not answer: {exc.__class__.__name__}"
        ) from exc


class EngineJournal:
    """What the service waits on in cluster mode: nothing. The cluster engine's page calls are
    durable in Redis (AOF + a replica's ``WAIT``) before they return, so no write is pending
    when a route answers. ``close`` closes the engine's Redis connections."""

    pending = False

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    async def barrier(self) -> None:
        return None

    def close(self) -> None:
        pages = getattr(self.engine, "pages", None)
        if pages is not None:
            pages.close()
