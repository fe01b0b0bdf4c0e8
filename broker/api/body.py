"""Request bodies and their size limits: the one place a body is refused with 413.

::

    body = await read_body(scope, receive, limit)    # BodyTooLarge (413) past ``limit``

The page routes read their bodies with :func:`read_body` (a page: 64 KiB; a batch:
``max_batch_bytes``); :class:`JsonBodyLimit` reads every other body through it with
``max_json_bytes`` before the app sees the request. The export import stream is checked record
by record instead (``migration.py``), bounded by the capacity.

Starlette's own ``RequestBodyLimitMiddleware`` is not used: it answers plain text (not the
``{"error": ...}`` shape), and it refuses a request by its ``Content-Length`` even when the route
answered before reading the body (a 401 would become a 413).
"""

from __future__ import annotations

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.api.errors import BodyTooLarge, error_response


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refused with :class:`BodyTooLarge` as soon as its
    ``Content-Length`` or the bytes received exceed ``limit``.

    Raises Starlette's ``ClientDisconnect`` when the client goes away mid-body.
    """
    declared = _content_length(scope)
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"body of {declared} bytes; at most {limit} are allowed here")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _takes_json(scope: Scope) -> bool:
    """Whether the request's body is JSON (limited here), not pages (limited by their routes)."""
    if scope["method"] in ("GET", "HEAD", "DELETE"):
        return False
    path: str = scope["path"]
    return not ("/pages/" in path or path.endswith("/batch") or path == "/v1/guests/import")


class JsonBodyLimit:
    """ASGI middleware: reads a JSON body whole with :func:`read_body` (``limit`` bytes at most)
    and hands it to the app in one piece; a larger one is answered 413 before the app runs."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _takes_json(scope):
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(scope, receive, self.limit)
        except BodyTooLarge as exc:
            await error_response(exc)(scope, receive, send)
            return
        except ClientDisconnect:
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
