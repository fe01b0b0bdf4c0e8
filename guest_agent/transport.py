"""How the agent's clients talk HTTP/1.1: a one-method transport protocol and its implementations.

A transport turns one :class:`Request` into one :class:`Response`; it knows nothing of tmem.
The clients build requests and read responses, so a test swaps the network for a function::

    from guest_agent.transport import MockTransport, Request, Response
    client = TmemClient("http://broker", "token", transport=MockTransport(handler))

==========================  ============================================================
:class:`HTTPTransport`      sync; one keep-alive connection (TCP with ``TCP_NODELAY``, or
                            a Unix socket), one write per request, buffered reads.
                            **Not thread-safe**: one per thread.
:class:`AsyncHTTPTransport` asyncio streams; a small pool of keep-alive connections
                            (``max_connections``), safe to share between tasks of one loop.
:class:`MockTransport`      the in-memory twin: calls ``handler(request) -> Response``
                            (the handler may be sync or async); used by the unit tests.
==========================  ============================================================

The broker address is a base URL (``http://127.0.0.1:8470``, ``https://...``) or
``unix:PATH``: plain HTTP on the Unix domain socket the broker listens on with
``tmem-broker serve --uds PATH`` (for an agent on the broker's host, such as an NBD export
for a local VM: an AF_UNIX send costs less than a loopback TCP one). Both transports and the
notice stream take either form.

Why not httpx: measured on the project's machine, httpx adds ~260 µs per request on the client
side, more than the broker's whole round trip (~90 µs). These transports parse only what the
broker sends: a status line, headers, a ``Content-Length`` or chunked body.

Failure model: connect errors, resets and timeouts raise
:class:`~guest_agent.errors.BrokerUnavailable`. A kept-alive connection the server closed while
idle is detected before the request goes out (a readable idle socket is a closed one); if a
reused connection still drops before the status line arrives, idempotent requests (GET, PUT,
DELETE, HEAD) are retried once on a fresh connection. POST is never replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import select
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

from guest_agent.errors import BrokerUnavailable, ProtocolError
from guest_agent.streamed import StreamedResponse

__all__ = [
    "AsyncHTTPTransport",
    "AsyncTransport",
    "HTTPTransport",
    "MockTransport",
    "Request",
    "Response",
    "StreamedResponse",
    "Transport",
    "unix_socket_path",
]

_IDEMPOTENT = frozenset(("GET", "HEAD", "PUT", "DELETE", "OPTIONS"))
_MAX_LINE = 65536
_MAX_HEADERS = 100


@dataclass(slots=True)
class Request:
    """One HTTP request: ``target`` is the path with its query string (``/v1/self``).
    ``borrow``: the caller reads the answer's body before its next request, so a transport
    may hand it a ``memoryview`` of a buffer it reuses (no copy of a large body)."""

    method: str
    target: str
    body: bytes | bytearray | memoryview = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    borrow: bool = False


@dataclass(slots=True)
class Response:
    """One HTTP response; header names are lower case."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    view: memoryview | None = None  # a borrowed 200 body (``Request.borrow``); ``body`` empty


@runtime_checkable
class Transport(Protocol):
    """The sync transport protocol: one method."""

    def handle_request(self, request: Request) -> Response: ...


@runtime_checkable
class AsyncTransport(Protocol):
    """The async transport protocol: one method."""

    async def handle_async_request(self, request: Request) -> Response: ...


class _Dropped(Exception):
    """The peer closed the connection before a status line arrived."""


UNIX_PREFIX = "unix:"


def unix_socket_path(base_url: str) -> str | None:
    """The socket path of a ``unix:PATH`` broker address, or None for an ``http(s)://`` URL."""
    if not base_url.startswith(UNIX_PREFIX):
        return None
    path = base_url[len(UNIX_PREFIX) :]
    if not path:
        raise ValueError(f"broker address has no socket path: {base_url!r}")
    return path


