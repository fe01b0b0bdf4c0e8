"""The operators' dashboard: ``GET /dashboard`` (a static page and its script and style) and
``/dashboard/live``, a WebSocket that pushes the broker's figures once a second.

The page holds the admin token in memory only and sends it as the WebSocket's first message,
``{"token": "..."}``, so it never appears in a URL the server logs. A client that can set
headers may send ``Authorization: Bearer <admin token>`` at the handshake instead. A wrong
token closes the socket with 4401 (unknown token) or 4403 (a guest's token); the page then
shows nothing but its sign-in form. Every message is one JSON snapshot (see
:meth:`DashboardFeed.snapshot`); the first one also carries the chart's recent history.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import cache
from importlib import resources
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import Response

from broker.api.auth import bearer_token
from broker.api.errors import ApiError, Forbidden, error_response
from broker.api.service import BrokerService
from broker.core.figures import as_json

log = logging.getLogger(__name__)


@asynccontextmanager
async def _lifespan(app: Any) -> AsyncIterator[None]:
    # FastAPI runs an included router's lifespan inside the app's, once the service exists.
    feed = feed_of(app)
    await feed.start(app.state.box)
    try:
        yield
    finally:
        await feed.stop()


router = APIRouter(tags=["dashboard"], lifespan=_lifespan)

INTERVAL_S = 1.0  # how often the page gets fresh figures
TOKEN_WAIT_S = 10.0  # how long an accepted socket may take to send its token
HISTORY_POINTS = 900  # chart points kept (15 minutes at one a second)
CLOSE_UNAUTHORISED = 4401
CLOSE_FORBIDDEN = 4403

_ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
# The page loads only its own script and style and talks only to its own origin; it cannot be
# framed, and it sends no referrer (the URL fragment may hold the token until the script
# removes it).
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


@cache
def _asset(name: str) -> bytes:
    return resources.files("broker.dashboard").joinpath(name).read_bytes()


def _serve(name: str) -> Response:
    return Response(_asset(name), media_type=_ASSETS[name], headers=_HEADERS)


@router.get("/dashboard", include_in_schema=False)
async def page() -> Response:
    """The dashboard page (it shows a sign-in form until it holds a valid admin token)."""
    return _serve("index.html")


@router.get("/dashboard/dashboard.js", include_in_schema=False)
async def script() -> Response:
    return _serve("dashboard.js")


@router.get("/dashboard/dashboard.css", include_in_schema=False)
async def style() -> Response:
    return _serve("dashboard.css")


class DashboardFeed:
    """Builds the snapshots the open dashboards receive and keeps the chart's history.

    A background loop (:meth:`start`, :meth:`stop`) takes one snapshot per interval, so a
    page opened now shows the last minutes at once; :meth:`sample` is its one step. The open
    pages read the latest snapshot (built on demand when the loop does not run, say in a test
    that never starts it), so the figures are built once per interval however many pages
    are open.
    """

    def __init__(self, *, interval: float = INTERVAL_S, points: int = HISTORY_POINTS) -> None:
        self.interval = interval
        self.history: deque[list[float]] = deque(maxlen=points)
        self._last: dict[str, Any] | None = None
        self._last_at = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self.failures = 0

    def sample(self, service: BrokerService, now: float) -> dict[str, Any]:
        """Build a snapshot now and add its point to the history; returns it."""
        stats = as_json(service.stats())  # exactly what GET /v1/stats answers
        point = [
            round(now, 3),
            stats["capacity_bytes"],
            stats["used_bytes"],
            stats["charged_bytes"],
            stats["gets"],
            stats["get_hits"],
        ]
        self.history.append(point)
        self._last = {
            "t": now,
            "ready": service.ready.is_set(),
            "stats": stats,
            "guests": _guest_extras(service),
            "notices": [
                {"guest_id": guest_id, **notice.model_dump(mode="json")}
                for guest_id, notice in service.hub.recent
            ],
            "point": point,
        }
        self._last_at = now
        return self._last

    def snapshot(self, service: BrokerService, now: float) -> dict[str, Any]:
        """The latest snapshot, ``{"t", "ready", "stats", "guests", "notices", "point"}``
        (built now when the last is older than half an interval): ``stats`` is exactly what
        ``GET /v1/stats`` answers; ``guests`` maps guest ids to their latest pressure report
        and open shed; ``notices`` are the latest notices to any guest, newest last; ``point``
        is the chart point ``[t, capacity, used, charged, gets, get_hits]``."""
        if self._last is not None and now - self._last_at < self.interval / 2:
            return self._last
        return self.sample(service, now)

    async def start(self, box: Any) -> None:
        """Sample every interval while ``box.service`` (the app's :class:`ServiceBox`) runs."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(box), name="tmem-dashboard-feed")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, box: Any) -> None:
        while True:
            service = box.service
            if service is not None:
                try:
                    self.snapshot(service, time.time())
                except Exception:
                    # a failed sample costs one chart point, never the loop
                    self.failures += 1
                    log.exception("dashboard sample failed")
            await asyncio.sleep(self.interval)


def _guest_extras(service: BrokerService) -> dict[str, Any]:
    """Per guest: its latest pressure report (as ``GET /v1/guests`` shows it) and its open shed
    (``due_in_s`` is negative once the deadline has passed)."""
    loop = service.pressure_loop
    sheds = loop.policy.sheds if loop is not None else {}
    now = loop.clock() if loop is not None else 0.0
    out: dict[str, Any] = {}
    for guest_id in sorted(service.guests):
        report = service.pressure.get(guest_id)
        shed = sheds.get(guest_id)
        out[str(guest_id)] = {
            "pressure": None
            if report is None
            else {
                **report.report.model_dump(mode="json"),
                "received_at": report.received_at.isoformat(),
            },
            "shed": None
            if shed is None
            else {
                "seq": shed.seq,
                "pages": shed.pages,
                "due_in_s": round(shed.deadline - now, 1),
                "acked": shed.acked,
                "overdue": shed.overdue,
            },
        }
    return out


def feed_of(app: Any) -> DashboardFeed:
    """The app's feed, made on first use (one per app, shared by its open dashboards)."""
    feed: DashboardFeed | None = getattr(app.state, "dashboard_feed", None)
    if feed is None:
        feed = app.state.dashboard_feed = DashboardFeed()
    return feed


def _refusal(service: BrokerService, token: str | None) -> ApiError | None:
    """Why ``token`` may not watch the dashboard (the admin token's check), or ``None``."""
    try:
        service.tokens.admin(token or None)
    except ApiError as refusal:
        return refusal
    return None


def _close_code(refusal: ApiError) -> int:
    return CLOSE_FORBIDDEN if isinstance(refusal, Forbidden) else CLOSE_UNAUTHORISED


async def _token_message(websocket: WebSocket) -> str | None:
    """The token of the first message, ``{"token": "..."}``; ``None`` when it is not one."""
    try:
        text = await asyncio.wait_for(websocket.receive_text(), TOKEN_WAIT_S)
        message = json.loads(text)
    except (TimeoutError, ValueError, KeyError):
        # KeyError: a binary frame (Starlette's receive_text finds no "text")
        return None
    token = message.get("token") if isinstance(message, dict) else None
    return token if isinstance(token, str) else None


@router.websocket("/dashboard/live")
async def live(websocket: WebSocket) -> None:
    """Pushes a snapshot of the broker's figures every second to an admin (see the module)."""
    service: BrokerService = websocket.app.state.box.service
    header = websocket.headers.get("authorization")
    if header is not None:
        refusal = _refusal(service, bearer_token(websocket.scope))
        if refusal is not None:
            # refused at the handshake, with the answer a plain request would get
            if "websocket.http.response" in websocket.scope.get("extensions", {}):
                await websocket.send_denial_response(error_response(refusal))
            else:
                await websocket.close(code=_close_code(refusal), reason=refusal.code)
            return
        await websocket.accept()
    else:
        await websocket.accept()
        try:
            token = await _token_message(websocket)
        except WebSocketDisconnect:
            return
        refusal = _refusal(service, token)
        if refusal is not None:
            await websocket.close(code=_close_code(refusal), reason=refusal.code)
            return
    with contextlib.suppress(WebSocketDisconnect):
        await _stream(websocket, service, feed_of(websocket.app))


async def _stream(websocket: WebSocket, service: BrokerService, feed: DashboardFeed) -> None:
    async def drain() -> None:
        # Nothing more is expected from the page; reading notices it going away at once.
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                await websocket.receive_text()

    reader = asyncio.create_task(drain())
    try:
        first = True
        while not reader.done() and not service.hub.closing:
            snapshot = feed.snapshot(service, time.time())
            if first:
                snapshot = {**snapshot, "history": list(feed.history)}
                first = False
            await websocket.send_text(json.dumps(snapshot))
            await asyncio.wait({reader}, timeout=feed.interval)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
            await reader
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        await websocket.close()


def page_url(base_url: str) -> str:
    """The dashboard's address on a broker at ``base_url`` (for ``make demo`` and the CLI)."""
    return base_url.rstrip("/") + "/dashboard"


__all__ = ["DashboardFeed", "feed_of", "page_url", "router"]
