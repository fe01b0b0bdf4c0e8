"""``/metrics`` is derived from the typed figures: every figure has its metric, under the
documented name, with the value ``/v1/stats`` shows; ``docs/metrics.md`` lists exactly what is
exported; request latencies are counted by route family."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from broker.api.metrics import (
    REQUEST_FAMILIES,
    TABLE,
    RequestTimes,
    markdown_table,
    route_family,
)
from broker.core.figures import ServiceFigures, StatsFigures
from schemas.batch import OP_GET, OP_PUT, encode_request
from tests.api.conftest import ADMIN, Guest, page, page_url

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
SHARED = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"


def _expected(model: type, prefix: str) -> Iterator[tuple[str, str]]:
    """(family name, field path) of every number of ``model``, by the naming rule of
    docs/metrics.md: the prefixes of the lists and objects it sits in, the field's name (or
    its declared ``metric``), ``_total`` for counters."""
    for f in dataclasses.fields(model):
        kind, meta = f.metadata["kind"], f.metadata
        base = prefix + (meta.get("metric") or f.name)
        if kind in ("counter", "reasons"):
            yield base + "_total", f"{model.__name__}.{f.name}"
        elif kind in ("gauge", "count", "state", "by_guest"):
            yield base, f"{model.__name__}.{f.name}"
        elif kind == "inline":
            yield from _expected(meta["model"], prefix)
        elif kind in ("nested", "each"):
            yield from _expected(meta["model"], prefix + meta["prefix"])


# Figures a guest must not see are exported for the whole broker only, never per guest.
NOT_PER_GUEST = {"tmem_guest_dedup_hits_total"}


def _scrape(client: TestClient, headers: dict[str, str] | None = ADMIN) -> dict[str, Any]:
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200
    return {
        (f.name + "_total" if f.type == "counter" else f.name): f
        for f in text_string_to_metric_families(r.text)
    }


def _value(families: dict[str, Any], name: str, /, **labels: str) -> float:
    family = families[name]
    sample_name = name if family.type != "histogram" else name + "_count"
    found = [s.value for s in family.samples if s.name == sample_name and s.labels == labels]
    assert len(found) == 1, (name, labels, family.samples)
    return float(found[0])


@pytest.fixture
def busy(client: TestClient, make_guest: Callable[..., Guest]) -> TestClient:
    """A broker with two guests, private and shared pools and every kind of operation."""
    (g1, h1), (g2, h2) = make_guest(cap_pages=3, compress=True), make_guest()
    for gid in (g1, g2):
        r = client.post(
            "/v1/shared-auth", json={"uuid": SHARED, "guest_id": gid, "allow": True}, headers=ADMIN
        )
        assert r.status_code == 204
    persistent = client.post("/v1/pools", json={"kind": "persistent"}, headers=h1).json()["pool_id"]
    for h in (h1, h2):
        body = {"kind": "ephemeral", "shared": True, "uuid": SHARED}
        assert client.post("/v1/pools", json=body, headers=h).status_code == 201
    for i in range(4):  # the fourth is declined: quota
        client.put(page_url(persistent, 1, i), content=page(i % 2), headers=h1)
    client.get(page_url(persistent, 1, 0), headers=h1)
    client.get(page_url(persistent, 9, 9), headers=h1)
    client.delete(page_url(persistent, 1, 1), headers=h1)
    client.delete(f"/v1/pools/{persistent}/objects/1", headers=h1)
    batch = encode_request([(OP_PUT, 2, 0, page(7)), (OP_GET, 2, 0, None)])
    r = client.post(
        "/v1/pools/0/batch",
        content=batch,
        headers={**h2, "Content-Type": "application/x-tmem-batch"},
    )
    assert r.status_code == 200
    client.get("/v1/self", headers=h1)
    return client


def test_every_figure_has_its_metric_under_the_documented_name(busy: TestClient) -> None:
    families = _scrape(busy)
    expected = dict(_expected(StatsFigures, "tmem_")) | dict(_expected(ServiceFigures, "tmem_"))
    missing = {name: path for name, path in expected.items() if name not in families}
    assert set(missing) == NOT_PER_GUEST, missing
    # and nothing is exported that no figure declares (besides the latency histogram)
    declared = set(expected) | {
        "tmem_request_duration_seconds",
        "tmem_guest_info",
        "tmem_host_info",
    }
    assert set(families) == declared - NOT_PER_GUEST
    assert {spec.name for spec in TABLE} == declared - NOT_PER_GUEST


def test_metric_values_are_the_stats_values(busy: TestClient) -> None:
    stats = busy.get("/v1/stats", headers=ADMIN).json()
    families = _scrape(busy)
    checked = 0

    def same(prefix: str, figures: dict[str, Any], **labels: str) -> None:
        nonlocal checked
        for key, value in figures.items():
            if isinstance(value, dict) and key in ("puts_declined", "policy_declines"):
                for reason, n in value.items():
                    got = _value(families, f"{prefix}{key}_total", **labels, reason=reason)
                    assert got == n, (prefix, key, reason)
                    checked += 1
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or key in labels:
                continue  # bools are checked below; ids are labels
            name = prefix + key
            if name not in families:
                name += "_total"
            if name in NOT_PER_GUEST:
                continue
            name = {"tmem_reclaimed_on_put_total": "tmem_reclaimed_on_put_pages_total"}.get(
                name, name
            )
            assert _value(families, name, **labels) == value, (name, labels)
            checked += 1

    same("tmem_", stats)
    for guest in stats["guests"]:
        same("tmem_guest_", guest, guest_id=str(guest["guest_id"]))
        info = {"guest_id": str(guest["guest_id"]), "name": guest["name"]}
        assert _value(families, "tmem_guest_info", **info, dedup_domain="default") == 1
        assert _value(families, "tmem_guest_frozen", guest_id=info["guest_id"]) == 0
    (shared,) = stats["shared_pools"]
    same("tmem_shared_pool_", shared, uuid=SHARED)
    assert _value(families, "tmem_shared_pool_members", uuid=SHARED) == 2
    pressure = stats["pressure"]
    same("tmem_pressure_", pressure)
    for state in ("normal", "reclaiming", "quotas_lowered"):
        want = float(pressure["state"] == state)
        assert _value(families, "tmem_pressure_state", state=state) == want
    assert _value(families, "tmem_pressure_loop_running") == 1
    assert checked > 60
    # the figures this scenario exercised
    assert _value(families, "tmem_puts_declined_total", reason="quota") == 1
    assert _value(families, "tmem_dedup_hits_total") >= 1
    assert _value(families, "tmem_guest_cap_pages", guest_id="1") == 3
    assert not [s for s in families["tmem_guest_cap_pages"].samples if s.labels["guest_id"] == "2"]


def test_requests_are_timed_by_route_family(busy: TestClient) -> None:
    families = _scrape(busy)
    counts = {
        f: _value(families, "tmem_request_duration_seconds", family=f) for f in REQUEST_FAMILIES
    }
    # busy: 8 page requests (4 puts, 2 gets, 2 flushes), 1 batch, 3 pool creations and
    # /v1/self, 2 guests and 2 shared-auth
    assert (counts["guest_pages"], counts["batch"], counts["control"]) == (8, 1, 4)
    assert counts["admin"] == 4
    busy.get("/healthz")
    assert _value(_scrape(busy), "tmem_request_duration_seconds", family="ops") >= counts["ops"] + 1


@pytest.mark.parametrize(
    ("path", "family"),
    [
        ("/v1/pools/0/objects/1/pages/2", "guest_pages"),
        ("/v1/pools/0/objects/1", "guest_pages"),
        ("/v1/pools/0/batch", "batch"),
        ("/v1/pools", "control"),
        ("/v1/pools/3", "control"),
        ("/v1/self", "control"),
        ("/v1/self/pressure", "control"),
        ("/v1/notices/4/ack", "control"),
        ("/v1/guests", "admin"),
        ("/v1/guests/1/export", "admin"),
        ("/v1/stats", "admin"),
        ("/v1/settings", "admin"),
        ("/metrics", "ops"),
        ("/readyz", "ops"),
        ("/nowhere", "ops"),
    ],
)
def test_route_families(path: str, family: str) -> None:
    assert route_family(path) == family


def test_a_duration_on_a_bucket_bound_counts_in_that_bucket() -> None:
    times = RequestTimes()
    for seconds in (0.0, 50e-6, 51e-6, 1.0, 7.5):
        times.families["batch"].observe(seconds)
    (family,) = times.collect()
    buckets = {
        s.labels["le"]: s.value
        for s in family.samples
        if s.name.endswith("_bucket") and s.labels["family"] == "batch"
    }
    assert (buckets["5e-05"], buckets["0.0001"], buckets["1.0"], buckets["+Inf"]) == (2, 3, 4, 5)
    sums = {s.labels["family"]: s.value for s in family.samples if s.name.endswith("_sum")}
    assert sums == {**dict.fromkeys(REQUEST_FAMILIES, 0.0), "batch": 0.0 + 50e-6 + 51e-6 + 8.5}


def test_a_notices_long_poll_is_not_timed(client: TestClient, guest: Guest) -> None:
    _, headers = guest
    before = _value(_scrape(client), "tmem_request_duration_seconds", family="control")
    assert client.get("/v1/notices?wait=0.01", headers=headers).status_code == 200
    assert _value(_scrape(client), "tmem_request_duration_seconds", family="control") == before
    assert client.get("/v1/notices", headers=headers).status_code == 200
    assert _value(_scrape(client), "tmem_request_duration_seconds", family="control") == before + 1


def test_docs_list_exactly_the_metrics() -> None:
    text = DOC.read_text()
    start = text.index("<!-- metrics table:")
    start = text.index("\n", start) + 1
    end = text.index("<!-- end of metrics table -->")
    assert text[start:end] == markdown_table(), "regenerate: python -m broker.api.metrics"
