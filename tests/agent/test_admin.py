"""The one admin client: requests and typed answers against a scripted broker, and its
streamed export and import through a real socket."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from guest_agent.admin import AdminClient
from guest_agent.errors import BadRequest, BrokerUnavailable, ProtocolError, UnknownGuest
from guest_agent.transport import MockTransport, Request, Response

pytestmark = pytest.mark.timeout(30)

GUEST = {
    "guest_id": 3,
    "name": "vm-3",
    "weight": 100,
    "cap_pages": 64,
    "quota_pages": 64,
    "dedup_domain": "default",
    "compress": False,
    "frozen": False,
    "pools": [{"pool_id": 1, "kind": "persistent", "shared": False, "pages": 5}],
    "stats": {"persistent_pages": 5},
    "pressure": {"psi_some_avg10": 1.5},
}

SETTINGS = {"capacity_bytes": 1 << 30, "compress": "never", "high_watermark": 0.95}
DOMAIN = {
    "name": "default",
    "trusted": False,
    "compress": None,
    "compress_mode": "never",
    "guests": 1,
    "charged_bytes": 20480,
    "used_bytes": 12288,
    "overridden_by": [],
}


def _json(status: int, body: Any) -> Response:
    return Response(status, json.dumps(body).encode(), {"content-type": "application/json"})


class ScriptedAdmin:
    """Answers the admin endpoints from a dict and records every request."""

    def __init__(self) -> None:
        self.seen: list[Request] = []

    def __call__(self, request: Request) -> Response:
        self.seen.append(request)
        route = (request.method, request.target)
        if route == ("GET", "/v1/guests"):
            return _json(200, [GUEST])
        if route == ("GET", "/v1/guests/3"):
            return _json(200, GUEST)
        if route == ("GET", "/v1/guests/9"):
            return _json(404, {"error": {"code": "unknown_guest", "message": "no guest 9"}})
        if route == ("POST", "/v1/guests"):
            body = json.loads(request.body)
            if not body["name"].isidentifier():
                return _json(422, {"error": {"code": "invalid", "message": "bad name"}})
            return _json(201, {**GUEST, "name": body["name"], "token": "tok-1"})
        if route == ("GET", "/v1/stats"):
            return _json(200, {"logical_pages": 5, "guests": []})
        if route == ("PATCH", "/v1/guests/3"):
            return _json(200, {**GUEST, **json.loads(request.body)})
        if route == ("GET", "/v1/settings"):
            return _json(200, SETTINGS)
        if route == ("PATCH", "/v1/settings"):
            body = json.loads(request.body)
            if body.get("compress") not in (None, "never", "always", "pressure"):
                return _json(422, {"error": {"code": "invalid", "message": "bad compress"}})
            return _json(200, {**SETTINGS, **body})
        if route == ("GET", "/v1/domains"):
            return _json(200, [DOMAIN])
        if request.method == "PUT" and request.target.startswith("/v1/domains/"):
            body = json.loads(request.body)
            name = request.target.rsplit("/", 1)[1]
            return _json(200, {**DOMAIN, "name": name, **body, "overridden_by": [3]})
        if route == ("GET", "/readyz"):
            return _json(200, {"status": "ready"})
        if request.method in ("POST", "DELETE"):
            return Response(204)
        return _json(404, {"error": {"code": "not_found", "message": request.target}})


def test_calls_send_the_contracts_requests_and_parse_typed_answers() -> None:
    broker = ScriptedAdmin()
    with AdminClient("http://broker", "adm", transport=MockTransport(broker)) as admin:
        created = admin.create_guest("vm_new", cap_pages=10, weight=5)
        assert (created.guest_id, created.token, created.name) == (3, "tok-1", "vm_new")
        guests = admin.list_guests()
        assert [g.name for g in guests] == ["vm-3"]
        # what the broker adds for admins is kept, not dropped by the model
        assert guests[0].model_dump()["pressure"] == {"psi_some_avg10": 1.5}
        assert admin.guest(3).pools[0].pages == 5
        assert admin.find_guest("vm-3") is not None and admin.find_guest("nobody") is None
        admin.freeze(3)
        admin.thaw(3)
        admin.flush_guest(3)
        admin.shared_auth("6f1d3a2e-1b7c-4e55-9d1a-0e8f2c3b4a5d", 3, allow=False)
        admin.delete_guest(3)
        assert admin.stats()["logical_pages"] == 5
    sent = [(r.method, r.target) for r in broker.seen]
    assert sent[-6:] == [
        ("POST", "/v1/guests/3/freeze"),
        ("POST", "/v1/guests/3/thaw"),
        ("POST", "/v1/guests/3/flush"),
        ("POST", "/v1/shared-auth"),
        ("DELETE", "/v1/guests/3"),
        ("GET", "/v1/stats"),
    ]
    assert all(("Authorization", "Bearer adm") in r.headers for r in broker.seen)
    assert json.loads(broker.seen[0].body) == {
        "name": "vm_new",
        "weight": 5,
        "cap_pages": 10,
        "dedup_domain": "default",
    }  # compress left out: the guest inherits its domain's (else the broker's) mode
    assert json.loads(broker.seen[-3].body) == {
        "uuid": "6f1d3a2e-1b7c-4e55-9d1a-0e8f2c3b4a5d",
        "guest_id": 3,
        "allow": False,
    }


def test_create_guest_sends_an_explicit_compress_setting() -> None:
    broker = ScriptedAdmin()
    admin = AdminClient("http://broker", "adm", transport=MockTransport(broker))
    admin.create_guest("a", compress=True, dedup_domain="tenant")
    admin.create_guest("b", compress=False)
    bodies = [json.loads(r.body) for r in broker.seen]
    assert [(b.get("compress"), b["dedup_domain"]) for b in bodies] == [
        (True, "tenant"),
        (False, "default"),
    ]


def test_patch_guest_sends_only_the_fields_given_and_null_to_inherit() -> None:
    broker = ScriptedAdmin()
    admin = AdminClient("http://broker", "adm", transport=MockTransport(broker))
    assert admin.patch_guest(3, compress=None).compress is None
    assert admin.patch_guest(3, cap_pages=None, weight=7).weight == 7
    assert admin.patch_guest(3, compress=True, dedup_domain="t").dedup_domain == "t"
    assert [(r.method, r.target) for r in broker.seen] == [("PATCH", "/v1/guests/3")] * 3
    assert [json.loads(r.body) for r in broker.seen] == [
        {"compress": None},
        {"weight": 7, "cap_pages": None},
        {"compress": True, "dedup_domain": "t"},
    ]


def test_settings_and_patch_settings_are_typed() -> None:
    broker = ScriptedAdmin()
    admin = AdminClient("http://broker", "adm", transport=MockTransport(broker))
    now = admin.settings()
    assert (now.capacity_bytes, now.compress) == (1 << 30, "never")
    assert now.model_dump()["high_watermark"] == 0.95  # the tunables are kept
    changed = admin.patch_settings(compress="pressure", low_watermark=0.8)
    assert changed.compress == "pressure"
    assert json.loads(broker.seen[-1].body) == {"compress": "pressure", "low_watermark": 0.8}
    with pytest.raises(BadRequest, match="bad compress"):
        admin.patch_settings(compress="sometimes")


def test_domains_and_put_domain() -> None:
    broker = ScriptedAdmin()
    admin = AdminClient("http://broker", "adm", transport=MockTransport(broker))
    (domain,) = admin.domains()
    assert (domain.name, domain.trusted, domain.used_bytes) == ("default", False, 12288)
    put = admin.put_domain("tenant-a", trusted=True, compress="pressure")
    assert (put.name, put.trusted, put.compress, put.overridden_by) == (
        "tenant-a",
        True,
        "pressure",
        [3],
    )
    admin.put_domain("tenant-a", compress=None)  # back to the broker's default
    admin.put_domain("tenant-a", trusted=False)  # compress left out: unchanged
    admin.put_domain("a b/c")  # an odd name stays one path segment; the broker judges it
    assert [json.loads(r.body) for r in broker.seen[1:]] == [
        {"compress": "pressure", "trusted": True},
        {"compress": None},
        {"trusted": False},
        {},
    ]
    assert [r.target for r in broker.seen[1:]] == [
        "/v1/domains/tenant-a",
        "/v1/domains/tenant-a",
        "/v1/domains/tenant-a",
        "/v1/domains/a%20b%2Fc",
    ]
    bad = MockTransport(lambda r: _json(200, {"domains": []}))
    with pytest.raises(ProtocolError):
        AdminClient("http://b", "adm", transport=bad).domains()


def test_errors_are_the_agents_exception_tree() -> None:
    admin = AdminClient("http://broker", "adm", transport=MockTransport(ScriptedAdmin()))
    with pytest.raises(UnknownGuest) as info:
        admin.guest(9)
    assert (info.value.status, info.value.code) == (404, "unknown_guest")
    with pytest.raises(BadRequest, match="bad name"):
        admin.create_guest("not a name")  # the broker validates, the client reports


def test_an_answer_of_the_wrong_shape_is_a_protocol_error() -> None:
    admin = AdminClient("http://b", "adm", transport=MockTransport(lambda r: _json(200, {"x": 1})))
    with pytest.raises(ProtocolError):
        admin.guest(1)
    with pytest.raises(ProtocolError):
        AdminClient(
            "http://b", "adm", transport=MockTransport(lambda r: _json(200, [1]))
        ).list_guests()


def test_ready_is_false_until_the_broker_answers_200() -> None:
    def down(request: Request) -> Response:
        raise BrokerUnavailable("connection refused")

    assert AdminClient("http://b", transport=MockTransport(down)).ready() is False
    starting = MockTransport(lambda r: _json(503, {"status": "starting"}))
    assert AdminClient("http://b", transport=starting).ready() is False
    assert AdminClient("http://b", transport=MockTransport(ScriptedAdmin())).ready() is True
    with pytest.raises(BrokerUnavailable):
        AdminClient("http://b", "adm", transport=MockTransport(down)).stats()


# --- streamed export and import through a real socket -------------------------------------


class StreamServer:
    """``GET /v1/guests/1/export`` answers ``EXPORT`` chunked in uneven pieces;
    ``POST /v1/guests/import`` reads a chunked body and answers 201 when it is complete."""

    def __init__(self, export: bytes) -> None:
        self.export = export
        self.imported: list[bytes] = []
        self.truncated = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn, conn.makefile("rb") as rfile:
            line = rfile.readline()
            headers = {}
            while (h := rfile.readline()) not in (b"\r\n", b""):
                k, _, v = h.decode().partition(":")
                headers[k.strip().lower()] = v.strip()
            if line.startswith(b"GET /v1/guests/1/export"):
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                pos, size = 0, 1
                while pos < len(self.export):
                    piece = self.export[pos : pos + size]
                    conn.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
                    pos, size = pos + len(piece), size * 3 + 7
                conn.sendall(b"0\r\n\r\n")
            elif line.startswith(b"POST /v1/guests/import"):
                assert headers.get("transfer-encoding") == "chunked"
                parts = []
                while True:
                    size_line = rfile.readline()
                    if not size_line:
                        self.truncated.set()  # the sender dropped the connection mid-body
                        return
                    size = int(size_line, 16)
                    if size == 0:
                        rfile.readline()
                        break
                    parts.append(rfile.read(size))
                    rfile.read(2)
                self.imported.append(b"".join(parts))
                body = json.dumps({"guest_id": 7, "token": "new"}).encode()
                conn.sendall(
                    b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                )
            else:
                body = b'{"error": {"code": "unknown_guest", "message": "no such guest"}}'
                conn.sendall(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                )

    def close(self) -> None:
        self._sock.close()
        for t in self._threads:
            t.join(5)


@pytest.fixture
def stream_server() -> Iterator[StreamServer]:
    server = StreamServer(os.urandom(3 << 20))
    try:
        yield server
    finally:
        server.close()


def test_an_export_streams_into_an_import_piece_by_piece(stream_server: StreamServer) -> None:
    with AdminClient(stream_server.url, "adm") as src, AdminClient(stream_server.url, "adm") as dst:
        pieces: list[int] = []
        with src.export_guest(1) as export:

            def body() -> Iterator[bytes]:
                for piece in export:
                    pieces.append(len(piece))
                    yield piece

            imported = dst.import_guest(body())
    assert (imported.guest_id, imported.token) == (7, "new")
    assert stream_server.imported == [stream_server.export]
    assert len(pieces) > 3 and max(pieces) <= 1 << 20  # streamed, never one whole body


def test_a_failing_producer_leaves_the_import_truncated(stream_server: StreamServer) -> None:
    def body() -> Iterator[bytes]:
        yield b"x" * 1000
        raise ValueError("damaged stream")

    with AdminClient(stream_server.url, "adm") as dst, pytest.raises(ValueError, match="damaged"):
        dst.import_guest(body())
    assert stream_server.truncated.wait(5)
    assert stream_server.imported == []


def test_an_export_of_an_unknown_guest_raises_before_streaming(
    stream_server: StreamServer,
) -> None:
    with AdminClient(stream_server.url, "adm") as src, pytest.raises(UnknownGuest):
        src.export_guest(2)

    def handler(request: Request) -> Response:
        return _json(404, {"error": {"code": "unknown_guest", "message": "no guest 2"}})

    with pytest.raises(UnknownGuest):  # a transport that does not stream answers the same
        AdminClient("http://b", "adm", transport=MockTransport(handler)).export_guest(2)
