"""Secrets: tokens are never logged (in process with caplog, and in a real broker's output at
debug level), guest tokens are kept only as SHA-256 (in SQL, and nowhere in the data dir), the
admin token file is 0600, and the admin token is compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from broker.api import auth
from broker.api.auth import TokenRegistry, load_or_create_admin_token
from tests.api.conftest import ADMIN, ADMIN_TOKEN, page, page_url
from tests.e2e.brokerproc import ADMIN as PROC_ADMIN
from tests.e2e.brokerproc import BrokerProcess
from tests.harden.conftest import new_guest, new_pool

pytestmark = pytest.mark.timeout(90)


def _exercise(client: TestClient, headers: dict[str, str], token: str) -> None:
    """Every way a token reaches the broker: header, query parameter, wrong side, wrong token."""
    assert new_pool(client, headers) == 0
    assert client.put(page_url(0, 1, 0), content=page(1), headers=headers).status_code == 204
    assert client.get(page_url(0, 1, 0), headers=headers).status_code == 200
    with client.websocket_connect(f"/v1/notices/ws?token={token}") as ws:
        ws.close()
    bad = {"Authorization": f"Bearer {token}x"}
    assert client.get("/v1/self", headers=bad).status_code == 401
    assert client.get("/v1/stats", headers=headers).status_code == 403
    assert client.get("/v1/self", headers=ADMIN).status_code == 403
    with (
        pytest.raises(WebSocketDisconnect),
        client.websocket_connect(f"/v1/notices/ws?token={token}x"),
    ):
        pass


def test_tokens_never_reach_the_log(
    client_factory: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = client_factory(durability="sync")
    gid, headers = new_guest(client, "secretive")
    token = headers["Authorization"].split()[1]
    _exercise(client, headers, token)
    assert client.delete(f"/v1/guests/{gid}", headers=ADMIN).status_code == 204
    text = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert caplog.records, "nothing was logged: the test would prove nothing"
    for secret in (token, ADMIN_TOKEN, hashlib.sha256(token.encode()).hexdigest()):
        assert secret not in text


@pytest.mark.timeout(120)
def test_a_real_broker_logs_no_token_at_debug_level(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMEM_LOG_LEVEL", "debug")  # the access log is on at debug
    with BrokerProcess(tmp_path / "data", durability="sync") as broker:
        _, token = broker.new_guest("secretive")
        broker.new_pool(token)
        assert broker.call("PUT", page_url(0, 1, 0), page(1), token=token)[0] == 204
        assert broker.call("GET", page_url(0, 1, 0), token=token)[0] == 200
        assert broker.call("GET", "/v1/self", token=token + "x")[0] == 401
        ws_url = broker.url.replace("http://", "ws://")
        with connect(f"{ws_url}/v1/notices/ws?token={token}", open_timeout=10):
            pass
        with pytest.raises(InvalidStatus), connect(f"{ws_url}/v1/notices/ws?token={token}x"):
            pass
        broker.stop()
        log = broker.log.read_text(errors="replace")
    data_files = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert "GET /v1/self" in log or "/v1/pools" in log, "no access log: the test proves nothing"
    for secret in (token, PROC_ADMIN):
        assert secret not in log
    # hashed at rest: the token appears in no file the broker keeps (SQL, journal, ...)
    assert data_files
    for path in data_files:
        assert token.encode() not in path.read_bytes(), path


def test_guest_tokens_are_stored_as_sha256_only(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory()
    _, headers = new_guest(client, "hashed")
    token = headers["Authorization"].split()[1]
    db = Path(str(client.app.state.settings.sqlalchemy_url).removeprefix("sqlite:///"))  # type: ignore[attr-defined]
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT * FROM guests").fetchall()
    assert len(rows) == 1
    values = rows[0]
    assert hashlib.sha256(token.encode()).digest() in values
    assert not any(isinstance(v, str) and token in v for v in values)
    assert token.encode() not in db.read_bytes()


def test_the_generated_admin_token_file_is_0600_and_never_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = os.umask(0)  # even a permissive umask gives 0600
    try:
        token, path, created = load_or_create_admin_token(tmp_path / "d")
    finally:
        os.umask(old)
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == token and len(token) >= 43  # 256 bits
    assert load_or_create_admin_token(tmp_path / "d") == (token, path, False)
    assert token not in capsys.readouterr().out
    assert not list((tmp_path / "d").glob(".admin-token.*"))  # no temporary file left behind


def test_the_admin_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the module auth.py calls it through
    registry = TokenRegistry("the-admin-token")
    assert registry.is_admin("the-admin-token") and not registry.is_admin("the-admin-tokeN")
    # compared as fixed-length digests, never as the raw strings
    assert len(calls) == 2 and all(len(a) == len(b) == 32 for a, b in calls)
    # a guest token is looked up by its digest: the raw token is never compared
    registry.add(auth.hash_token("guest-token"), 7)
    assert registry.guest_for_token("guest-token") == 7
    assert registry.guest_for_token("guest-tokeN") is None
