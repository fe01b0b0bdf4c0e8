"""``/metrics``: the typed figures as Prometheus metrics, and request latency per route family.

The metric table (:data:`TABLE`) is derived once, at import, from the fields of the figure
models in :mod:`broker.core.figures` (their kind, help text and labels); a scrape walks the
figures with the same rules and fills the table's families, so every figure has a metric and
no sample can appear without its declared family. Names: ``tmem_`` and the field's name (or
its ``metric``), ``_total`` for counters, a list entry's prefix (``tmem_guest_...``) and its
ids as labels. ``docs/metrics.md`` holds :func:`markdown_table`; regenerate it with
``python -m broker.api.metrics``.

Use::

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FiguresCollector(box))
    times = RequestTimes()
    registry.register(times)
    app.add_middleware(RequestTimer, times=times)
"""

from __future__ import annotations

import itertools
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import Field, dataclass, fields
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Receive, Scope, Send

from broker.api.service import ServiceBox
from broker.core.figures import ServiceFigures, StatsFigures

PREFIX = "tmem_"

# -- the table ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric family: its exposed name (counters end in ``_total``), Prometheus type,
    help text, label names, where its value comes from (``source``, for the docs), and whether
    it is ``private``: it depends on what guests share, so a scrape without the admin token
    leaves it out (docs/security.md)."""

    name: str
    type: str
    help: str
    labels: tuple[str, ...]
    source: str
    private: bool = False


def _kind(f: Field[Any]) -> str:
    kind: str = f.metadata["kind"]
    return kind


def _name(prefix: str, f: Field[Any]) -> str:
    base = prefix + (f.metadata.get("metric") or f.name)
    return base + "_total" if _kind(f) in ("counter", "reasons") else base


def _label_fields(model: type) -> list[str]:
    return [f.name for f in fields(model) if _kind(f) == "label"]


def _info_fields(model: type) -> list[str]:
    return [f.name for f in fields(model) if _kind(f) == "info"]


# kind of a figure that is one metric -> (its Prometheus type, the label it adds)
_LEAF: dict[str, tuple[str, tuple[str, ...]]] = {
    "counter": ("counter", ()),
    "gauge": ("gauge", ()),
    "count": ("gauge", ()),
    "reasons": ("counter", ("reason",)),
    "state": ("gauge", ("state",)),
    "by_guest": ("gauge", ("guest_id",)),
}


def _specs(
    model: type, prefix: str, labels: tuple[str, ...], source: str, guest_view: bool
) -> Iterator[MetricSpec]:
    labels = labels + tuple(_label_fields(model))
    infos = _info_fields(model)
    if infos:
        helps = {f.name: f.metadata["help"] for f in fields(model)}
        what = "; ".join(f"{n}: {helps[n]}" for n in infos)
        help = f"always 1, labelled with what is not a number ({what})"
        yield MetricSpec(prefix + "info", "gauge", help, labels + tuple(infos), source)
    for f in fields(model):
        kind, meta = _kind(f), f.metadata
        where = f"{source}.{f.name}"
        if guest_view and meta.get("private"):
            continue  # a guest must not see it: not exported per guest
        if kind in _LEAF:
            type_, extra = _LEAF[kind]
            help = meta["help"] + ("; 1 for the current state" if kind == "state" else "")
            private = bool(meta.get("private"))
            yield MetricSpec(_name(prefix, f), type_, help, labels + extra, where, private)
        elif kind == "inline":
            yield from _specs(meta["model"], prefix, labels, source, guest_view)
        elif kind == "nested":
            yield from _specs(meta["model"], prefix + meta["prefix"], labels, where, guest_view)
        elif kind == "each":
            view = guest_view or meta["guest_view"]
            yield from _specs(meta["model"], prefix + meta["prefix"], labels, where + "[]", view)
        elif kind not in ("label", "info"):
            raise TypeError(f"{where}: unknown figure kind {kind!r}")


REQUEST_FAMILIES = ("guest_pages", "batch", "control", "admin", "ops")
# 50 µs (a page get on a quiet broker) to 1 s (a large export or a stalled disk)
REQUEST_BUCKETS = (
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    100e-3,
    250e-3,
    500e-3,
    1.0,
)
REQUEST_DURATION = MetricSpec(
    PREFIX + "request_duration_seconds",
    "histogram",
    "time from a request's arrival to the end of its answer, by route family: guest_pages "
    "(single-page put/get/flush, object flush), batch, control (pools, self, notices; long "
    "polls left out), admin (every other /v1 route), ops (health, metrics, docs)",
    ("family",),
    "RequestTimer",
)


def _table() -> tuple[MetricSpec, ...]:
    specs = [
        *_specs(StatsFigures, PREFIX, (), "StatsFigures", False),
        *_specs(ServiceFigures, PREFIX, (), "ServiceFigures", False),
        REQUEST_DURATION,
    ]
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise RuntimeError(f"metric {spec.name} declared twice")
        seen.add(spec.name)
    return tuple(specs)


TABLE = _table()
"""Every metric ``/metrics`` exposes, in the order it does."""

# -- a scrape -------------------------------------------------------------------------------

Sample = tuple[str, tuple[str, ...], float]


def samples(
    figures: Any, prefix: str = PREFIX, labels: tuple[str, ...] = (), *, public: bool = False
) -> Iterator[Sample]:
    """``(metric name, label values, value)`` of every figure in ``figures``, by the rules
    :data:`TABLE` was derived with; ``public`` leaves out every private figure."""
    yield from _samples(figures, prefix, labels, public)


def _samples(obj: Any, prefix: str, labels: tuple[str, ...], guest_view: bool) -> Iterator[Sample]:
    model = type(obj)
    labels = labels + tuple(str(getattr(obj, n)) for n in _label_fields(model))
    infos = _info_fields(model)
    if infos:
        yield prefix + "info", labels + tuple(str(getattr(obj, n)) for n in infos), 1.0
    for f in fields(obj):
        kind, meta = _kind(f), f.metadata
        if guest_view and meta.get("private"):
            continue
        value = getattr(obj, f.name)
        if kind in ("counter", "gauge"):
            if value is not None:
                yield _name(prefix, f), labels, float(value)
        elif kind == "count":
            yield _name(prefix, f), labels, float(len(value))
        elif kind == "reasons":
            name = _name(prefix, f)
            for reason in fields(value):
                yield name, (*labels, reason.name), float(getattr(value, reason.name))
        elif kind == "state":
            name = _name(prefix, f)
            for one in meta["states"]:
                yield name, (*labels, one), float(value == one)
        elif kind == "by_guest":
            name = _name(prefix, f)
            for guest_id, number in value.items():
                yield name, (*labels, str(guest_id)), float(number)
        elif kind == "inline":
            yield from _samples(value, prefix, labels, guest_view)
        elif kind == "nested":
            if value is not None:
                yield from _samples(value, prefix + meta["prefix"], labels, guest_view)
        elif kind == "each":
            view = guest_view or meta["guest_view"]
            for entry in value:
                yield from _samples(entry, prefix + meta["prefix"], labels, view)


_FAMILY: dict[str, Callable[..., Metric]] = {
    "counter": CounterMetricFamily,
    "gauge": GaugeMetricFamily,
}


class FiguresCollector(Collector):
    """Reads the figures at scrape time (O(guests + pools)), so the hot path keeps no
    Prometheus objects of its own. ``public``: the view of a scrape without the admin token,
    which leaves out the private figures (those that depend on what guests share)."""

    def __init__(self, box: ServiceBox, *, public: bool = False) -> None:
        self._box = box
        self._public = public

    def collect(self) -> Iterator[Metric]:
        service = self._box.service
        if service is None:
            return
        families: dict[str, Metric] = {
            spec.name: _FAMILY[spec.type](spec.name, spec.help, labels=list(spec.labels))
            for spec in TABLE
            if spec.type in _FAMILY and not (self._public and spec.private)
        }
        figures = (
            service.stats(),
            ServiceFigures(
                ready=service.ready.is_set(),
                guests=len(service.guests),
                notices_published=service.hub.published,
            ),
        )
        for one in figures:
            for name, labels, value in samples(one, public=self._public):
                families[name].add_metric(labels, value)  # type: ignore[attr-defined]
        yield from families.values()


# -- request latency ------------------------------------------------------------------------


def route_family(path: str) -> str:
    """The route family of a request path (one of :data:`REQUEST_FAMILIES`)."""
    if not path.startswith("/v1/"):
        return "ops"
    if path.startswith("/v1/pools/"):
        if "/objects/" in path:
            return "guest_pages"
        return "batch" if path.endswith("/batch") else "control"
    if path == "/v1/pools" or path.startswith(("/v1/self", "/v1/notices")):
        return "control"
    return "admin"


class Timings:
    """Durations of one route family: bucket counts (not yet cumulative; the last one is
    +Inf) and their sum. ``observe`` is the hot path's whole cost of timing."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(REQUEST_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        """Count one request that took ``seconds``."""
        # bisect_left: the first bucket whose upper bound is >= seconds (Prometheus' "le")
        self.counts[bisect_left(REQUEST_BUCKETS, seconds)] += 1
        self.total += seconds


