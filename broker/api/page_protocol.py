"""The HTTP protocol ``tmem-broker serve`` runs: uvicorn's, answering page requests itself.

::

    front = HotRoutes(create_app(settings))
    uvicorn.run(front, http=page_protocol(front), ...)   # what ``tmem-broker serve`` runs

A single-page PUT, GET or DELETE through uvicorn costs an ASGI scope, a task, ``receive``
and ``send`` calls and a Starlette ``Response`` rendered message by message: about 100 µs of
broker CPU per request on the project's machine, for a core call of a few µs.
:class:`PageProtocol` (uvicorn's httptools protocol with :class:`~broker.api.front._CorkedTransport`,
as before) recognises such a request when its headers are complete and answers it in
``on_message_complete``, inside the ``data_received`` call that completed it:
``GuestPages.page_now`` (the routes' own checks, core calls and error answers) and one
``transport.write`` of the head and the body. Nothing of the app's contract changes: the
answer's bytes are those uvicorn would write for the same ``Response`` (its default ``date``
and ``server`` headers, ``connection: close`` when the request asked for it or was HTTP/1.0),
the request is timed in ``tmem_request_duration_seconds`` as ``HotRoutes`` times it, and
uvicorn's keep-alive timer and request count move as after any answer.

A batch (``POST /v1/pools/{id}/batch``) is answered the same way: ``GuestPages.batch_now`` (the
batch route's checks, decode and core call) and, for an answer with pages in it, one
``writev`` of the head and the stored pages (``gather.write_gathered``); a batch of gets costs
one ``read``, the core's gets and one ``writev``. Through the ASGI cycle a 256-page
``get_many`` cost ~0.1 ms more broker CPU (0.55-0.75 ms against 0.45-0.60 ms per batch,
``/proc``, load 3-8), about a sixth of it; a body over ``max_batch_bytes`` keeps the route's
413. Batches are timed in the ``batch`` family, as ``HotRoutes`` times them.

Everything else takes uvicorn's path unchanged, which is also the fallback whenever the
answer could differ or need to wait: another method or path, a query string or an escaped
path, a body that is chunked, over ``PUT_BODY_LIMIT`` or on a GET/DELETE, ``Expect:
100-continue``, an upgrade, an ASGI answer still in flight on the connection (pipelined
requests stay in order), a broker not yet reloaded, in a cluster or with moved guests, the
access log on, or a concurrency limit set. A request whose core call recorded something in a
durable journal is answered once the journal's barrier returns, from a task that stands in
for uvicorn's request cycle meanwhile (requests behind it wait in uvicorn's pipeline).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from broker.api.auth import bearer_value
from broker.api.errors import HANDLED, error_response
from broker.api.front import _CorkedTransport
from broker.api.gather import EXTENSION, Gathered, GatheredResponse, write_gathered
from broker.api.guest_pages import PUT_BODY_LIMIT

if TYPE_CHECKING:
    from broker.api.front import HotRoutes
    from broker.api.service import BrokerService

log = logging.getLogger("uvicorn.error")

_PREFIX = b"/v1/pools/"
_CLOSE = b"connection: close\r\n"
# uvicorn's answer when the app raised (``RequestResponseCycle.send_500_response``)
_SERVER_ERROR = (
    500,
    [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"21"),
        (b"connection", b"close"),
    ],
    b"Internal Server Error",
)
_Answer = tuple[int, list[tuple[bytes, bytes]], "bytes | memoryview | Gathered"]
_Page = tuple["BrokerService", str, tuple[str, str, str], "str | None", bool]


def _target(method: bytes, url: bytes) -> tuple[str, tuple[str, str, str]] | None:
    """``(method, (pool, oid, index))`` of a single-page request, ``("POST", (pool, "", ""))``
    of a batch, or None."""
    if method not in (b"GET", b"PUT", b"DELETE", b"POST") or not url.startswith(_PREFIX):
        return None
    if not url.isascii() or b"%" in url or b"?" in url or b"#" in url:
        return None
    # "/v1/pools/P/objects/O/pages/I" -> ["", "v1", "pools", P, "objects", O, "pages", I]
    # "/v1/pools/P/batch" -> ["", "v1", "pools", P, "batch"]
    parts = url.decode("ascii").split("/")
    if method == b"POST":
        if len(parts) != 5 or parts[4] != "batch" or not parts[3]:
            return None
        return "POST", (parts[3], "", "")
    if len(parts) != 8 or parts[4] != "objects" or parts[6] != "pages":
        return None
    if not (parts[3] and parts[5] and parts[7]):
        return None
    return method.decode("ascii"), (parts[3], parts[5], parts[7])


class _Waiting:
    """Stands for uvicorn's request cycle while an answer waits for the journal's barrier:
    the protocol's ``connection_lost`` and ``shutdown`` set what they would on a cycle."""

    __slots__ = ("disconnected", "keep_alive", "message_event", "response_complete")

    def __init__(self, keep_alive: bool) -> None:
        self.disconnected = False
        self.keep_alive = keep_alive
        self.message_event = asyncio.Event()
        self.response_complete = False


