"""The keep-alive transports against a scripted raw-socket HTTP server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from guest_agent.errors import BrokerUnavailable, ProtocolError
from guest_agent.transport import AsyncHTTPTransport, HTTPTransport, Request, unix_socket_path

pytestmark = pytest.mark.timeout(30)


@dataclass
class Seen:
    method: str
    path: str
    body: bytes
    connection: int  # which accepted connection carried it
    headers: dict[str, str] = field(default_factory=dict)


Script = Callable[[Seen, int], "tuple[bytes | None, bool]"]
"""(request, number of the request on its connection) -> (answer or None to drop, close after)."""


class ScriptedServer:
    def __init__(self, script: Script, unix: Path | None = None) -> None:
        self.script = script
        self.seen: list[Seen] = []
        self.connections = 0
        self.unix = unix
        if unix is None:
            self._sock = socket.create_server(("127.0.0.1", 0))
            self.port = self._sock.getsockname()[1]
        else:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.bind(str(unix))
            self._sock.listen()
            self.port = 0
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._stop = False
        self._accept = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept.start()

    @property
    def url(self) -> str:
        if self.unix is not None:
            return f"unix:{self.unix}"
        return f"http://127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket, number: int) -> None:
        buf = b""
        count = 0
        with contextlib.suppress(OSError), conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ")
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length", "0"))
                while len(buf) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                body, buf = buf[:length], buf[length:]
                seen = Seen(method, path, body, number, headers)
                self.seen.append(seen)
                count += 1
                answer, close = self.script(seen, count)
                if answer is None:
                    return
                conn.sendall(answer)
                if close:
                    return

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        self._sock.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(2)
        self._accept.join(2)


@contextlib.contextmanager
def serve(script: Script, unix: Path | None = None) -> Iterator[ScriptedServer]:
    server = ScriptedServer(script, unix)
    try:
        yield server
    finally:
        server.close()


def ok(body: bytes = b"", extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def echo(seen: Seen, n: int) -> tuple[bytes | None, bool]:
    return ok(f"{seen.method} {seen.path} {len(seen.body)}".encode()), False


def test_keep_alive_reuses_one_connection() -> None:
    with serve(echo) as server:
        t = HTTPTransport(server.url)
        for i in range(50):
            r = t.handle_request(Request("PUT", f"/p/{i}", b"x" * 4096, [("A", "b")]))
            assert r.status == 200 and r.body == f"PUT /p/{i} 4096".encode()
        big = t.handle_request(Request("POST", "/big", b"y" * 300_000))
        assert big.body == b"POST /big 300000"
        t.close()
        assert server.connections == 1
        assert server.seen[0].headers["a"] == "b"
        assert server.seen[0].headers["host"] == f"127.0.0.1:{server.port}"


def test_chunked_large_and_empty_bodies() -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB, more than one recv

    def script(seen: Seen, n: int) -> tuple[bytes | None, bool]:
        if seen.path == "/chunked":
            return (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
            ), False
        if seen.path == "/big":
            return ok(payload), False
        if seen.path == "/continue":
            return b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after"), False
        return b"HTTP/1.1 204 No Content\r\n\r\n", False

    with serve(script) as server:
        t = HTTPTransport(server.url)
        assert t.handle_request(Request("GET", "/chunked")).body == b"hello world"
        assert t.handle_request(Request("GET", "/big")).body == payload
        r = t.handle_request(Request("DELETE", "/x"))
        assert (r.status, r.body) == (204, b"")
        assert t.handle_request(Request("GET", "/continue")).body == b"after"
        t.close()
        assert server.connections == 1


def test_large_bodies_of_changing_sizes_on_one_connection() -> None:
    # Large bodies are received into a buffer reused across responses: each answer must be
    # its own bytes, whole, whatever size came before it.
    sizes = [300_000, 100_000, 1_200_000, 70_000, 1_200_000]
    bodies = [bytes([i + 1]) * n for i, n in enumerate(sizes)]

    def script(seen: Seen, n: int) -> tuple[bytes | None, bool]:
        return ok(bodies[int(seen.path.rsplit("/", 1)[1])]), False

    with serve(script) as server:
        t = HTTPTransport(server.url)
        got = [t.handle_request(Request("GET", f"/b/{i}")).body for i in range(len(sizes))]
        t.close()
    assert [type(b) for b in got] == [bytes] * len(sizes)
    assert got == bodies
    assert server.connections == 1


def test_read_to_close_and_connection_close() -> None:
    def script(seen: Seen, n: int) -> tuple[bytes | None, bool]:
        if seen.path == "/eof":
            return b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", True
        return ok(b"k", "Connection: close\r\n"), True

    with serve(script) as server:
        t = HTTPTransport(server.url)
        assert t.handle_request(Request("GET", "/eof")).body == b"until the end"
        assert t.handle_request(Request("POST", "/again", b"z")).body == b"k"
        assert t.handle_request(Request("POST", "/again", b"z")).body == b"k"
        t.close()
        assert server.connections == 3


def wait_until_readable(t: HTTPTransport) -> None:
    sock = t._sock
    if sock is not None:
        select.select([sock], [], [], 5)


def test_idle_connection_closed_by_the_server_is_replaced_before_sending() -> None:
    # The server closes after every answer without saying so (as an idle timeout would).
    with serve(lambda seen, n: (ok(b"fine"), True)) as server:
        t = HTTPTransport(server.url)
        for _ in range(3):
            # POST too: the stale socket is noticed before the request goes out (once the
            # server's close has arrived, which a real idle timeout guarantees).
            assert t.handle_request(Request("POST", "/x", b"1")).body == b"fine"
            wait_until_readable(t)
        t.close()
        assert len(server.seen) == 3


def test_idle_connection_closed_by_the_server_replays_idempotent_requests() -> None:
    # GET, PUT and DELETE go out without the idle check; the dead connection is noticed when
    # the answer does not come, and the request is sent again on a fresh one.
    with serve(lambda seen, n: (ok(seen.method.encode()), True)) as server:
        t = HTTPTransport(server.url)
        for method in ("GET", "PUT", "DELETE", "GET"):
            assert t.handle_request(Request(method, "/x", b"1")).body == method.encode()
            wait_until_readable(t)
        t.close()
        assert [s.method for s in server.seen] == ["GET", "PUT", "DELETE", "GET"]
        assert server.connections >= 4


def _heads(seen: Seen, n: int) -> tuple[bytes | None, bool]:
    answers = {
        "/lf": b"HTTP/1.1 200 OK\nContent-Length: 2\nX-A: 1\n\nlf",
        "/mixed": b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 5\r\n\r\nmixed",
        "/interim": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n"
        b"Content-Length: 3\r\nX-A: 1\r\nX-A: 2\r\n\r\nnew",
    }
    return answers[seen.path], False


def test_answer_heads_with_bare_newlines_interim_answers_and_repeated_headers() -> None:
    with serve(_heads) as server:
        t = HTTPTransport(server.url)
        lf = t.handle_request(Request("GET", "/lf"))
        assert (lf.status, lf.body, lf.headers["x-a"]) == (200, b"lf", "1")
        assert t.handle_request(Request("GET", "/mixed")).body == b"mixed"
        new = t.handle_request(Request("GET", "/interim"))
        assert (new.status, new.body, new.headers["x-a"]) == (201, b"new", "1, 2")
        t.close()
        assert server.connections == 1


def test_an_answer_cut_inside_its_head_is_a_dropped_connection() -> None:
    with serve(lambda seen, n: (b"HTTP/1.1 200 OK\r\nContent-Le", True)) as server:
        with pytest.raises(BrokerUnavailable):
            HTTPTransport(server.url).handle_request(Request("POST", "/x", b"1"))
        assert len(server.seen) == 1


def dropping(seen: Seen, n: int, dropped: set[str]) -> tuple[bytes | None, bool]:
    """Drop /b the first time and /d always, after reading the request."""
    if seen.path == "/d" or (seen.path == "/b" and "/b" not in dropped):
        dropped.add(seen.path)
        return None, True
    if seen.path == "/chunked":
        body = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        return body, False
    return ok(b"ok"), False


def test_drop_mid_request_replays_idempotent_requests_only() -> None:
    dropped: set[str] = set()
    with serve(lambda seen, n: dropping(seen, n, dropped)) as server:
        t = HTTPTransport(server.url)
        assert t.handle_request(Request("GET", "/a")).body == b"ok"
        assert t.handle_request(Request("GET", "/b")).body == b"ok"  # replayed once
        assert [s.path for s in server.seen] == ["/a", "/b", "/b"]
        assert t.handle_request(Request("POST", "/c", b"1")).body == b"ok"
        with pytest.raises(BrokerUnavailable):
            t.handle_request(Request("POST", "/d", b"1"))  # never replayed
        assert [s.path for s in server.seen].count("/d") == 1
        t.close()


def test_refused_and_timed_out_connections_raise_broker_unavailable() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(BrokerUnavailable):
        HTTPTransport(f"http://127.0.0.1:{port}").handle_request(Request("GET", "/"))
    hang = threading.Event()

    def script(seen: Seen, n: int) -> tuple[bytes | None, bool]:
        hang.wait(5)
        return None, True

    with serve(script) as server:
        with pytest.raises(BrokerUnavailable):
            HTTPTransport(server.url, timeout=0.2).handle_request(Request("GET", "/slow"))
        hang.set()


def test_garbage_answers_raise_protocol_error() -> None:
    with (
        serve(lambda seen, n: (b"SMTP ready\r\n\r\n", True)) as server,
        pytest.raises(ProtocolError),
    ):
        HTTPTransport(server.url).handle_request(Request("GET", "/"))


def test_bad_urls_are_refused() -> None:
    with pytest.raises(ValueError):
        HTTPTransport("ftp://x")
    with pytest.raises(ValueError):
        AsyncHTTPTransport("http://")
    with pytest.raises(ValueError):
        HTTPTransport("unix:")


def test_unix_socket_addresses() -> None:
    assert unix_socket_path("unix:/run/tmem/broker.sock") == "/run/tmem/broker.sock"
    assert unix_socket_path("unix:var/broker.sock") == "var/broker.sock"  # relative to the cwd
    assert unix_socket_path("http://127.0.0.1:8470") is None


def test_keep_alive_on_a_unix_socket(tmp_path: Path) -> None:
    with serve(echo, unix=tmp_path / "b.sock") as server:
        t = HTTPTransport(server.url)
        for i in range(20):
            r = t.handle_request(Request("PUT", f"/p/{i}", b"x" * 4096))
            assert r.body == f"PUT /p/{i} 4096".encode()
        big = t.handle_request(Request("POST", "/big", b"y" * 300_000))
        assert big.body == b"POST /big 300000"
        t.close()
        assert server.connections == 1
        assert server.seen[0].headers["host"] == "localhost"


def test_unix_socket_nobody_listens(tmp_path: Path) -> None:
    with pytest.raises(BrokerUnavailable):
        HTTPTransport(f"unix:{tmp_path / 'none.sock'}").handle_request(Request("GET", "/"))


async def _twenty_puts_and_a_big_post_on_one_connection(url: str) -> None:
    t = AsyncHTTPTransport(url, max_connections=2)
    for i in range(20):
        r = await t.handle_async_request(Request("PUT", f"/p/{i}", b"x" * 4096))
        assert r.body == f"PUT /p/{i} 4096".encode()
    big = await t.handle_async_request(Request("POST", "/big", b"y" * 200_000))
    assert big.body == b"POST /big 200000"
    await t.aclose()


async def test_async_transport_on_a_unix_socket(tmp_path: Path) -> None:
    with serve(echo, unix=tmp_path / "b.sock") as server:
        await _twenty_puts_and_a_big_post_on_one_connection(server.url)
        assert server.connections == 1
        assert server.seen[0].headers["host"] == "localhost"
    t = AsyncHTTPTransport(f"unix:{tmp_path / 'none.sock'}", timeout=2)
    with pytest.raises(BrokerUnavailable):
        await t.handle_async_request(Request("GET", "/"))


async def test_async_transport_pools_and_reconnects() -> None:
    with serve(echo) as server:
        await _twenty_puts_and_a_big_post_on_one_connection(server.url)
        assert server.connections == 1

    dropped: set[str] = set()
    with serve(lambda seen, n: dropping(seen, n, dropped)) as server:
        t = AsyncHTTPTransport(server.url)
        assert (await t.handle_async_request(Request("GET", "/chunked"))).body == b"abc"
        assert (await t.handle_async_request(Request("GET", "/b"))).body == b"ok"  # replayed
        assert [s.path for s in server.seen] == ["/chunked", "/b", "/b"]
        with pytest.raises(BrokerUnavailable):
            await t.handle_async_request(Request("POST", "/d", b"1"))  # never replayed
        assert [s.path for s in server.seen].count("/d") == 1
        await t.aclose()


async def test_async_transport_refused() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    t = AsyncHTTPTransport(f"http://127.0.0.1:{port}", timeout=2)
    with pytest.raises(BrokerUnavailable):
        await t.handle_async_request(Request("GET", "/"))
