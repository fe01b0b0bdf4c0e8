"""An HTTP answer whose body is read piece by piece (``HTTPTransport.stream``): a guest's
export can be larger than memory. Kept apart from :mod:`guest_agent.transport`, which
re-exports it."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

from guest_agent.errors import BrokerUnavailable
from guest_agent.http11 import Reader, body_length


class StreamedResponse:
    """An answer whose body is read piece by piece (:meth:`HTTPTransport.stream`).

    ::

        with transport.stream(Request("GET", "/v1/guests/1/export", b"", headers)) as answer:
            if answer.status != 200:
                ...  # answer.read() is the (small) error body
            for piece in answer.iter_bytes():
                ...

    Connection failures while reading raise :class:`~guest_agent.errors.BrokerUnavailable`.
    """

    def __init__(
        self,
        status: int,
        headers: dict[str, str],
        sock: socket.socket,
        rfile: Reader,
        method: str,
    ) -> None:
        self.status = status
        self.headers = headers
        self._sock: socket.socket | None = sock
        self._rfile = rfile
        self._length = body_length(method, status, headers)

    def iter_bytes(self, size: int = 1 << 20) -> Iterator[bytes]:
        """The body in pieces of at most ``size`` bytes; the connection closes at its end."""
        rfile = self._rfile
        try:
            if self._length == -1:
                while True:
                    left = rfile.chunk_size()
                    if left == 0:
                        break
                    yield from rfile.iter_exact(left, size, "a chunk")
                    rfile.read_exact(2)
            elif self._length is None:
                while piece := rfile.read_some(size):
                    yield piece
            else:
                yield from rfile.iter_exact(self._length, size, "the body")
        except OSError as exc:
            raise BrokerUnavailable(f"connection to the broker dropped: {exc!r}") from exc
        finally:
            self.close()

    def read(self) -> bytes:
        """The whole (remaining) body."""
        return b"".join(self.iter_bytes())

    def close(self) -> None:
        """Drop the connection (a body not read to its end cannot be reused)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> StreamedResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
