"""Unauthenticated operational routes: ``/healthz``, ``/readyz`` and ``/metrics``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.api.service import ServiceBox

router = APIRouter(tags=["operations"])

# Counters of the core's stats (monotonic); every other number is exported as a gauge.
_COUNTERS = frozenset(
    {
        "puts",
        "gets",
        "get_hits",
        "flushes",
        "evictions",
        "sheds_issued",
        "puts_declined",
        "policy_declines",
        "reclaimed_on_put",
    }
)


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
        body["pressure_loop"] = service.pressure_loop.heartbeat()
    return JSONResponse(body)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format: the core's counters and gauges, globally and per guest."""
    registry: CollectorRegistry = request.app.state.metrics
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class StatsCollector(Collector):
    """Reads the core's stats at scrape time, so the hot path keeps no Prometheus objects."""

    def __init__(self, box: ServiceBox) -> None:
        self._box = box

    def collect(self) -> Iterator[Metric]:
        service = self._box.service
        if service is None:
            return
        yield GaugeMetricFamily(
            "tmem_ready", "1 when the broker serves", value=float(service.ready.is_set())
        )
        yield GaugeMetricFamily(
            "tmem_guests", "guests known to the broker", value=len(service.guests)
        )
        yield CounterMetricFamily(
            "tmem_notices_published", "notices sent to guests", value=service.hub.published
        )
        stats = service.core.stats()
        for key, value in stats.items():
            yield from _family(f"tmem_{key}", key, value, {})
        if service.pressure_loop is not None:
            yield from _pressure_families(service.pressure_loop.figures())
        per_guest: dict[str, Metric] = {}
        for guest_id in sorted(service.guests):
            for key, value in service.core.guest_stats(guest_id).items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                name = f"tmem_guest_{key}"
                if name not in per_guest:
                    cls = CounterMetricFamily if key in _COUNTERS else GaugeMetricFamily
                    per_guest[name] = cls(name, f"per-guest {key}", labels=["guest_id"])
                per_guest[name].add_metric([str(guest_id)], float(value))  # type: ignore[attr-defined]
        yield from per_guest.values()


def _family(name: str, key: str, value: Any, labels: dict[str, str]) -> Iterator[Metric]:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        cls = CounterMetricFamily if key in _COUNTERS else GaugeMetricFamily
        yield cls(name, key.replace("_", " "), value=float(value))
    elif isinstance(value, dict) and all(isinstance(v, int | float) for v in value.values()):
        cls = CounterMetricFamily if key in _COUNTERS else GaugeMetricFamily
        family = cls(name, f"{key.replace('_', ' ')} by reason", labels=["reason"])
        for sub, sub_value in value.items():
            family.add_metric([str(sub)], float(sub_value))
        yield family


_PRESSURE_STATES = ("normal", "reclaiming", "quotas_lowered")
_PRESSURE_COUNTERS = frozenset(
    {
        "sheds_issued",
        "sheds_acked",
        "sheds_met",
        "sheds_overdue",
        "pages_returned",
        "quotas_lowered",
        "quotas_raised",
        "reclaim_runs",
        "reclaimed_pages",
        "evicted_notices",
        "steps",
    }
)


def _pressure_families(figures: dict[str, Any]) -> Iterator[Metric]:
    """The pressure policy's figures as ``tmem_pressure_*`` (state as a one-hot gauge)."""
    state = GaugeMetricFamily(
        "tmem_pressure_state", "pressure state (1: current)", labels=["state"]
    )
    for name in _PRESSURE_STATES:
        state.add_metric([name], float(figures.get("state") == name))
    yield state
    for key, value in figures.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        cls = CounterMetricFamily if key in _PRESSURE_COUNTERS else GaugeMetricFamily
        yield cls(f"tmem_pressure_{key}", f"pressure policy: {key.replace('_', ' ')}", value=value)
