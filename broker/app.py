"""``create_app(settings)``: the one place that wires the broker together.

The lifespan upgrades the schema, opens the journal (``broker.store.open_journal`` decides
what ``--durability`` means), builds the core, reloads guests, authorisations and pools from
SQL into it, then reloads persistent pages from the journal in the background while
``/readyz`` answers 503 and requests wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry

from broker.api import admin, dashboard, exports, guest_control, nbd_exports, ops, pools
from broker.api.auth import TokenRegistry, load_or_create_admin_token
from broker.api.body import JsonBodyLimit
from broker.api.errors import exception_handlers
from broker.api.guest_pages import GuestPages
from broker.api.metrics import FiguresCollector, RequestTimer, RequestTimes
from broker.api.notices import NoticeHub
from broker.api.openapi import install_openapi
from broker.api.service import BrokerService, ServiceBox
from broker.cluster.control import ClusterControl, EngineJournal
from broker.cluster.errors import Fenced
from broker.cluster.leases import LeaseManager
from broker.cluster.routing import AdminHomeRedirect, handle_fenced
from broker.core import CoreConfig, Tmem
from broker.db.engine import make_engine, upgrade
from broker.db.repo import Repository
from broker.settings import Settings
from broker.store import NullJournal, open_journal, reload_journal

log = logging.getLogger("broker")

DESCRIPTION = """A host-side transcendent-memory broker. Guests put pages (raw 4096-byte
bodies) into persistent (frontswap) or ephemeral (cleancache) pools; the broker keeps them in
RAM, stores identical pages once and tells guests when to give memory back. Every `/v1` call
needs `Authorization: Bearer <token>` (the admin token or a guest token)."""


# The JSON routers, by audience (the guests' pages are plain routes: GuestPages). Their order
# is the OpenAPI document's.
# dashboard.router carries a lifespan (its history sampler): include_router runs it
ROUTERS: tuple[APIRouter, ...] = (
    admin.router,
    guest_control.router,
    pools.router,
    exports.router,
    nbd_exports.router,
    ops.router,
    dashboard.router,
)


_TOKEN_IN_TEXT = re.compile(r"(token=)[^&\s\"']+", re.IGNORECASE)


class RedactTokens(logging.Filter):
    """Removes ``token=...`` (the WebSocket query parameter) from log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(
                _TOKEN_IN_TEXT.sub(r"\1<redacted>", a) if isinstance(a, str) else a
                for a in record.args
            )
        if isinstance(record.msg, str) and "token=" in record.msg.lower():
            record.msg = _TOKEN_IN_TEXT.sub(r"\1<redacted>", record.msg)
        return True