class RequestTimes(Collector):
    """``tmem_request_duration_seconds``: request durations by route family, kept as plain
    counts and exported as one histogram family at scrape time.

    Not a prometheus-client ``Histogram``: its ``observe`` takes a lock per bucket and for the
    sum, 2.3 µs a request on this machine against 0.3 µs here. The counts are touched only from
    the event loop's thread (the timers and the scrape both run there), so they need no lock.
    """

    def __init__(self) -> None:
        self.families = {family: Timings() for family in REQUEST_FAMILIES}

    def collect(self) -> Iterator[Metric]:
        spec = REQUEST_DURATION
        family = HistogramMetricFamily(spec.name, spec.help, labels=list(spec.labels))
        bounds = [str(b) for b in REQUEST_BUCKETS] + ["+Inf"]  # "5e-05", ..., "1.0"
        for name, timings in self.families.items():
            cumulative = list(itertools.accumulate(timings.counts))
            family.add_metric([name], list(zip(bounds, cumulative, strict=True)), timings.total)
        yield family


class RequestTimer:
    """ASGI middleware: counts each HTTP request's duration in ``times`` by route
    family. A notices long poll (``?wait=``) is left out: its time is the wait it asked for.
    Per request: a path test, two ``perf_counter`` calls and one ``observe``. Under ``serve``
    the page routes and the batch never reach it: ``HotRoutes`` (front.py) times those."""

    def __init__(self, app: ASGIApp, times: RequestTimes) -> None:
        self.app = app
        self._observe = {name: t.observe for name, t in times.families.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        family = route_family(path)
        if (
            family == "control"
            and path.startswith("/v1/notices")
            and b"wait=" in scope.get("query_string", b"")
        ):
            await self.app(scope, receive, send)
            return
        observe = self._observe[family]
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            observe(time.perf_counter() - start)


# -- docs -----------------------------------------------------------------------------------


def markdown_table() -> str:
    """The metric table as ``docs/metrics.md`` shows it."""
    lines = ["| metric | type | labels | what it is |", "|---|---|---|---|"]
    for spec in TABLE:
        labels = ", ".join(f"`{label}`" for label in spec.labels)
        help = spec.help + (" **(admin token only)**" if spec.private else "")
        lines.append(f"| `{spec.name}` | {spec.type} | {labels} | {help} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
