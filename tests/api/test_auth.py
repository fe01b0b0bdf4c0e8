"""Tokens: 401 for none or a wrong one, 403 for the wrong side, the generated admin token file,
hashes only in SQL, and no token in any log line."""

from __future__ import annotations

import logging
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from starlette.testclient import WebSocketDenialResponse

from broker.api.auth import TokenRegistry, bearer_token, hash_token, new_token
from broker.api.errors import Forbidden, Unauthorised
from broker.app import RedactTokens, create_app
from tests.api.conftest import ADMIN, ADMIN_TOKEN, Guest, error_code, make_settings, page, page_url

GUEST_ROUTES = [
    ("POST", "/v1/pools", {"kind": "persistent"}),
    ("DELETE", "/v1/pools/0", None),
    ("PUT", "/v1/pools/0/objects/1/pages/0", b"p" * 4096),
    ("GET", "/v1/pools/0/objects/1/pages/0", None),
    ("DELETE", "/v1/pools/0/objects/1/pages/0", None),
    ("DELETE", "/v1/pools/0/objects/1", None),
    ("POST", "/v1/pools/0/batch", b""),
    ("GET", "/v1/self", None),
    ("POST", "/v1/self/pressure", {}),
    ("GET", "/v1/notices", None),
    ("POST", "/v1/notices/1/ack", {"pages_returned": 0}),
]
ADMIN_ROUTES = [
    ("POST", "/v1/guests", {"name": "x"}),
    ("GET", "/v1/guests", None),
    ("GET", "/v1/guests/1", None),
    ("PATCH", "/v1/guests/1", {"weight": 2}),
    ("DELETE", "/v1/guests/1", None),
    ("POST", "/v1/guests/1/freeze", None),
    ("POST", "/v1/guests/1/thaw", None),
    ("POST", "/v1/guests/1/flush", None),
    ("POST", "/v1/shared-auth", {"uuid": "6f1d3a2e-1b7c-4e55-9d1a-0e8f2c3b4a5d", "guest_id": 1}),
    ("GET", "/v1/stats", None),
    ("GET", "/v1/settings", None),
]


def _call(client: TestClient, method: str, path: str, body: object, headers: dict[str, str]) -> int:
    if isinstance(body, bytes):
        r = client.request(method, path, content=body, headers=headers)
    else:
        r = client.request(method, path, json=body, headers=headers)
    if r.status_code in (401, 403):
        assert error_code(r) in ("unauthorised", "forbidden")
    return r.status_code


@pytest.mark.parametrize(("method", "path", "body"), GUEST_ROUTES + ADMIN_ROUTES)
def test_no_or_bad_token_is_401(client: TestClient, method: str, path: str, body: object) -> None:
    assert _call(client, method, path, body, {}) == 401
    assert _call(client, method, path, body, {"Authorization": "Bearer nope"}) == 401
    assert _call(client, method, path, body, {"Authorization": f"Basic {ADMIN_TOKEN}"}) == 401
    assert _call(client, method, path, body, {"Authorization": "Bearer"}) == 401


@pytest.mark.parametrize(("method", "path", "body"), GUEST_ROUTES)
def test_admin_token_on_guest_routes_is_403(
    client: TestClient, method: str, path: str, body: object
) -> None:
    assert _call(client, method, path, body, ADMIN) == 403


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
def test_guest_token_on_admin_routes_is_403(
    client: TestClient, guest: Guest, method: str, path: str, body: object
) -> None:
    _, headers = guest
    assert _call(client, method, path, body, headers) == 403
    assert client.get("/v1/guests", headers=ADMIN).json()[0]["weight"] == 100  # nothing changed


def test_bearer_scheme_is_case_insensitive(client: TestClient, guest: Guest) -> None:
    _, headers = guest
    token = headers["Authorization"].split()[1]
    assert client.get("/v1/self", headers={"Authorization": f"bearer {token}"}).status_code == 200
    assert (
        client.get(page_url(0, 1, 0), headers={"Authorization": f"BEARER {token}"}).status_code
        == 404
    )


# Every form a refused Authorization header takes, and the admin token on a guest route.
REFUSED_HEADERS = [
    ({}, 401),
    ({"Authorization": "Bearer"}, 401),
    ({"Authorization": "Bearer    "}, 401),
    ({"Authorization": f"Basic {ADMIN_TOKEN}"}, 401),
    ({"Authorization": f"Bearer{ADMIN_TOKEN}"}, 401),
    ({"Authorization": "Bearer nope"}, 401),
    (ADMIN, 403),
    ({"Authorization": f"bEaReR   {ADMIN_TOKEN}  "}, 403),
]


