"""Operational routes, the OpenAPI document, and error shapes of unknown routes, wrong methods
and oversized JSON bodies."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from broker.app import service_of
from tests.api.conftest import ADMIN, Guest, error_code, page, page_url


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert (r.status_code, r.json()["status"]) == (200, "ready")


def test_readyz_is_503_while_reloading(client: TestClient) -> None:
    service = service_of(client.app)
    service.ready.clear()  # what the lifespan does until the journal reload has finished
    try:
        r = client.get("/readyz")
        assert (r.status_code, r.json()["status"]) == (503, "starting")
        assert client.get("/healthz").status_code == 200
    finally:
        service.ready.set()
    assert client.get("/readyz").status_code == 200


def test_metrics(client: TestClient, guest: Guest, make_pool: Callable[..., int]) -> None:
    gid, headers = guest
    pool = make_pool(headers)
    client.put(page_url(pool, 1, 0), content=page(1), headers=headers)
    client.put(page_url(pool, 1, 1), content=page(1), headers=headers)
    scraped = {}
    for view, auth in (("public", {}), ("admin", ADMIN)):
        r = client.get("/metrics", headers=auth)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        scraped[view] = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text)
            for s in family.samples
        }
    for samples in scraped.values():
        assert samples[("tmem_ready", ())] == 1
        assert samples[("tmem_guests", ())] == 1
        assert samples[("tmem_logical_pages", ())] == 2
        assert samples[("tmem_puts_total", ())] == 2
        assert samples[("tmem_guest_logical_pages", (("guest_id", str(gid)),))] == 2
    # what depends on sharing (the two puts share one content) only with the admin token
    assert scraped["admin"][("tmem_unique_pages", ())] == 1
    assert ("tmem_unique_pages", ()) not in scraped["public"]
    assert ("tmem_dedup_hits_total", ()) not in scraped["public"]


def test_openapi_documents_every_endpoint(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    expected = {
        "/v1/pools": {"post"},
        "/v1/pools/{pool_id}": {"delete"},
        "/v1/pools/{pool_id}/objects/{oid}/pages/{index}": {"put", "get", "delete"},
        "/v1/pools/{pool_id}/objects/{oid}": {"delete"},
        "/v1/pools/{pool_id}/batch": {"post"},
        "/v1/self": {"get"},
        "/v1/self/pressure": {"post"},
        "/v1/notices": {"get"},
        "/v1/notices/{seq}/ack": {"post"},
        "/v1/guests": {"get", "post"},
        "/v1/guests/{guest_id}": {"get", "patch", "delete"},
        "/v1/guests/{guest_id}/freeze": {"post"},
        "/v1/guests/{guest_id}/thaw": {"post"},
        "/v1/guests/{guest_id}/flush": {"post"},
        "/v1/shared-auth": {"post"},
        "/v1/stats": {"get"},
        "/healthz": {"get"},
        "/readyz": {"get"},
        "/metrics": {"get"},
    }
    for path, methods in expected.items():
        assert path in paths, path
        assert methods <= set(paths[path]), path
    put = paths["/v1/pools/{pool_id}/objects/{oid}/pages/{index}"]["put"]
    assert "application/octet-stream" in put["requestBody"]["content"]
    batch = paths["/v1/pools/{pool_id}/batch"]["post"]
    assert "application/x-tmem-batch" in batch["requestBody"]["content"]
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "ErrorBody" in doc["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_unknown_route_is_404_in_the_error_shape(client: TestClient) -> None:
    r = client.get("/v1/nowhere", headers=ADMIN)
    assert (r.status_code, error_code(r)) == (404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/pools/0/objects/1/pages/0"),
        ("PATCH", "/v1/pools/0/objects/1"),
        ("GET", "/v1/pools/0/batch"),
        ("PUT", "/v1/stats"),
        ("DELETE", "/v1/guests"),
    ],
)
def test_wrong_method_is_405_in_the_error_shape(
    client: TestClient, guest: Guest, method: str, path: str
) -> None:
    _, headers = guest
    r = client.request(method, path, headers=headers)
    assert (r.status_code, error_code(r)) == (405, "method_not_allowed")
    assert "allow" in r.headers


def test_oversized_json_is_413(client: TestClient, guest: Guest) -> None:
    _, headers = guest
    huge = b'{"kind": "persistent", "pad": "' + b"x" * (128 << 10) + b'"}'
    r = client.post(
        "/v1/pools", content=huge, headers={**headers, "Content-Type": "application/json"}
    )
    assert (r.status_code, error_code(r)) == (413, "body_too_large")

    def chunked() -> Iterator[bytes]:
        yield b'{"kind": "persistent", "pad": "'
        for _ in range(32):
            yield b"x" * 4096
        yield b'"}'

    r = client.post(
        "/v1/pools", content=chunked(), headers={**headers, "Content-Type": "application/json"}
    )  # type: ignore[arg-type]
    assert (r.status_code, error_code(r)) == (413, "body_too_large")
    assert client.get("/v1/self", headers=headers).json()["pools"] == []
