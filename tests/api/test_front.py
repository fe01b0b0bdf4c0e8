"""``HotRoutes`` (broker/api/front.py, what ``tmem-broker serve`` runs) answers every page-route
request exactly as the full FastAPI stack does: the same status, body and content type, for
good requests and for every kind of malformed one; other requests pass through."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from broker.api.front import HotRoutes
from broker.app import create_app
from tests.api.conftest import ADMIN, make_settings, page

HEADER = struct.Struct(">BQQQI")
BATCH = "application/x-tmem-batch"


def _batch(*ops: tuple[int, int, int, bytes | None]) -> bytes:
    return b"".join(
        HEADER.pack(op, 0, 0, oid, index) + (data or b"") for op, oid, index, data in ops
    )


# (method, path with {pool}, body, content type, which token: guest|admin|bad|none)
REQUESTS: list[tuple[str, str, bytes, str | None, str]] = [
    ("PUT", "/v1/pools/{pool}/objects/7/pages/0", page(1), "application/octet-stream", "guest"),
    ("PUT", "/v1/pools/{pool}/objects/7/pages/1", page(2), None, "guest"),
    ("GET", "/v1/pools/{pool}/objects/7/pages/0", b"", None, "guest"),
    ("GET", "/v1/pools/{pool}/objects/7/pages/5", b"", None, "guest"),  # miss
    ("HEAD", "/v1/pools/{pool}/objects/7/pages/0", b"", None, "guest"),  # not a hot route
    ("PUT", "/v1/pools/{pool}/objects/7/pages/2", b"short", None, "guest"),  # bad page size
    ("PUT", "/v1/pools/{pool}/objects/7/pages/2", b"x" * (70 << 10), None, "guest"),  # 413
    ("PUT", "/v1/pools/{pool}/objects/-1/pages/2", page(3), None, "guest"),  # bad handle
    ("GET", "/v1/pools/{pool}/objects/7/pages/4294967296", b"", None, "guest"),
    ("GET", "/v1/pools/99/objects/7/pages/0", b"", None, "guest"),  # unknown pool
    ("GET", "/v1/pools/x/objects/7/pages/0", b"", None, "guest"),
    ("GET", "/v1/pools/{pool}/objects/7/pages/0", b"", None, "admin"),  # 403
    ("GET", "/v1/pools/{pool}/objects/7/pages/0", b"", None, "bad"),  # 401
    ("GET", "/v1/pools/{pool}/objects/7/pages/0", b"", None, "none"),
    ("PATCH", "/v1/pools/{pool}/objects/7/pages/0", b"", None, "guest"),  # 405
    ("GET", "/v1/pools/{pool}/objects/7/pages/0/", b"", None, "guest"),  # no such route
    ("GET", "/v1/pools/{pool}/objects//pages/0", b"", None, "guest"),
    (
        "POST",
        "/v1/pools/{pool}/batch",
        _batch((1, 9, 0, page(4)), (2, 9, 0, None), (2, 9, 1, None)),
        BATCH,
        "guest",
    ),
    ("POST", "/v1/pools/{pool}/batch", _batch((7, 9, 0, None)), BATCH, "guest"),  # bad op
    ("POST", "/v1/pools/{pool}/batch", b"\x01" + b"\x00" * 40, BATCH, "guest"),  # truncated
    ("GET", "/v1/pools/{pool}/batch", b"", None, "guest"),  # 405
    ("DELETE", "/v1/pools/{pool}/objects/7/pages/1", b"", None, "guest"),
    ("GET", "/v1/pools/{pool}/objects/7/pages/1", b"", None, "guest"),  # flushed: miss
    ("DELETE", "/v1/pools/{pool}/objects/7", b"", None, "guest"),
    ("GET", "/v1/pools/{pool}/objects/7/pages/0", b"", None, "guest"),  # object flushed
    ("DELETE", "/v1/pools/{pool}/objects/abc", b"", None, "guest"),
    ("DELETE", "/v1/pools/{pool}", b"", None, "guest"),  # not hot: destroy pool
    ("GET", "/v1/self", b"", None, "guest"),  # not hot
]


@pytest.fixture
def apps(tmp_path: Path, sqlite_url: str) -> Iterator[dict[str, TestClient]]:
    plain = create_app(make_settings(tmp_path / "plain", sqlite_url))
    front = HotRoutes(create_app(make_settings(tmp_path / "front", f"{sqlite_url}-front")))
    with TestClient(plain) as p, TestClient(front) as f:
        yield {"plain": p, "front": f}


def _session(client: TestClient) -> tuple[dict[str, str], int]:
    r = client.post("/v1/guests", json={"name": "vm"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    guest = {"Authorization": f"Bearer {r.json()['token']}"}
    r = client.post("/v1/pools", json={"kind": "persistent"}, headers=guest)
    assert r.status_code == 201, r.text
    return guest, int(r.json()["pool_id"])


def _answers(client: TestClient) -> list[tuple[int, Any, str | None]]:
    guest, pool = _session(client)
    tokens = {"guest": guest, "admin": ADMIN, "bad": {"Authorization": "Bearer nope"}, "none": {}}
    out = []
    for method, path, body, ctype, who in REQUESTS:
        headers = dict(tokens[who])
        if ctype:
            headers["Content-Type"] = ctype
        r = client.request(method, path.format(pool=pool), content=body or None, headers=headers)
        kind = r.headers.get("content-type")
        payload: Any = r.json() if kind == "application/json" else r.content
        if isinstance(payload, dict) and "guest_id" in payload:
            payload = {k: v for k, v in payload.items() if k not in ("guest_id", "token")}
        out.append((r.status_code, payload, kind))
    return out


def test_front_answers_as_the_full_stack(apps: dict[str, TestClient]) -> None:
    plain, front = _answers(apps["plain"]), _answers(apps["front"])
    for request, a, b in zip(REQUESTS, plain, front, strict=True):
        assert a == b, (request[:2], a, b)
    statuses = [status for status, _, _ in front]
    # the sequence exercised what it claims: stores, hits, misses and each refusal
    assert statuses[:4] == [204, 204, 200, 404]
    assert {400, 401, 403, 404, 405, 413} <= set(statuses)


def test_front_dispatches_page_routes_itself(tmp_path: Path, sqlite_url: str) -> None:
    app = create_app(make_settings(tmp_path, sqlite_url))
    front = HotRoutes(app)
    seen: list[str] = []
    inner = front.app

    async def spy(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.append(scope["path"])
        await inner(scope, receive, send)

    front.app = spy
    with TestClient(front) as client:
        guest, pool = _session(client)
        assert (
            client.put(
                f"/v1/pools/{pool}/objects/1/pages/2", content=page(9), headers=guest
            ).status_code
            == 204
        )
        assert client.get(f"/v1/pools/{pool}/objects/1/pages/2", headers=guest).content == page(9)
        r = client.post(f"/v1/pools/{pool}/batch", content=_batch((2, 1, 2, None)), headers=guest)
        assert r.status_code == 200 and r.content == b"\x00" + page(9)
    # only the two control calls of _session went through the full stack
    assert seen == ["/v1/guests", "/v1/pools"]


def test_front_leaves_starlette_private_scope_keys_alone(tmp_path: Path, sqlite_url: str) -> None:
    # The page endpoints answer their errors themselves: the front door needs none of the
    # handler tables Starlette's ExceptionMiddleware keeps in the scope.
    app = create_app(make_settings(tmp_path, sqlite_url))
    front = HotRoutes(app)
    endpoint = app.state.guest_pages.get_page
    handler = endpoint.handler
    scopes: list[dict[str, Any]] = []

    async def spy(scope: Any, receive: Any) -> Any:
        scopes.append(dict(scope))
        return await handler(scope, receive)

    endpoint.handler = spy
    with TestClient(front) as client:
        guest, pool = _session(client)
        assert client.get(f"/v1/pools/{pool}/objects/1/pages/2", headers=guest).status_code == 404
        r = client.get("/v1/pools/x/objects/1/pages/2", headers=guest)
        assert (r.status_code, r.json()["error"]["code"]) == (400, "bad_handle")
    assert len(scopes) == 2
    for scope in scopes:
        assert not [key for key in scope if key.startswith("starlette.")], scope.keys()


def test_serve_lets_uvicorn_buffer_a_whole_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    from uvicorn.protocols.http import h11_impl, httptools_impl

    from broker.cli import _buffer_whole_batches

    for module in (httptools_impl, h11_impl):
        monkeypatch.setattr(module, "HIGH_WATER_LIMIT", 65536)
    limit = make_settings(Path("."), "sqlite://").max_batch_bytes
    _buffer_whole_batches(limit)
    assert getattr(httptools_impl, "HIGH_WATER_LIMIT") > limit  # noqa: B009
    assert getattr(h11_impl, "HIGH_WATER_LIMIT") > limit  # noqa: B009
    _buffer_whole_batches(1024)  # never lowers it
    assert getattr(httptools_impl, "HIGH_WATER_LIMIT") > limit  # noqa: B009


@pytest.mark.skipif(not Path("/lib/x86_64-linux-gnu/libc.so.6").exists(), reason="not glibc")
def test_serve_keeps_freed_batch_buffers_in_the_heap() -> None:
    from broker.cli import _keep_freed_buffers

    # glibc accepts both thresholds (mallopt answers 1); a 1 MiB buffer still works after
    assert _keep_freed_buffers(make_settings(Path("."), "sqlite://").max_batch_bytes) is True
    buf = bytearray(1 << 20)
    assert bytes(buf[:4]) == b"\0\0\0\0"


class _Recorder:
    """A transport that records what reaches the socket, one entry per send."""

    def __init__(self) -> None:
        self.sends: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sends.append(bytes(data))

    def writelines(self, parts: Any) -> None:
        self.sends.append(b"".join(parts))

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


async def test_corked_transport_sends_head_and_body_together() -> None:
    from broker.api.front import _CorkedTransport

    raw = _Recorder()
    t = _CorkedTransport(raw, asyncio.get_running_loop())
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n"
    t.write(head)
    assert raw.sends == []  # held for the body
    t.write(b"page")
    assert raw.sends == [head + b"page"]
    t.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    t.write(b"")  # uvicorn's empty write that ends a body-less answer
    assert raw.sends[-1] == b"HTTP/1.1 204 No Content\r\n\r\n"
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")  # a HEAD answer: no write follows
    await asyncio.sleep(0)  # the end of the loop pass sends it
    assert raw.sends[-1] == b"HTTP/1.1 200 OK\r\n\r\n"
    t.write(b"chunk")  # not a head: straight through
    assert raw.sends[-1] == b"chunk"
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")
    t.close()  # closing sends what is held first
    assert raw.sends[-1] == b"HTTP/1.1 200 OK\r\n\r\n" and raw.closed
    assert len(raw.sends) == 5
    assert t.get_extra_info("peername") == "info:peername"  # everything else passes through