@pytest.mark.parametrize(("headers", "status"), REFUSED_HEADERS)
def test_every_guest_route_refuses_a_header_alike(
    client: TestClient, headers: dict[str, str], status: int
) -> None:
    # One authentication path: a JSON route, the page routes and the batch (plain Starlette
    # routes) give the very same answer, message included, and so does the notice WebSocket.
    answers = [
        client.get("/v1/self", headers=headers),
        client.get(page_url(0, 1, 0), headers=headers),
        client.put(page_url(0, 1, 0), content=page(1), headers=headers),
        client.post("/v1/pools/0/batch", content=b"", headers=headers),
    ]
    first = answers[0]
    assert first.status_code == status
    assert error_code(first) in ("unauthorised", "forbidden")
    for r in answers[1:]:
        assert (r.status_code, r.json()) == (first.status_code, first.json())
    with (
        pytest.raises(WebSocketDenialResponse) as denied,
        client.websocket_connect("/v1/notices/ws", headers=headers),
    ):
        pass
    assert denied.value.status_code == first.status_code
    assert denied.value.json() == first.json()


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        (b"Bearer abc", "abc"),
        (b"bearer   abc  ", "abc"),
        (b"BEARER a b", "a b"),
        (b"Bearer", None),
        (b"Bearer   ", None),
        (b"Bearerabc", None),
        (b"Basic abc", None),
    ],
)
def test_bearer_token_parses_the_header_once(header: bytes | None, token: str | None) -> None:
    headers = [(b"host", b"x")] + ([(b"authorization", header)] if header is not None else [])
    assert bearer_token({"type": "http", "headers": headers}) == token


def test_registry_resolves_a_guest_or_the_admin() -> None:
    registry = TokenRegistry("admin")
    token = new_token()
    registry.add(hash_token(token), 7)
    assert registry.guest(token) == 7
    registry.admin("admin")
    for call, wrong_side in ((registry.guest, "admin"), (registry.admin, token)):
        with pytest.raises(Forbidden):
            call(wrong_side)
        for bad in (None, "nope"):
            with pytest.raises(Unauthorised):
                call(bad)


def test_admin_token_file_is_generated_once_with_mode_0600(
    tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path, sqlite_url, admin_token=None)
    with TestClient(create_app(settings)) as c:
        path = settings.data_dir / "admin-token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        token = path.read_text().strip()
        assert len(token) >= 43
        assert c.get("/v1/guests", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert c.get("/v1/guests", headers=ADMIN).status_code == 401
    printed = capsys.readouterr().out
    assert str(path.resolve()) in printed
    assert token not in printed
    with TestClient(create_app(settings)) as c:  # the second start reuses it
        assert path.read_text().strip() == token
        assert c.get("/v1/guests", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_only_token_hashes_are_stored(tmp_path: Path, sqlite_url: str) -> None:
    settings = make_settings(tmp_path, sqlite_url)
    with TestClient(create_app(settings)) as c:
        token = c.post("/v1/guests", json={"name": "vm"}, headers=ADMIN).json()["token"]
    engine = create_engine(sqlite_url)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT token_hash FROM guests")).scalar_one()
    engine.dispose()
    assert bytes(stored) == hash_token(token)
    raw = b"".join(p.read_bytes() for p in tmp_path.rglob("broker.sqlite3*"))
    assert token.encode() not in raw


def test_tokens_never_reach_the_logs(
    client: TestClient,
    make_guest: Callable[..., Guest],
    make_pool: Callable[..., int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    gid, headers = make_guest()
    token = headers["Authorization"].split()[1]
    pool = make_pool(headers)
    client.put(page_url(pool, 1, 0), content=page(1), headers=headers)
    client.post(f"/v1/guests/{gid}/freeze", headers=ADMIN)
    with client.websocket_connect(f"/v1/notices/ws?token={token}") as ws:
        assert ws.receive_json()["type"] == "freeze"
    client.get("/v1/self", headers={"Authorization": "Bearer wrong-token-value"})
    text_logged = "\n".join(r.getMessage() for r in caplog.records)
    assert text_logged  # the broker did log (guest ids, notices)
    for secret in (token, ADMIN_TOKEN, "wrong-token-value"):
        assert secret not in text_logged


def test_uvicorn_lines_are_redacted() -> None:
    token = new_token()
    record = logging.LogRecord(
        "uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" [accepted]',
        ("127.0.0.1:5000", f"/v1/notices/ws?after=3&token={token}"), None,
    )  # fmt: skip
    assert RedactTokens().filter(record)
    assert token not in record.getMessage()
    assert "after=3&token=<redacted>" in record.getMessage()


def test_registry_lookup() -> None:
    registry = TokenRegistry("admin")
    token = new_token()
    registry.add(hash_token(token), 7)
    assert registry.guest_for_token(token) == 7
    assert registry.guest_for_token(token + "x") is None
    assert registry.is_admin("admin") and not registry.is_admin(token)
    registry.remove_guest(7)
    assert registry.guest_for_token(token) is None
    assert len(new_token()) >= 43 and new_token() != new_token()