def page_protocol(front: HotRoutes) -> type[Any]:
    """uvicorn's httptools protocol answering ``front``'s single-page and batch routes itself
    (see the module doc); a response's head and body leave in one send on every path."""
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

    pages = front.pages
    observe_pages = front.observe_pages
    observe_batch = front.observe_batch
    # uvicorn's default headers (date, server) as one block, kept while its list stays the
    # same (with guest_pages._decimal's cached length: a get fed in-process took 9.3-9.8 ->
    # 8.7-9.6 µs of broker CPU)
    encoded: list[Any] = [None, b""]

    class PageProtocol(HttpToolsProtocol):
        _page: _Page | None = None
        _body: list[bytes] | None = None
        # uvicorn cancels its keep-alive timer when data arrives and makes a new one after
        # every answer (a TimerHandle and a heap push each: ~15 % of a single-page request
        # here). One timer stays armed instead; it checks when the connection went idle.
        _idle_since: float | None = None
        _idle_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            self._corked = _CorkedTransport(transport, asyncio.get_running_loop())
            corked: Any = self._corked  # a transport in all but name
            super().connection_made(corked)

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None

        def _unset_keepalive_if_required(self) -> None:
            self._idle_since = None  # a request is arriving: not idle

        def on_response_complete(self) -> None:
            # uvicorn's, but for the keep-alive timer
            self.server_state.total_requests += 1
            if self.transport.is_closing():
                return
            self._idle_since = None
            self.flow.resume_reading()
            if self.pipeline:
                cycle, app = self.pipeline.pop()
                self._start_asgi_task(cycle, app)
                return
            self._idle_since = self.loop.time()
            if self._idle_timer is None:
                self._idle_timer = self.loop.call_at(
                    self._idle_since + self.timeout_keep_alive, self._idle_check
                )

        def _idle_check(self) -> None:
            self._idle_timer = None
            since = self._idle_since
            if since is None or self.transport.is_closing():
                return  # busy: the next answer arms it again
            due = since + self.timeout_keep_alive
            if self.loop.time() >= due:
                self.timeout_keep_alive_handler()
            else:
                self._idle_timer = self.loop.call_at(due, self._idle_check)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            # the corked transport writes a Gathered body (broker.api.gather): batch answers
            self.scope["extensions"] = {EXTENSION: {}}

        def on_headers_complete(self) -> None:
            page = self._page_request()
            if page is None:
                self._page = None
                super().on_headers_complete()
            else:
                self._page = page
                self._body = []

        def _page_request(self) -> _Page | None:
            parser = self.parser
            cycle = self.cycle
            if (
                (cycle is not None and not cycle.response_complete)
                or self.pipeline
                or self.expect_100_continue
                or self.access_log
                or self.root_path
                or self.limit_concurrency is not None
                or parser.should_upgrade()
            ):
                return None
            target = _target(parser.get_method(), self.url)
            if target is None:
                return None
            service = pages.answers_now()
            if service is None:
                return None
            method, params = target
            length = b"0"
            authorization: bytes | None = None
            for name, value in self.headers:
                if name == b"content-length":
                    length = value
                elif name == b"authorization":
                    if authorization is None:  # the first one counts, as in bearer_token
                        authorization = value
                elif name == b"transfer-encoding":
                    return None
            if not length.isdigit():
                return None
            size = int(length)
            if method == "POST":  # a batch: past its limit, the route's 413 (after its 401)
                if size > service.settings.max_batch_bytes:
                    return None
            elif size > (PUT_BODY_LIMIT if method == "PUT" else 0):
                return None
            version = parser.get_http_version()
            keep_alive = version != "1.0" and parser.should_keep_alive()
            return service, method, params, bearer_value(authorization), keep_alive

        def on_body(self, body: bytes) -> None:
            chunks = self._body
            if self._page is None or chunks is None:
                super().on_body(body)
            else:
                chunks.append(body)

        def on_message_complete(self) -> None:
            page = self._page
            if page is None:
                super().on_message_complete()
                return
            self._page = None
            chunks, self._body = self._body or (), None
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            service, method, params, token, keep_alive = page
            observe = observe_pages
            start = time.perf_counter()
            answer: _Answer
            try:
                if method == "POST":
                    observe = observe_batch
                    batch = pages.batch_now(service, token, params[0], body)
                    if isinstance(batch, GatheredResponse):
                        answer = (200, batch.raw_headers, Gathered(batch.parts, batch.size))
                    else:
                        answer = (batch.status_code, batch.raw_headers, batch.body)
                else:
                    response = pages.page_now(service, method, token, params, body)
                    answer = (response.status_code, response.raw_headers, response.body)
            except Exception as exc:  # a bug: uvicorn's answer to an app that raised
                log.error("Exception in ASGI application\n", exc_info=exc)
                answer = _SERVER_ERROR
            if service.journal.pending:
                self._wait_then_answer(service, answer, keep_alive, start, observe)
                return
            self._send(answer, keep_alive)
            observe(time.perf_counter() - start)
            self.on_response_complete()

        def _send(self, answer: _Answer, keep_alive: bool) -> None:
            status, headers, body = answer
            content: list[bytes | memoryview] = [STATUS_LINE[status]]
            defaults = self.server_state.default_headers
            if defaults is not encoded[0]:  # uvicorn makes a new list each second (its date)
                lines = [b"%s: %s\r\n" % (name, value) for name, value in defaults]
                encoded[:] = [defaults, b"".join(lines)]
            content.append(encoded[1])
            close = False
            for name, value in headers:
                content += (name, b": ", value, b"\r\n")
                if name == b"connection" and b"close" in value.lower():
                    close = True
            if not keep_alive and not close:
                content.append(_CLOSE)
            self._corked.flush()  # a head held for an earlier HEAD answer goes first
            transport = self._corked._transport
            if isinstance(body, Gathered):  # a batch's pages: writev from where they are kept
                content.append(b"\r\n")
                write_gathered(transport, b"".join(content), body)
            else:
                content += (b"\r\n", body)
                transport.write(b"".join(content))
            if close or not keep_alive:
                transport.close()

        def _wait_then_answer(
            self,
            service: BrokerService,
            answer: _Answer,
            keep_alive: bool,
            start: float,
            observe: Callable[[float], None],
        ) -> None:
            waiting = _Waiting(keep_alive)
            self.cycle = waiting  # type: ignore[assignment]  # what the protocol reads of a cycle

            async def wait_then_answer() -> None:
                final = answer
                try:
                    await service.journal.barrier()
                except HANDLED as exc:
                    response = error_response(exc)
                    final = (response.status_code, response.raw_headers, response.body)
                except BaseException as exc:
                    # never the answer the barrier did not confirm: uvicorn's 500, as for an
                    # ASGI task that raised or was cancelled
                    log.error("Exception in ASGI application\n", exc_info=exc)
                    final = _SERVER_ERROR
                    if not isinstance(exc, Exception):
                        self._finish(waiting, final, start, observe)
                        raise
                self._finish(waiting, final, start, observe)

            task = self.loop.create_task(wait_then_answer())
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)

        def _finish(
            self,
            waiting: _Waiting,
            answer: _Answer,
            start: float,
            observe: Callable[[float], None],
        ) -> None:
            if not waiting.disconnected:
                self._send(answer, waiting.keep_alive)
            waiting.response_complete = True
            observe(time.perf_counter() - start)
            self.on_response_complete()

    return PageProtocol
