"""An ASGI front door that sends the page routes straight to their endpoints.

::

    app = create_app(settings)
    front = HotRoutes(app)
    uvicorn.run(front, http=page_protocol(front), ...)   # what ``tmem-broker serve`` runs

Every request to a page route (put/get/flush page, flush object, batch) otherwise walks the
whole FastAPI stack: its telemetry check (three ``os.environ`` reads), ServerErrorMiddleware,
the body-limit middlewares, ExceptionMiddleware, AsyncExitStackMiddleware and a scan of the
route list. Profiled in-process that stack cost more than the route itself (a put: ~34 µs, of
which the endpoint and the core ~12 µs; bench/README.md "What we changed"). ``HotRoutes``
matches those five paths by splitting the path once and calls the *same* ASGI endpoints the
app's router serves (``app.state.guest_pages``, a ``guest_pages.GuestPages``); they answer
their own errors through ``errors.error_response``, so the answers are the app's, and times
them in the app's ``tmem_request_duration_seconds`` (as its ``RequestTimer`` middleware would).
Anything else (other paths, other methods, lifespan, WebSockets) goes to the app unchanged.

:func:`corked_protocol` is uvicorn's httptools protocol, but a response head waits for the
write after it, so head and body leave in one send (uvicorn sends them apart; one send instead
of two took a single-page GET from ~5.8k to ~8.1k requests/s on one connection).
``serve`` runs ``page_protocol.page_protocol(front)``, which does the same and also answers
single-page PUT/GET/DELETE and batches without the ASGI cycle (broker/api/page_protocol.py);
those reach ``HotRoutes`` only when that protocol hands them on.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from broker.api.gather import EXTENSION, Gathered, write_gathered
from broker.api.guest_pages import GuestPages


class HotRoutes:
    """Dispatches the page routes of ``app`` (a ``create_app`` FastAPI) without its middleware
    stack; passes every other request to ``app``."""

    def __init__(self, app: Any) -> None:
        self.app: ASGIApp = app
        pages: GuestPages = app.state.guest_pages
        self.pages = pages
        self.page: dict[str, ASGIApp] = {
            "PUT": pages.put_page,
            "GET": pages.get_page,
            "DELETE": pages.flush_page,
        }
        self.batch: ASGIApp = pages.batch
        self.flush_object: ASGIApp = pages.flush_object
        # the requests served here skip the app's RequestTimer: they are timed here instead
        times = app.state.request_times.families
        self.observe_pages = times["guest_pages"].observe
        self.observe_batch = times["batch"].observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path.startswith("/v1/pools/") and not scope.get("root_path"):
                target = self._match(scope["method"], path)
                if target is not None:
                    endpoint, params = target
                    scope["path_params"] = params
                    observe = self.observe_batch if endpoint is self.batch else self.observe_pages
                    start = time.perf_counter()
                    try:
                        await endpoint(scope, receive, send)
                    finally:
                        observe(time.perf_counter() - start)
                    return
        await self.app(scope, receive, send)

    def _match(self, method: str, path: str) -> tuple[ASGIApp, dict[str, str]] | None:
        # "/v1/pools/P/objects/O/pages/I" -> ["", "v1", "pools", P, "objects", O, "pages", I]
        parts = path.split("/")
        n = len(parts)
        if n == 8 and parts[4] == "objects" and parts[6] == "pages":
            endpoint = self.page.get(method)
            if endpoint is not None and parts[3] and parts[5] and parts[7]:
                return endpoint, {"pool_id": parts[3], "oid": parts[5], "index": parts[7]}
        elif n == 5 and parts[4] == "batch" and method == "POST" and parts[3]:
            return self.batch, {"pool_id": parts[3]}
        elif n == 6 and parts[4] == "objects" and method == "DELETE" and parts[3] and parts[5]:
            return self.flush_object, {"pool_id": parts[3], "oid": parts[5]}
        return None


class _CorkedTransport:
    """A transport proxy that sends a response head together with the write after it.

    uvicorn writes a response's head and its body separately: two sends, two TCP segments,
    and a client that wakes for the head alone. The head is held until the next write (the
    body, or the empty write that ends a body-less answer) and both go out in one
    ``writelines``; a held head the app never follows (a HEAD answer) leaves at the end of the
    loop pass.
    """

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | Gathered) -> None:
        held = self._held
        if isinstance(data, Gathered):  # a batch answer's pages, written as they are
            self._held = None
            write_gathered(self._transport, held, data)
            return
        if held is not None:
            self._held = None
            if data:
                self._transport.writelines((held, data))
            else:
                self._transport.write(held)
        elif data[:5] == b"HTTP/":
            self._held = data
            self._loop.call_soon(self.flush)
        elif data:
            self._transport.write(data)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def corked_protocol() -> type[Any]:
    """uvicorn's httptools protocol with a :class:`_CorkedTransport`: a response's head and
    body leave in one send (uvicorn writes them separately), and a body may be a
    :class:`~broker.api.gather.Gathered` (the scope declares the extension)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class CorkedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: Any) -> None:
            corked: Any = _CorkedTransport(transport, asyncio.get_running_loop())
            super().connection_made(corked)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            # the transport writes a Gathered body (broker.api.gather)
            self.scope["extensions"] = {EXTENSION: {}}

    return CorkedHttpToolsProtocol
