"""HTTP/1.1 answers as the agent's sync and async transports read them (``transport.py``).

::

    rfile = Reader(sock)
    status, headers = read_head(rfile)             # interim 1xx answers skipped
    length = body_length(method, status, headers)  # -1 chunked, None to the close
    body = rfile.read_exact(length)

Only what the broker sends is parsed: a status line, headers, a ``Content-Length`` or chunked
body, or a body to the close. Header names come back lower case, repeated ones joined.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

from guest_agent.errors import ProtocolError

MAX_LINE = 65536
MAX_HEADERS = 100
MAX_HEAD = 4 * MAX_LINE


class Dropped(Exception):
    """The peer closed the connection before a status line arrived."""


def parse_status(line: bytes) -> int:
    if not line:
        raise Dropped
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ProtocolError(f"bad status line {line[:80]!r}")
    try:
        return int(parts[1])
    except ValueError as exc:
        raise ProtocolError(f"bad status line {line[:80]!r}") from exc


def parse_header(line: bytes, headers: dict[str, str]) -> None:
    name, sep, value = line.partition(b":")
    if not sep:
        raise ProtocolError(f"bad header line {line[:80]!r}")
    key = name.strip().lower().decode("latin-1")
    text = value.strip().decode("latin-1")
    # Repeated headers are joined as RFC 9110 allows; none the broker sends repeat meaningfully.
    headers[key] = f"{headers[key]}, {text}" if key in headers else text


def body_length(method: str, status: int, headers: dict[str, str]) -> int | None:
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


def read_head(rfile: Reader) -> tuple[int, dict[str, str]]:
    """The status and headers of the next answer on ``rfile`` (interim 1xx answers skipped).

    The head is cut from the buffer whole and split once: reading it line by line cost
    ~4 µs more per answer (five ``readline`` calls for the broker's four headers)."""
    while True:
        lines = rfile.head_lines()
        status = parse_status(lines[0] if lines else b"")
        if len(lines) > MAX_HEADERS + 1:
            raise ProtocolError("too many response headers")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            parse_header(line, headers)
        if not 100 <= status < 200:
            return status, headers


def keeps_alive(headers: dict[str, str], length: int | None) -> bool:
    return length is not None and "close" not in headers.get("connection", "").lower()


class Reader:
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

    def head_lines(self) -> list[bytes]:
        """The lines of the next head, up to its empty line (CRLF or bare LF endings); ``[]``
        when the stream ends before it starts, ``ConnectionResetError`` inside it."""
        buf = self._buf
        start = 0
        while True:
            crlf = buf.find(b"\n\r\n", start)
            lf = buf.find(b"\n\n", start)
            if crlf >= 0 and (lf < 0 or crlf < lf):
                cut = crlf + 3
            elif lf >= 0:
                cut = lf + 2
            else:
                if len(buf) > MAX_HEAD:
                    raise ProtocolError("response head too long")
                start = max(len(buf) - 2, 0)
                if not self._fill():
                    if buf:
                        raise ConnectionResetError("connection closed inside the headers")
                    return []
                continue
            head = bytes(buf[:cut])
            del buf[:cut]
            lines = head.splitlines()
            lines.pop()  # the empty line that ends the head
            return lines

    def readline(self) -> bytes:
        buf = self._buf
        start = 0
        while True:
            i = buf.find(b"\n", start)
            if i >= 0:
                line = bytes(buf[: i + 1])
                del buf[: i + 1]
                return line
            if len(buf) > MAX_LINE:
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
        if len(buf) == n:  # the usual case: the body is what the last receive left
            data = bytes(buf)
            buf.clear()
            return data
        if len(buf) > n:
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

    def chunk_size(self) -> int:
        """The size of the next chunk of a chunked body (its size line read)."""
        line = self.readline()
        if not line:
            raise ConnectionResetError("connection closed inside a chunked body")
        try:
            return int(line.split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise ProtocolError(f"bad chunk size line {line[:40]!r}") from exc

    def read_chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size = self.chunk_size()
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
