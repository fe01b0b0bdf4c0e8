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
:class:`~guest_agent.errors.BrokerUnavailable`. Before a POST goes out on a kept-alive
connection, :class:`HTTPTransport` checks that the server did not close it while idle (a
readable idle socket is a closed one); when a reused connection drops before the status line
arrives, idempotent requests (GET, PUT, DELETE, HEAD) are retried once on a fresh connection
(the sync transport relies on that for them instead of a ``select`` per request). POST is
never replayed.

The sync transport's hot path (the agent's page calls): each header list's encoded lines are
kept (a client sends a few lists again and again), a request leaves in one ``sendall``, and
an answer's head is cut from the buffer and split once (``http11.read_head``). Together about
4 µs less client CPU per single-page call than encoding and reading line by line.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import select
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

from guest_agent.errors import BrokerUnavailable, ProtocolError
from guest_agent.http11 import (
    MAX_HEADERS,
    Dropped,
    Reader,
    body_length,
    keeps_alive,
    parse_header,
    parse_status,
    read_head,
)
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
    return (
        _head_line(request)
        + _header_block(origin, request.headers)
        + _length_line(request, chunked)
    )


def _head_line(request: Request) -> bytes:
    return f"{request.method} {request.target} HTTP/1.1\r\n".encode("latin-1")


def _header_block(origin: _Origin, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"Host: {origin.host_header}\r\n"]
    for name, value in headers:
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("latin-1")


def _length_line(request: Request, chunked: bool = False) -> bytes:
    if chunked:
        return b"Transfer-Encoding: chunked\r\n\r\n"
    return b"Content-Length: %d\r\n\r\n" % len(request.body)


class HTTPTransport:
    """Sync HTTP/1.1 over one keep-alive TCP connection.

    Not thread-safe: it holds one connection, so use one client (and so one transport) per
    thread. ``timeout`` bounds the connect and every read (seconds).
    """

    def __init__(self, base_url: str, *, timeout: float = 30.0) -> None:
        self._origin = _Origin.parse(base_url)
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._rfile: Reader | None = None
        self._ssl = ssl.create_default_context() if self._origin.scheme == "https" else None
        # the encoded Host and header lines of each header list a client sends (a client keeps
        # a few lists for all its requests), by identity; the list is kept so its id stays its
        self._blocks: dict[int, tuple[list[tuple[str, str]], bytes]] = {}

    def _head(self, request: Request) -> bytes:
        headers = request.headers
        known = self._blocks.get(id(headers))
        if known is None or known[0] is not headers:
            known = (headers, _header_block(self._origin, headers))
            if len(self._blocks) < 64:  # one-off lists are encoded each time
                self._blocks[id(headers)] = known
        return _head_line(request) + known[1] + _length_line(request)

    def handle_request(self, request: Request) -> Response:
        """Send ``request`` and return the whole response (see the module doc for failures)."""
        head = self._head(request)
        reused = self._sock is not None
        # A POST must not go out on a connection the server already closed: check first. An
        # idempotent request is replayed instead when that happens (below), which saves a
        # select() per request on the hot path.
        if reused and request.method not in _IDEMPOTENT and self._idle_closed():
            self.close()
            reused = False
        try:
            return self._exchange(head, request)
        except (Dropped, ConnectionError) as exc:
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
        except (Dropped, OSError) as exc:
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

    def _connect(self) -> tuple[socket.socket, Reader]:
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
        self._rfile = Reader(sock)
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
        status, headers = read_head(rfile)
        length = body_length(request.method, status, headers)
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
        if not keeps_alive(headers, length):
            self.close()
        return Response(status, data, headers, view)

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
                status, headers = read_head(rfile)
                length = body_length(request.method, status, headers)
                if length is None:
                    data = rfile.read_to_eof()
                elif length == -1:
                    data = rfile.read_chunked()
                else:
                    data = rfile.read_exact(length)
            except (Dropped, OSError) as exc:
                raise BrokerUnavailable(f"connection to the broker dropped: {exc!r}") from exc
        except BaseException:
            self.close()
            raise
        if not keeps_alive(headers, length):
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
            status, headers = read_head(rfile)
        except (Dropped, OSError) as exc:
            self.close()
            raise BrokerUnavailable(f"broker unreachable: {exc!r}") from exc
        except BaseException:
            self.close()
            raise
        self._sock = self._rfile = None  # handed over to the answer
        return StreamedResponse(status, headers, sock, rfile, request.method)

    def close(self) -> None:
        """Close the connection; the next request opens a new one."""
        sock, self._sock, self._rfile = self._sock, None, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


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
            except (Dropped, ConnectionError) as exc:
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
            except (Dropped, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
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
                    raise Dropped from exc
                raise
            status = parse_status(line)
            headers: dict[str, str] = {}
            for _ in range(MAX_HEADERS):
                line = await reader.readuntil(b"\n")
                if line in (b"\r\n", b"\n"):
                    break
                parse_header(line, headers)
            else:
                raise ProtocolError("too many response headers")
            if not 100 <= status < 200:
                break
        length = body_length(request.method, status, headers)
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
        if keeps_alive(headers, length) and len(self._idle) < self._max:
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