@dataclass(slots=True, frozen=True)
class _Origin:
    scheme: str
    host: str
    port: int
    host_header: str
    unix: str | None = None  # the socket path of a ``unix:PATH`` broker address

    @classmethod
    def parse(cls, base_url: str) -> _Origin:
        unix = unix_socket_path(base_url)
        if unix is not None:
            # plain HTTP on a Unix domain socket; the Host header names no network host
            return cls("http", "localhost", 0, "localhost", unix)
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"broker URL must be http://, https:// or unix:PATH, got {base_url!r}")
        if not parts.hostname:
            raise ValueError(f"broker URL has no host: {base_url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.netloc)


def _request_head(origin: _Origin, request: Request, *, chunked: bool = False) -> bytes:
    lines = [f"{request.method} {request.target} HTTP/1.1\r\nHost: {origin.host_header}\r\n"]
    for name, value in request.headers:
        lines.append(f"{name}: {value}\r\n")
    if chunked:
        lines.append("Transfer-Encoding: chunked\r\n\r\n")
    else:
        lines.append(f"Content-Length: {len(request.body)}\r\n\r\n")
    return "".join(lines).encode("latin-1")


def _parse_status(line: bytes) -> int:
    if not line:
        raise _Dropped
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ProtocolError(f"bad status line {line[:80]!r}")
    try:
        return int(parts[1])
    except ValueError as exc:
        raise ProtocolError(f"bad status line {line[:80]!r}") from exc


def _parse_header(line: bytes, headers: dict[str, str]) -> None:
    name, sep, value = line.partition(b":")
    if not sep:
        raise ProtocolError(f"bad header line {line[:80]!r}")
    key = name.strip().lower().decode("latin-1")
    text = value.strip().decode("latin-1")
    # Repeated headers are joined as RFC 9110 allows; none the broker sends repeat meaningfully.
    headers[key] = f"{headers[key]}, {text}" if key in headers else text


def _body_length(method: str, status: int, headers: dict[str, str]) -> int | None:
    """Bytes of body to read; -1 for chunked, None for read-to-close."""
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return 0
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return -1
    length = headers.get("content-length")
    if length is None:
        return None
    try:
        n = int(length)
    except ValueError as exc:
        raise ProtocolError(f"bad Content-Length {length!r}") from exc
    if n < 0:
        raise ProtocolError(f"bad Content-Length {length!r}")
    return n


def _keeps_alive(headers: dict[str, str], length: int | None) -> bool:
    return length is not None and "close" not in headers.get("connection", "").lower()


class HTTPTransport:
    """Sync HTTP/1.1 over one keep-alive TCP connection.

    Not thread-safe: it holds one connection, so use one client (and so one transport) per
    thread. ``timeout`` bounds the connect and every read (seconds).
    """

    def __init__(self, base_url: str, *, timeout: float = 30.0) -> None:
        self._origin = _Origin.parse(base_url)
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._rfile: _Reader | None = None
        self._ssl = ssl.create_default_context() if self._origin.scheme == "https" else None

    def handle_request(self, request: Request) -> Response:
        """Send ``request`` and return the whole response (see the module doc for failures)."""
        head = _request_head(self._origin, request)
        reused = self._sock is not None
        if reused and self._idle_closed():
            self.close()
            reused = False
        try:
            return self._exchange(head, request)
        except (_Dropped, ConnectionError) as exc:
            self.close()
            if not (reused and request.method in _IDEMPOTENT):
                raise BrokerUnavailable(f"connection to the broker dropped: {exc!r}") from exc
        except OSError as exc:  # timeouts and everything else the socket raises
            self.close()
            raise BrokerUnavailable(f"broker unreachable: {exc!r}") from exc
        except BaseException:
            # A protocol error or an interrupt leaves the connection out of step: drop it.
            self.close()
            raise
        # A kept-alive connection died under an idempotent request: replay it once.
        try:
            return self._exchange(head, request)
        except (_Dropped, OSError) as exc:
            self.close()
            raise BrokerUnavailable(f"broker unreachable: {exc!r}") from exc
        except BaseException:
            self.close()
            raise

    def _idle_closed(self) -> bool:
        # An idle keep-alive socket never has anything to read unless the peer closed it.
        assert self._sock is not None
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def _connect(self) -> tuple[socket.socket, _Reader]:
        o = self._origin
        if o.unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self._timeout)
                sock.connect(o.unix)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((o.host, o.port), timeout=self._timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._ssl is not None:
            sock = self._ssl.wrap_socket(sock, server_hostname=o.host)
        self._sock = sock
        self._rfile = _Reader(sock)
        return sock, self._rfile

    def _exchange(self, head: bytes, request: Request) -> Response:
        if self._sock is None or self._rfile is None:
            sock, rfile = self._connect()
        else:
            sock, rfile = self._sock, self._rfile
        body = request.body
        if len(body) <= 65536:
            sock.sendall(head + body if body else head)
        else:
            sock.sendall(head)
            sock.sendall(body)
        status, headers = self._read_head(rfile)
        length = _body_length(request.method, status, headers)
        view = None
        if length is None:
            data = rfile.read_to_eof()
        elif length == -1:
            data = rfile.read_chunked()
        elif request.borrow and status == 200:
            got = rfile.read_borrowed(length)
            data, view = (b"", got) if isinstance(got, memoryview) else (got, None)
        else:
            data = rfile.read_exact(length)
        if not _keeps_alive(headers, length):
            self.close()
        return Response(status, data, headers, view)

    @staticmethod
    def _read_head(rfile: _Reader) -> tuple[int, dict[str, str]]:
        while True:
            status = _parse_status(rfile.readline())
            headers: dict[str, str] = {}
            for _ in range(_MAX_HEADERS):
                line = rfile.readline()
                if line in (b"\r\n", b"\n"):
                    break
                if not line:
                    raise ConnectionResetError("connection closed inside the headers")
                _parse_header(line, headers)
            else:
                raise ProtocolError("too many response headers")
            if 100 <= status < 200:
                continue  # interim answers (100 Continue) precede the real one
            return status, headers

    # --- streamed bodies (admin calls: a guest's export can be larger than memory) --------

    def send_chunked(self, request: Request, chunks: Iterable[bytes]) -> Response:
        """Send ``request`` with ``chunks`` as its body (chunked transfer encoding, so its
        length need not be known) and return the whole response. ``request.body`` is ignored.

        It opens a fresh connection and is never replayed (``chunks`` is consumed once).
        Failures of the connection raise :class:`~guest_agent.errors.BrokerUnavailable`; an
        exception raised by ``chunks`` itself propagates as is, and the connection is
        dropped mid-body so the server sees a truncated request, never a complete one."""
        self.close()
        head = _request_head(self._origin, request, chunked=True)
        try:
            sock, rfile = self._connect()
            sock.sendall(head)
        except OSError as exc:
            self.close()
            raise BrokerUnavailable(f"broker unreachable: {exc!r}") from exc
        try:
            for chunk in chunks:  # an exception from the producer propagates unchanged
                if not chunk:
                    continue
                try:
                    sock.sendall(b"%x\r\n" % len(chunk))
                    sock.sendall(chunk)
                    sock.sendall(b"\r\n")
                except OSError as exc:
                    raise BrokerUnavailable(f"connection to the broker dropped: {exc!r}") from exc
            try:
                sock.sendall(b"0\r\n\r\n")
                status, headers = self._read_head(rfile)
                length = _body_length(request.method, status, headers)
                if length is None:
                    data = rfile.read_to_eof()
                elif length == -1:
                    data = rfile.read_chunked()
                else:
                    data = rfile.read_exact(length)
            except (_Dropped, OSError) as exc:
                raise BrokerUnavailable(f"connection to the broker dropped: {exc!r}") from exc
        except BaseException:
            self.close()
            raise
        if not _keeps_alive(headers, length):
            self.close()
        return Response(status, data, headers)

    def stream(self, request: Request) -> StreamedResponse:
        """Send ``request`` on a fresh connection and return the answer with its body still
        to be read: iterate :meth:`StreamedResponse.iter_bytes`, and close it (it is a
        context manager). The connection belongs to the answer, not to this transport."""
        self.close()
        head = _request_head(self._origin, request)
        try:
            sock, rfile = self._connect()
            sock.sendall(head + bytes(request.body) if request.body else head)
            status, headers = self._read_head(rfile)
        except (_Dropped, OSError) as exc:
            self.close()
            raise BrokerUnavailable(f"broker unreachable: {exc!r}") from exc
        except BaseException:
            self.close()
            raise
        self._sock = self._rfile = None  # handed over to the answer
        length = _body_length(request.method, status, headers)
        return StreamedResponse(status, headers, sock, rfile, length)

    def close(self) -> None:
        """Close the connection; the next request opens a new one."""
        sock, self._sock, self._rfile = self._sock, None, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


class _Reader:
    """A minimal buffered reader over a socket: lines, exact lengths, chunked bodies.

    ``socket.makefile`` would do, but its ``read(n)`` loops in Python through ``readinto``;
    this keeps one bytearray and slices it. Large bodies are received into a second buffer
    kept for the connection's life (as large as the largest body so far): a fresh one per
    response page-faulted every page of it in again, ~0.7 ms per MiB on the project's
    machine, more than receiving it."""

    __slots__ = ("_big", "_buf", "_sock")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._big = bytearray()

    def _fill(self, want: int = 65536) -> bool:
        chunk = self._sock.recv(max(want, 65536))
        if not chunk:
            return False
        self._buf += chunk
        return True

    def readline(self) -> bytes:
        buf = self._buf
        start = 0
        while True:
            i = buf.find(b"\n", start)
            if i >= 0:
                line = bytes(buf[: i + 1])
                del buf[: i + 1]
                return line
            if len(buf) > _MAX_LINE:
                raise ProtocolError("response line too long")
            start = len(buf)
            if not self._fill():
                line = bytes(buf)
                buf.clear()
                return line

    def read_exact(self, n: int) -> bytes:
        data = self.read_borrowed(n)
        return data if type(data) is bytes else bytes(data)

    def read_borrowed(self, n: int) -> bytes | memoryview:
        """``n`` bytes; a large body as a view of the reused buffer, valid until the next read
        (a ``borrow`` request: a fresh 1 MiB ``bytes`` per get_many answer page-faulted ~470
        times, 1.4 ms of system time per answer on the project's machine)."""
        buf = self._buf
        if len(buf) >= n:
            data = bytes(buf[:n])
            del buf[:n]
            return data
        # Large bodies: receive straight into the reused buffer.
        if len(self._big) < n:
            self._big = bytearray(n)
        with memoryview(self._big) as view:
            have = len(buf)
            view[:have] = buf
            buf.clear()
            while have < n:
                got = self._sock.recv_into(view[have:n], n - have)
                if not got:
                    raise ConnectionResetError("connection closed inside the body")
                have += got
        return memoryview(self._big)[:n]

    def read_some(self, n: int) -> bytes:
        """Up to ``n`` bytes (at least one), buffered ones first; ``b""`` at the end of the
        stream."""
        buf = self._buf
        if buf:
            data = bytes(buf[:n])
            del buf[:n]
            return data
        return self._sock.recv(n)

    def iter_exact(self, n: int, size: int, what: str) -> Iterator[bytes]:
        """Exactly ``n`` bytes in pieces of at most ``size``; a stream that ends first raises
        ``ConnectionResetError`` naming ``what`` was cut short."""
        while n:
            piece = self.read_some(min(n, size))
            if not piece:
                raise ConnectionResetError(f"connection closed inside {what}")
            n -= len(piece)
            yield piece

    def read_chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            line = self.readline()
            if not line:
                raise ConnectionResetError("connection closed inside a chunked body")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise ProtocolError(f"bad chunk size line {line[:40]!r}") from exc
            if size == 0:
                while self.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers are ignored
                return b"".join(parts)
            parts.append(self.read_exact(size))
            self.read_exact(2)

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        data = bytes(self._buf)
        self._buf.clear()
        return data


_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class AsyncHTTPTransport:
    """HTTP/1.1 over asyncio streams with a small pool of keep-alive connections.

    Safe to share between the tasks of one event loop: each request takes an idle connection
    (or opens one, up to ``max_connections``) and gives it back after the response.
    """

    def __init__(self, base_url: str, *, timeout: float = 30.0, max_connections: int = 4) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._origin = _Origin.parse(base_url)
        self._timeout = timeout
        self._max = max_connections
        self._idle: list[_Conn] = []
        self._sem: asyncio.Semaphore | None = None
        self._ssl = ssl.create_default_context() if self._origin.scheme == "https" else None

    async def handle_async_request(self, request: Request) -> Response:
        """Send ``request`` on a pooled connection and return the whole response."""
        if self._sem is None:
            self._sem = asyncio.Semaphore(self._max)
        head = _request_head(self._origin, request)
        async with self._sem:
            conn, reused = self._take_idle()
            try:
                async with asyncio.timeout(self._timeout):
                    if conn is None:
                        conn = await self._connect()
                    return await self._exchange(conn, head, request)
            except (_Dropped, ConnectionError) as exc:
                _close(conn)
                if not (reused and request.method in _IDEMPOTENT):
                    raise BrokerUnavailable(f"connection to the broker dropped: {exc!r}") from exc
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                _close(conn)
                raise BrokerUnavailable(f"broker unreachable: {exc!r}") from exc
            except BaseException:
                # A protocol error or a cancellation leaves the connection out of step.
                _close(conn)
                raise
            try:
                async with asyncio.timeout(self._timeout):
                    conn = await self._connect()
                    return await self._exchange(conn, head, request)
            except (_Dropped, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                _close(conn)
                raise BrokerUnavailable(f"broker unreachable: {exc!r}") from exc
            except BaseException:
                _close(conn)
                raise

    def _take_idle(self) -> tuple[_Conn | None, bool]:
        while self._idle:
            conn = self._idle.pop()
            reader, writer = conn
            if reader.at_eof() or writer.is_closing():
                _close(conn)
                continue
            return conn, True
        return None, False

    async def _connect(self) -> _Conn:
        o = self._origin
        if o.unix is not None:
            return await asyncio.open_unix_connection(o.unix, limit=1 << 20)
        reader, writer = await asyncio.open_connection(o.host, o.port, ssl=self._ssl, limit=1 << 20)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    async def _exchange(self, conn: _Conn, head: bytes, request: Request) -> Response:
        reader, writer = conn
        body = request.body
        writer.write(head + body if body and len(body) <= 65536 else head)
        if body and len(body) > 65536:
            writer.write(body)
        await writer.drain()
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    raise _Dropped from exc
                raise
            status = _parse_status(line)
            headers: dict[str, str] = {}
            for _ in range(_MAX_HEADERS):
                line = await reader.readuntil(b"\n")
                if line in (b"\r\n", b"\n"):
                    break
                _parse_header(line, headers)
            else:
                raise ProtocolError("too many response headers")
            if not 100 <= status < 200:
                break
        length = _body_length(request.method, status, headers)
        if length is None:
            data = await reader.read()
        elif length == -1:
            parts: list[bytes] = []
            while True:
                size_line = await reader.readuntil(b"\n")
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError as exc:
                    raise ProtocolError(f"bad chunk size line {size_line[:40]!r}") from exc
                if size == 0:
                    while (await reader.readuntil(b"\n")) not in (b"\r\n", b"\n"):
                        pass
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            data = b"".join(parts)
        else:
            data = await reader.readexactly(length) if length else b""
        if _keeps_alive(headers, length) and len(self._idle) < self._max:
            self._idle.append(conn)
        else:
            _close(conn)
        return Response(status, data, headers)

    async def aclose(self) -> None:
        """Close every idle connection."""
        idle, self._idle = self._idle, []
        for conn in idle:
            _close(conn)
        for _, writer in idle:
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()


def _close(conn: _Conn | None) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            conn[1].close()


Handler = Callable[[Request], "Response | Awaitable[Response]"]


class MockTransport:
    """The in-memory twin of both transports: every request goes to ``handler``.

    ``handler(request)`` returns a :class:`Response` (or, for the async client, may be a
    coroutine function). Raise :class:`~guest_agent.errors.BrokerUnavailable` from it to
    play an unreachable broker.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    def handle_request(self, request: Request) -> Response:
        result = self.handler(request)
        if inspect.isawaitable(result):
            raise TypeError("an async handler needs the async client")
        return result

    async def handle_async_request(self, request: Request) -> Response:
        result = self.handler(request)
        if inspect.isawaitable(result):
            return await result
        return result

    def close(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
