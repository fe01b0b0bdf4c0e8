"""Answers sent as the page buffers they are made of (``writev``), not one joined copy.

A ``get_many`` of 256 pages answers 1 MiB. Built as ``bytes`` and handed to uvicorn, that
MiB was copied three times in the broker before the kernel copied it once more: the batch
encoder's join, asyncio's ``writelines`` (a join in Python 3.11), and, when the socket took
only part of it, the rest sliced and appended to the transport's buffer. py-spy put half the
broker's samples of a ``get_many`` loop in that write (bench/perf-history.md, issue #21 b).

The server side declares the ASGI scope extension :data:`EXTENSION`
(``broker.api.front.corked_protocol`` does); an endpoint that sees it may send a
:class:`Gathered` as its ``http.response.body`` (a ``len()`` and a list of buffers: uvicorn
checks only the length against ``Content-Length``), and the transport writes the buffers with
:func:`write_gathered`: ``os.writev`` of the stored pages straight from where the core keeps
them, and only what the socket did not take is copied into asyncio's buffer. Without the
extension (another server, the test client) :func:`gathered_response` sends the joined bytes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from starlette.types import Receive, Scope, Send

EXTENSION = "tmem.gather"
_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") else 16


class Gathered:
    """An answer body as a list of buffers, written with ``writev`` (see the module doc)."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: Sequence[bytes | memoryview], size: int) -> None:
        self.parts = parts
        self.size = size

    def __len__(self) -> int:
        return self.size


def write_gathered(transport: Any, head: bytes | None, body: Gathered) -> None:
    """Write ``head`` then ``body``'s buffers to ``transport`` (an asyncio transport).

    When nothing is queued in the transport, the buffers go to its socket with ``os.writev``
    (at most IOV_MAX at a time) and what the socket did not take goes to the transport, which
    sends it when the socket is writable again; otherwise (queued bytes, TLS, any error) all
    of it goes through the transport, which then also reports the error."""
    parts: list[bytes | memoryview] = [head, *body.parts] if head else list(body.parts)
    sock = transport.get_extra_info("socket")
    if (
        sock is None
        or transport.get_extra_info("sslcontext") is not None
        or transport.get_write_buffer_size()
        or transport.is_closing()
    ):
        transport.writelines(parts)
        return
    fd = sock.fileno()
    done = 0  # parts written whole
    while done < len(parts):
        group = parts[done : done + _IOV_MAX]
        try:
            sent = os.writev(fd, group)
        except OSError:  # full (BlockingIOError) or failed: the transport takes the rest
            break
        for part in group:
            if sent < len(part):
                break
            sent -= len(part)
            done += 1
        else:
            continue
        if sent:  # the socket took the start of this part
            parts[done] = memoryview(parts[done])[sent:]
        break
    if done < len(parts):
        transport.writelines(parts[done:])


class GatheredResponse:
    """A 200 answer of ``parts`` (``size`` bytes in all), called as a Starlette response is:
    sent as a :class:`Gathered` where the server declared :data:`EXTENSION`, else as one
    joined body. ``status_code`` and ``raw_headers`` are a Starlette ``Response``'s (what
    ``page_protocol`` writes when it answers a batch itself)."""

    __slots__ = ("parts", "raw_headers", "size")

    status_code = 200

    def __init__(self, parts: list[bytes | memoryview], size: int, media_type: str) -> None:
        self.parts = parts
        self.size = size
        self.raw_headers = [
            (b"content-length", b"%d" % size),
            (b"content-type", media_type.encode()),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        gather = EXTENSION in scope.get("extensions", ())
        body: Any = Gathered(self.parts, self.size) if gather else b"".join(self.parts)
        await send({"type": "http.response.body", "body": body})
