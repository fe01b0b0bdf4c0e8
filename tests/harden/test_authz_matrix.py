"""Authorisation matrix: every endpoint x {no token, bad token, guest A, guest B, admin}.

The endpoint list is read from the app's routes, so a new route without a row here fails
:func:`test_every_route_has_a_row`. Guests A and B both own pool 0 (same pool ids, separate
namespaces); A holds a page at (0, 1, 0) and has notices 1 and 2, B has neither. Requests that
name a guest id name A's. Each row runs against a fresh broker; refused callers go first, so a
destructive call by an allowed caller comes last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from schemas.batch import OP_GET, encode_request
from tests.api.conftest import ADMIN, error_code, page
from tests.harden.conftest import new_guest, new_pool

pytestmark = pytest.mark.timeout(120)

ROLES = ("none", "bad", "admin", "b", "a")
UUID = "2b0bd1a6-8d7e-4a57-9f5c-6c2b8f1f0d11"
PAGE = "/v1/pools/0/objects/1/pages/0"


@dataclass(frozen=True)
class Row:
    """Expected status per role; the body is JSON (dict), raw bytes, or None."""

    expect: dict[str, int]
    body: Any = None
    content_type: str | None = None


PUBLIC = {r: 200 for r in ROLES}
ADMIN_ONLY = {"none": 401, "bad": 401, "a": 403, "b": 403}
GUEST_ONLY = {"none": 401, "bad": 401, "admin": 403}


def admin_row(ok: int, body: Any = None, **kw: Any) -> Row:
    return Row({**ADMIN_ONLY, "admin": ok}, body, **kw)


def guest_row(a: int, b: int | None = None, body: Any = None, **kw: Any) -> Row:
    return Row({**GUEST_ONLY, "a": a, "b": a if b is None else b}, body, **kw)


BATCH_GET = encode_request([(OP_GET, 1, 0, None)])

# (method, path template) -> row; "{guest_id}" is A's id, "{seq}" is 1, "{pool_id}" is 0, "{name}" is "tenant".
MATRIX: dict[tuple[str, str], Row] = {
    ("GET", "/openapi.json"): Row(PUBLIC),
    ("GET", "/docs"): Row(PUBLIC),
    ("GET", "/docs/oauth2-redirect"): Row(PUBLIC),
    ("GET", "/redoc"): Row(PUBLIC),
    ("GET", "/healthz"): Row(PUBLIC),
    ("GET", "/readyz"): Row(PUBLIC),
    # public without a token (the figures that depend on what guests share left out), all of
    # them with the admin token; a token that is not the admin's is refused, not ignored
    ("GET", "/metrics"): Row({**ADMIN_ONLY, "none": 200, "admin": 200}),
    # the dashboard: the page is public (it shows only a sign-in form); its socket takes the
    # admin token as its first message, or as a header checked at the handshake
    ("GET", "/dashboard"): Row(PUBLIC),
    ("GET", "/dashboard/dashboard.js"): Row(PUBLIC),
    ("GET", "/dashboard/dashboard.css"): Row(PUBLIC),
    ("WS", "/dashboard/live"): Row({"none": 101, "bad": 401, "admin": 101, "a": 403, "b": 403}),
    ("GET", "/v1/guests/{guest_id}/pools"): admin_row(200),
    # admin
    ("POST", "/v1/guests"): admin_row(201, {"name": "new-guest"}),
    ("GET", "/v1/guests"): admin_row(200),
    ("GET", "/v1/guests/{guest_id}"): admin_row(200),
    ("PATCH", "/v1/guests/{guest_id}"): admin_row(200, {"weight": 50}),
    ("DELETE", "/v1/guests/{guest_id}"): admin_row(204),
    ("POST", "/v1/guests/{guest_id}/freeze"): admin_row(204),
    ("POST", "/v1/guests/{guest_id}/shed"): admin_row(200, body={"pages": 1}),
    ("POST", "/v1/guests/{guest_id}/thaw"): admin_row(204),
    ("POST", "/v1/guests/{guest_id}/flush"): admin_row(204),
    ("POST", "/v1/shared-auth"): admin_row(204, {"uuid": UUID, "guest_id": 0, "allow": True}),
    ("GET", "/v1/stats"): admin_row(200),
    ("GET", "/v1/settings"): admin_row(200),
    ("GET", "/v1/domains"): admin_row(200),
    ("PUT", "/v1/domains/{name}"): admin_row(200, {"trusted": True}),
    ("PATCH", "/v1/settings"): admin_row(200, {"capacity": "64MiB"}),
    ("GET", "/v1/guests/{guest_id}/export"): admin_row(200),
    ("GET", "/v1/exports"): admin_row(200),
    # cluster calls on a single host: the admin is told it is not a cluster (docs/scale.md)
    ("GET", "/v1/brokers"): admin_row(200),
    ("POST", "/v1/guests/{guest_id}/home"): admin_row(409, {"broker": "b2"}),
    # the admin says the guest moved (tmem-broker migrate): it is deleted here
    ("POST", "/v1/guests/{guest_id}/moved"): admin_row(204, {"url": "http://10.0.0.2:8470"}),
    ("POST", "/v1/guests/import"): admin_row(
        400, b"not an export stream", content_type="application/x-tmem-export"
    ),
    # guest
    ("POST", "/v1/pools"): guest_row(201, body={"kind": "ephemeral"}),
    ("DELETE", "/v1/pools/{pool_id}"): guest_row(204),
    ("GET", "/v1/self"): guest_row(200),
    ("GET", "/v1/pools/{pool_id}"): guest_row(200),  # B's pool 0 is B's own
    ("POST", "/v1/self/pressure"): guest_row(204, body={"psi_some_avg10": 1.0}),
    ("PUT", "/v1/self/exports/{name}"): guest_row(204, body={"base_reads": 1}),
    ("GET", "/v1/self/exports"): guest_row(200),
    ("GET", "/v1/self/shed-candidates"): guest_row(200),
    # the broker's own NBD exports: this broker runs without --nbd-dir (tests/e2e has them)
    ("PUT", "/v1/self/nbd/{name}"): guest_row(404, body={"size": 4096}),
    ("DELETE", "/v1/self/nbd/{name}"): guest_row(404),
    ("GET", "/v1/notices"): guest_row(200),
    # B has no notice 1: its own namespace, not A's.
    ("POST", "/v1/notices/{seq}/ack"): guest_row(204, 404, body={"pages_returned": 0}),
    ("WS", "/v1/notices/ws"): guest_row(101),
    # pages: B's pool 0 is B's own, empty pool
    ("PUT", "/v1/pools/{pool_id}/objects/{oid}/pages/{index}"): guest_row(
        204, body=page(9), content_type="application/octet-stream"
    ),
    ("GET", "/v1/pools/{pool_id}/objects/{oid}/pages/{index}"): guest_row(200, 404),
    ("DELETE", "/v1/pools/{pool_id}/objects/{oid}/pages/{index}"): guest_row(204),
    ("DELETE", "/v1/pools/{pool_id}/objects/{oid}"): guest_row(204),
    ("POST", "/v1/pools/{pool_id}/batch"): guest_row(
        200, body=BATCH_GET, content_type="application/x-tmem-batch"
    ),
}


def _walk(routes: list[BaseRoute]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for route in routes:
        inner = getattr(route, "original_router", None)  # an included APIRouter
        if inner is not None:
            found += _walk(inner.routes)
        elif isinstance(route, WebSocketRoute) or type(route).__name__ == "APIWebSocketRoute":
            found.append(("WS", route.path))  # type: ignore[attr-defined]
        elif isinstance(route, Route):
            found += [(m, route.path) for m in route.methods or () if m != "HEAD"]
    return found


def test_every_route_has_a_row(client_factory: Callable[..., TestClient]) -> None:
    app: Any = client_factory().app
    routes = _walk(app.router.routes)
    assert len(routes) == len(set(routes))
    assert set(routes) == set(MATRIX), (
        f"routes without a matrix row: {sorted(set(routes) - set(MATRIX))}; "
        f"rows without a route: {sorted(set(MATRIX) - set(routes))}"
    )


def _fill(path: str, guest_id: int) -> str:
    return path.format(guest_id=guest_id, pool_id=0, oid=1, index=0, seq=1, name="tenant")


def _call(client: TestClient, method: str, path: str, row: Row, auth: dict[str, str]) -> int:
    if method == "WS":
        try:
            with client.websocket_connect(path, headers=auth) as ws:
                ws.close()
                return 101
        except WebSocketDenialResponse as denied:
            return denied.status_code
        except WebSocketDisconnect as exc:  # pragma: no cover - servers without denial answers
            assert exc.code == 1008
            return 403
    headers = dict(auth)
    if isinstance(row.body, dict):
        return client.request(method, path, json=row.body, headers=headers).status_code
    if row.content_type:
        headers["Content-Type"] = row.content_type
    r = client.request(method, path, content=row.body, headers=headers)
    if r.status_code >= 400:
        error_code(r)  # every refusal has the error shape
    return r.status_code


@pytest.mark.parametrize(("method", "path"), sorted(MATRIX), ids=lambda v: str(v))
def test_matrix(client_factory: Callable[..., TestClient], method: str, path: str) -> None:
    client = client_factory(durability="sync")  # the export needs the journal
    a_id, a = new_guest(client, "a")
    _, b = new_guest(client, "b")
    assert new_pool(client, a) == 0 and new_pool(client, b) == 0
    assert client.put(PAGE, content=page(1), headers=a).status_code == 204
    for action in ("freeze", "thaw"):  # A's notices 1 and 2
        assert client.post(f"/v1/guests/{a_id}/{action}", headers=ADMIN).status_code == 204
    auths = {
        "none": {},
        "bad": {"Authorization": "Bearer not-a-token"},
        "admin": ADMIN,
        "a": a,
        "b": b,
    }
    row = MATRIX[(method, path)]
    got = {}
    # Refused callers first, then the ones that may change something (B before A).
    for role in sorted(ROLES, key=lambda r: row.expect[r] < 300):
        body = row.body
        if isinstance(body, dict) and "guest_id" in body:
            row = Row(row.expect, {**body, "guest_id": a_id}, row.content_type)
        got[role] = _call(client, method, _fill(path, a_id), row, auths[role])
    assert got == row.expect
    # a guest deleted, or moved away (its calls now answered 307), has no page here to check
    if (method != "DELETE" or "guests" not in path) and not path.endswith("/moved"):
        # whatever B and the refused callers did, A's page is where A put it (unless A itself
        # or the admin removed it)
        removed = path.endswith("/flush") or method == "DELETE"
        if not removed and method != "PUT":
            assert client.get(PAGE, headers=a).content == page(1)
        assert client.get(PAGE, headers=b).status_code == 404 or method in ("PUT", "POST")