def install_log_redaction() -> None:
    """Attach :class:`RedactTokens` to uvicorn's loggers (idempotent)."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())


def _admin_token(settings: Settings) -> str:
    if settings.admin_token is not None and settings.admin_token.get_secret_value():
        return settings.admin_token.get_secret_value()
    token, path, created = load_or_create_admin_token(settings.data_dir)
    # Printed, not only logged: an operator starting the broker for the first time needs it.
    note = "generated the admin token" if created else "admin token"
    print(f"tmem-broker: {note}: {path.resolve()} (mode 0600)", flush=True)
    return token


# (settings, broker id) -> (core, journal): what holds the pages in cluster mode
CoreFactory = Callable[[Settings, str], tuple[Any, Any]]


def open_cluster_core(settings: Settings, broker_id: str) -> tuple[Any, Any]:
    """The cluster engine (pages and handle maps in the Redis Cluster ``settings.cluster``)
    and the journal the service waits on (the engine's own)."""
    from broker.cluster.engine import open_cluster_engine

    engine = open_cluster_engine(settings, broker_id)
    return engine, EngineJournal(engine)


def create_app(settings: Settings, *, cluster_core: CoreFactory | None = None) -> FastAPI:
    """The broker's ASGI app; ``settings`` are used as given (no environment is read here).

    In cluster mode (``settings.cluster``) ``cluster_core`` builds what holds the pages
    (default: :func:`open_cluster_core`, the Redis Cluster engine)."""
    box = ServiceBox()
    # Two views of one set of figures: the admin token's scrape, and the unauthenticated one,
    # which leaves out the figures that depend on what guests share (docs/security.md).
    metrics = CollectorRegistry(auto_describe=False)
    public_metrics = CollectorRegistry(auto_describe=False)
    metrics.register(FiguresCollector(box))
    public_metrics.register(FiguresCollector(box, public=True))
    request_times = RequestTimes()
    metrics.register(request_times)
    public_metrics.register(request_times)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        admin_token = _admin_token(settings)
        url = settings.sqlalchemy_url
        await asyncio.to_thread(upgrade, url, settings.migrations_dir)
        repo = Repository(make_engine(url))
        broker_id = settings.cluster_broker_id
        if settings.cluster:
            core, journal = (cluster_core or open_cluster_core)(settings, broker_id)
        else:
            journal = open_journal(settings)
            core = Tmem(
                CoreConfig(
                    capacity_bytes=settings.capacity_bytes,
                    compress_default=settings.compress,
                    max_pools_per_guest=settings.max_pools_per_guest,
                    recompress=settings.recompress,
                ),
                # the core skips a journal call per persistent put and flush when it has none
                # (durability none): NullJournal's calls do nothing
                journal=None if isinstance(journal, NullJournal) else journal,
            )
        hub = NoticeHub(repo, max_notices=settings.max_notices_per_guest)
        service = BrokerService(settings, core, repo, TokenRegistry(admin_token), hub, journal)
        guests, pools = service.load_from_sql()
        service.moved = await asyncio.to_thread(repo.moves)
        log.info("loaded %d guests and %d pools from %s", guests, pools, repo.engine.url.drivername)
        box.service = service
        if settings.cluster:
            leases = LeaseManager(
                repo.engine, broker_id, settings.cluster_url, lease_s=settings.lease_s
            )
            service.cluster = ClusterControl(service, leases, lease_s=settings.lease_s)
            await service.cluster.start()
            log.info("broker %s joined the cluster at %s", broker_id, settings.cluster_url)

        # NBD exports served by the broker itself (api/nbd_exports.py), with --nbd-dir
        nbd = (
            None if settings.nbd_dir is None else nbd_exports.NbdExports(service, settings.nbd_dir)
        )
        app.state.nbd_exports = nbd

        async def reload() -> None:
            try:
                report = await reload_journal(journal, core)
            except Exception:
                log.exception("journal reload failed; the broker stays not ready")
                return
            if report.pages:
                log.info("reloaded %d persistent pages", report.pages)
            if nbd is not None:
                # over the reloaded pools, before /readyz says ready
                await nbd.restore()
            service.ready.set()

        if settings.cluster:
            # the pages are in the Redis Cluster: nothing to reload; guests are adopted
            # (their handle maps loaded) by the control loop as their leases come
            async def reload() -> None:
                if nbd is not None:
                    # not served again here: a guest's pages come with its lease, later
                    await nbd.restore(serve=False)
                service.ready.set()

        reloading = asyncio.create_task(reload(), name="tmem-journal-reload")
        # memory-pressure policy: steps once the reload is done (docs/pressure.md)
        await service.pressure_loop.start()
        try:
            yield
        finally:
            reloading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reloading
            if nbd is not None:
                await nbd.close()
            if service.cluster is not None:
                await service.cluster.stop()  # hands its guests over at once
            await service.pressure_loop.stop()
            await hub.close()
            aclose = getattr(journal, "aclose", None)
            if aclose is not None:
                await aclose()
            else:
                journal.close()
            await asyncio.to_thread(repo.close)
            box.service = None

    app = FastAPI(
        title="tmem broker",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        # Fenced (a StoreError) first: it is a redirect to the guest's new home, not a 503
        exception_handlers={**exception_handlers(), Fenced: handle_fenced},
    )
    pages = GuestPages(box)
    app.state.settings = settings
    app.state.box = box
    app.state.metrics = metrics
    app.state.public_metrics = public_metrics
    app.state.guest_pages = pages  # front.HotRoutes calls these endpoints directly
    app.state.nbd_exports = None  # the lifespan's NbdExports with --nbd-dir
    app.state.request_times = request_times  # HotRoutes times with it too
    app.router.routes.extend(pages.routes())
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(JsonBodyLimit, limit=settings.max_json_bytes)
    if settings.cluster:
        app.add_middleware(AdminHomeRedirect, box=box)
    # outermost: times every request, the 413s of JsonBodyLimit included
    app.add_middleware(RequestTimer, times=request_times)
    install_openapi(app)
    install_log_redaction()
    return app


def service_of(app: Any) -> BrokerService:
    """The running service of an app built by :func:`create_app` (after its lifespan started)."""
    service = app.state.box.service
    if service is None:
        raise RuntimeError("the app has not started")
    assert isinstance(service, BrokerService)
    return service
