"""Guest pages: the hot path (single-page put/get/flush, object flush and the binary batch).

These are plain ASGI endpoints inside the FastAPI app (FastAPI's per-request machinery costs
about three times a plain route on this machine; see docs in api-v1 and reference.md), and
``front.HotRoutes`` calls the same endpoints without the app's middleware stack. Each does: one
token hash and dict lookup (``auth``), a strict decimal parse of the path, a bounded body read
(``body.read_body``), one core call, and the journal barrier when the call recorded something.
Page bytes stay raw. The shell's errors are answered by ``errors.error_response`` here, as the
app's exception handler answers them for every other route. :meth:`GuestPages.page_now` and
:meth:`GuestPages.batch_now` are the single-page and batch routes without ASGI, for
``page_protocol.PageProtocol``: the same helpers (``_charge``, ``_page_handle``, ``_store``,
``_fetch``, ``_apply_batch``) in the same order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from broker.api.auth import bearer_token
from broker.api.body import read_body
from broker.api.errors import HANDLED, MISS, NOT_STORED, BadBatch, error_response
from broker.api.gather import GatheredResponse
from broker.api.service import BrokerService, ServiceBox
from broker.cluster.errors import Fenced
from broker.cluster.routing import fenced_redirect, guest_of
from broker.core.errors import BadHandle, BadPageSize
from schemas.batch import (
    BATCH_CONTENT_TYPE,
    MAX_INDEX,
    MAX_OID,
    PAGE_SIZE,
    BatchError,
    decode_request,
    result_parts,
)

# A put whose body is not one page is a 400 (bad_page_size) when it is small enough to be a
# plausible mistake (a page of another size); anything bigger is a 413 before it is read.
PUT_BODY_LIMIT = 64 << 10
_OCTET = "application/octet-stream"

_NO_CONTENT = Response(status_code=204)

PAGE_PATH = "/v1/pools/{pool_id}/objects/{oid}/pages/{index}"
OBJECT_PATH = "/v1/pools/{pool_id}/objects/{oid}"
BATCH_PATH = "/v1/pools/{pool_id}/batch"

Handler = Callable[[Scope, Receive], Awaitable[Response | GatheredResponse]]


_DIGITS: dict[int, int] = {}  # the decimal length of each limit (str() of MAX_OID is 58 digits)


def _decimal(text: str, limit: int, what: str) -> int:
    digits = _DIGITS.get(limit)
    if digits is None:
        digits = _DIGITS[limit] = len(str(limit))
    # (the limit's length looked up, not computed: a page's three numbers 1.6 -> 1.1 µs)
    if not (0 < len(text) <= digits and text.isascii() and text.isdigit()):
        raise BadHandle(f"{what} must be a decimal integer 0..{limit}")
    value = int(text)
    if value > limit:
        raise BadHandle(f"{what} must be a decimal integer 0..{limit}")
    return value


class PageEndpoint:
    """One hot route as a plain ASGI app: runs ``handler(scope, receive)`` and sends its answer;
    an error of :data:`~broker.api.errors.HANDLED` becomes its answer (``error_response``)."""

    __slots__ = ("box", "handler")

    def __init__(self, handler: Handler, box: ServiceBox) -> None:
        self.handler = handler
        self.box = box

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await self.handler(scope, receive)
        except Fenced as exc:
            # another broker took the guest (a higher epoch): a redirect there, never a 5xx
            response = error_response(await fenced_redirect(self.box.service, exc, scope))
        except HANDLED as exc:
            response = error_response(exc)
        await response(scope, receive, send)


class GuestPages:
    """The hot routes' endpoints, bound to ``box`` (filled by the lifespan).

    ``put_page``, ``get_page``, ``flush_page``, ``flush_object`` and ``batch`` are ASGI apps
    (they read ``scope["path_params"]``); :meth:`routes` mounts them in the app.
    """

    def __init__(self, box: ServiceBox) -> None:
        self.box = box
        self.put_page = PageEndpoint(self._put_page, box)
        self.get_page = PageEndpoint(self._get_page, box)
        self.flush_page = PageEndpoint(self._flush_page, box)
        self.flush_object = PageEndpoint(self._flush_object, box)
        self.batch = PageEndpoint(self._batch, box)

    def routes(self) -> list[Route]:
        """The Starlette routes of the endpoints (the app's router serves them)."""
        return [
            Route(PAGE_PATH, self.put_page, methods=["PUT"], name="put_page"),
            Route(PAGE_PATH, self.get_page, methods=["GET"], name="get_page"),
            Route(PAGE_PATH, self.flush_page, methods=["DELETE"], name="flush_page"),
            Route(OBJECT_PATH, self.flush_object, methods=["DELETE"], name="flush_object"),
            Route(BATCH_PATH, self.batch, methods=["POST"], name="batch"),
        ]

    async def _begin(self, scope: Scope, pages: int = 0) -> tuple[BrokerService, int, int]:
        """Authenticate the guest, charge its rate limits (one request and ``pages`` pages)
        and parse the pool id: the common start of every route."""
        service = self.box.service
        assert service is not None  # routes run only after the lifespan started
        if not service.ready.is_set():
            await service.ready.wait()  # the journal is still being reloaded
        if service.cluster is None and not service.moved:
            guest_id = service.tokens.guest(bearer_token(scope))
        else:
            guest_id = await guest_of(service, scope)  # NotHome: a 307 to the guest's home
        pool_id = _charge(service, guest_id, scope["path_params"]["pool_id"], pages)
        return service, guest_id, pool_id

    @staticmethod
    def _handle(scope: Scope) -> tuple[int, int]:
        params = scope["path_params"]
        return _page_handle(params["oid"], params["index"])

    # --- the single-page routes without ASGI (``page_protocol.PageProtocol``) ----------------

    def answers_now(self) -> BrokerService | None:
        """The service when a single-page request can be answered by :meth:`page_now` (a
        single-host broker whose journal is reloaded), else ``None``: the request takes the
        ASGI path, which waits for the reload and follows cluster redirects."""
        service = self.box.service
        if (
            service is None
            or service.cluster is not None
            or service.moved
            or not service.ready.is_set()
        ):
            return None
        return service

    def page_now(
        self,
        service: BrokerService,
        method: str,
        token: str | None,
        params: tuple[str, str, str],
        body: bytes,
    ) -> Response:
        """A single-page PUT, GET or DELETE answered synchronously: the same checks in the
        same order as the ASGI routes below, errors answered by ``error_response``. The
        caller awaits ``service.journal.barrier()`` before sending when the journal is
        ``pending`` (as the routes do), and reads ``body`` whole only when its
        ``Content-Length`` is at most :data:`PUT_BODY_LIMIT` (the 413 stays the routes')."""
        pool_text, oid_text, index_text = params
        try:
            guest_id = service.tokens.guest(token)
            if method == "DELETE":
                pool_id = _charge(service, guest_id, pool_text, 0)
                oid, index = _page_handle(oid_text, index_text)
                service.core.flush_page(guest_id, pool_id, oid, index)
                return _NO_CONTENT
            pool_id = _charge(service, guest_id, pool_text, 1)
            oid, index = _page_handle(oid_text, index_text)
            if method == "PUT":
                return _store(service, guest_id, pool_id, oid, index, body)
            return _fetch(service, guest_id, pool_id, oid, index)
        except HANDLED as exc:
            return error_response(exc)

    def batch_now(
        self, service: BrokerService, token: str | None, pool_text: str, body: bytes
    ) -> Response | GatheredResponse:
        """A batch answered synchronously (``page_protocol.PageProtocol``): the batch route's
        checks in its order, errors answered by ``error_response``. As for :meth:`page_now`,
        the caller awaits the journal's barrier when it is ``pending``, and passes ``body``
        whole only when its ``Content-Length`` is at most ``max_batch_bytes``."""
        try:
            guest_id = service.tokens.guest(token)
            pool_id = _charge(service, guest_id, pool_text, 0)
            return _apply_batch(service, guest_id, pool_id, body)
        except HANDLED as exc:
            return error_response(exc)

    # --- the ASGI routes ------------------------------------------------------------------

    async def _put_page(self, scope: Scope, receive: Receive) -> Response:
        service, guest_id, pool_id = await self._begin(scope, 1)
        oid, index = self._handle(scope)
        body = await read_body(scope, receive, PUT_BODY_LIMIT)
        response = _store(service, guest_id, pool_id, oid, index, body)
        journal = service.journal
        if journal.pending:
            await journal.barrier()
        return response

    async def _get_page(self, scope: Scope, receive: Receive) -> Response:
        service, guest_id, pool_id = await self._begin(scope, 1)
        oid, index = self._handle(scope)
        response = _fetch(service, guest_id, pool_id, oid, index)
        journal = service.journal
        if journal.pending:  # an exclusive get removed a persistent page
            await journal.barrier()
        return response

    async def _flush_page(self, scope: Scope, receive: Receive) -> Response:
        service, guest_id, pool_id = await self._begin(scope)
        oid, index = self._handle(scope)
        service.core.flush_page(guest_id, pool_id, oid, index)
        if service.journal.pending:
            await service.journal.barrier()
        return _NO_CONTENT

    async def _flush_object(self, scope: Scope, receive: Receive) -> Response:
        service, guest_id, pool_id = await self._begin(scope)
        oid = _decimal(scope["path_params"]["oid"], MAX_OID, "oid")
        service.core.flush_object(guest_id, pool_id, oid)
        if service.journal.pending:
            await service.journal.barrier()
        return _NO_CONTENT

    async def _batch(self, scope: Scope, receive: Receive) -> Response | GatheredResponse:
        service, guest_id, pool_id = await self._begin(scope)
        body = await read_body(scope, receive, service.settings.max_batch_bytes)
        response = _apply_batch(service, guest_id, pool_id, body)
        if service.journal.pending:
            await service.journal.barrier()
        return response


def _charge(service: BrokerService, guest_id: int, pool_text: str, pages: int) -> int:
    """Charge the guest's rate limits (one request, ``pages`` pages); the parsed pool id."""
    if service.limits.enabled:
        service.limits.charge(guest_id, pages=pages)
    return _decimal(pool_text, 0x7FFFFFFF, "pool_id")


def _apply_batch(
    service: BrokerService, guest_id: int, pool_id: int, body: bytes
) -> Response | GatheredResponse:
    """Decode a batch body, charge its pages, apply it to the core: the answer (sent once the
    journal's barrier returned, when it is ``pending``)."""
    try:
        ops = decode_request(body, service.settings.max_batch_ops)
    except BatchError as exc:
        raise BadBatch(str(exc)) from exc
    if service.limits.enabled:
        service.limits.charge(guest_id, requests=0, pages=len(ops))
    results = service.core.batch(guest_id, pool_id, ops)
    parts, size = result_parts(results)
    if size > len(results):  # pages in it: sent as they are stored (broker.api.gather)
        return GatheredResponse(parts, size, BATCH_CONTENT_TYPE)
    return Response(b"".join(parts), media_type=BATCH_CONTENT_TYPE)


def _page_handle(oid_text: str, index_text: str) -> tuple[int, int]:
    return _decimal(oid_text, MAX_OID, "oid"), _decimal(index_text, MAX_INDEX, "index")


def _store(
    service: BrokerService, guest_id: int, pool_id: int, oid: int, index: int, body: bytes
) -> Response:
    if len(body) != PAGE_SIZE:
        raise BadPageSize(f"a page is exactly {PAGE_SIZE} bytes, not {len(body)}")
    status = service.core.put(guest_id, pool_id, oid, index, body)
    if status == 0:
        return _NO_CONTENT
    return Response(NOT_STORED[status], status_code=409, media_type="application/json")


class PageResponse(Response):
    """``Response(page, media_type="application/octet-stream")`` without Starlette's header
    building (a fifth of the protocol's own time for a get): the same status and headers."""

    media_type = _OCTET

    def __init__(self, page: bytes) -> None:
        self.status_code = 200
        self.body = page
        self.background = None
        self.raw_headers = [(b"content-length", b"%d" % len(page)), _OCTET_HEADER]


_OCTET_HEADER = (b"content-type", _OCTET.encode())


def _fetch(service: BrokerService, guest_id: int, pool_id: int, oid: int, index: int) -> Response:
    page = service.core.get(guest_id, pool_id, oid, index)
    if page is None:
        return MISS
    return PageResponse(page)
