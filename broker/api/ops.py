"""Unauthenticated operational routes: ``/healthz``, ``/readyz`` and ``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from broker.api.auth import bearer_token
from broker.api.deps import get_service
from broker.api.service import ServiceBox
from broker.core.figures import as_json

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "starting or reloading"}})
async def readyz(request: Request) -> JSONResponse:
    """200 when ready to serve; 503 while the broker starts or reloads its journal."""
    box: ServiceBox = request.app.state.box
    service = box.service
    if service is None or not service.ready.is_set():
        return JSONResponse({"status": "starting"}, status_code=503)
    body: dict[str, Any] = {"status": "ready", "guests": len(service.guests)}
    if service.pressure_loop is not None:
        body["pressure_loop"] = as_json(service.pressure_loop.heartbeat())
    if service.cluster is not None:
        # the cluster control loop's heartbeat (docs/scale.md): leases, steps, last error
        body["cluster"] = service.cluster.status()
    return JSONResponse(body)


@router.get(
    "/metrics",
    response_class=Response,
    responses={401: {"description": "unknown token"}, 403: {"description": "a guest's token"}},
)
async def metrics(request: Request) -> Response:
    """Prometheus text format: the figures of ``/v1/stats`` and request latencies
    (``docs/metrics.md``). Without a token it leaves out the figures that depend on what
    guests share (``unique_pages``, ``used_bytes``, ``dedup_hits``, ...: a guest could read
    them to learn whether a neighbour holds a page); with the admin token it has them all."""
    token = bearer_token(request.scope)
    registry: CollectorRegistry
    if token is None:
        registry = request.app.state.public_metrics
    else:
        service = await get_service(request)
        service.tokens.admin(token)  # 401 unknown, 403 a guest's
        registry = request.app.state.metrics
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
