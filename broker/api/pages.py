"""The hot path: single-page put/get/flush, object flush and the binary batch.

These are plain Starlette routes inside the FastAPI app (FastAPI's per-request machinery costs
about three times a plain route on this machine; see docs in api-v1 and reference.md). Each
does: one token hash and dict lookup, a strict decimal parse of the path, a bounded body read,
one core call, and the journal barrier when the call recorded something. Page bytes stay raw.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broker.api.errors import MISS, NOT_STORED, BadBatch, BodyTooLarge, Forbidden, Unauthorised
from broker.core.errors import BadHandle, BadPageSize
from schemas.batch import (
    BATCH_CONTENT_TYPE,
    MAX_INDEX,
    MAX_OID,
    PAGE_SIZE,
    BatchError,
    decode_request,
    encode_results,
)

if TYPE_CHECKING:
    from broker.api.service import BrokerService

# A put whose body is not one page is a 400 (bad_page_size) when it is small enough to be a
# plausible mistake (a page of another size); anything bigger is a 413 before it is read.
PUT_BODY_LIMIT = 64 << 10
_MAX_OID_DIGITS = len(str(MAX_OID))
_OCTET = "application/octet-stream"

_NO_CONTENT = Response(status_code=204)


class ServiceBox:
    """Where the lifespan puts the service so routes built before it started can reach it."""

    service: BrokerService | None = None


def _decimal(text: str, limit: int, what: str) -> int:
    if not (0 < len(text) <= len(str(limit)) and text.isascii() and text.isdigit()):
        raise BadHandle(f"{what} must be a decimal integer 0..{limit}")
    value = int(text)
    if value > limit:
        raise BadHandle(f"{what} must be a decimal integer 0..{limit}")
    return value


def _authorization(scope_headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in scope_headers:
        if name == b"authorization":
            return value
    return None


def _content_length(scope_headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in scope_headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it (or its Content-Length) exceeds ``limit``."""
    declared = _content_length(request.scope["headers"])
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"body of {declared} bytes; at most {limit} are allowed here")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body larger than {limit} bytes")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


Endpoint = Callable[[Request], Awaitable[Response]]


def page_routes(box: ServiceBox) -> list[Route]:
    """The hot routes, bound to ``box`` (filled by the lifespan)."""

    async def begin(request: Request, pages: int = 0) -> tuple[BrokerService, int, int]:
        """Authenticate the guest, charge its rate limits (one request and ``pages`` pages)
        and parse the pool id: the common start of every route."""
        service = box.service
        assert service is not None  # routes run only after the lifespan started
        if not service.ready.is_set():
            await service.ready.wait()  # the journal is still being reloaded
        header = _authorization(request.scope["headers"])
        if header is None or header[:7].lower() != b"bearer ":
            raise Unauthorised("missing bearer token")
        token = header[7:].strip().decode("latin-1")
        guest_id = service.tokens.guest_for_token(token)
        if guest_id is None:
            if service.tokens.is_admin(token):
                raise Forbidden("page routes are for guests; the admin token is not a guest's")
            raise Unauthorised("unknown token")
        if service.limits.enabled:
            service.limits.charge(guest_id, pages=pages)
        params = request.path_params
        return service, guest_id, _decimal(params["pool_id"], 0x7FFFFFFF, "pool_id")

    def handle(request: Request) -> tuple[int, int]:
        params = request.path_params
        return (
            _decimal(params["oid"], MAX_OID, "oid"),
            _decimal(params["index"], MAX_INDEX, "index"),
        )

    async def put_page(request: Request) -> Response:
        service, guest_id, pool_id = await begin(request, 1)
        oid, index = handle(request)
        body = await read_body(request, PUT_BODY_LIMIT)
        if len(body) != PAGE_SIZE:
            raise BadPageSize(f"a page is exactly {PAGE_SIZE} bytes, not {len(body)}")
        status = service.core.put(guest_id, pool_id, oid, index, body)
        journal = service.journal
        if journal.pending:
            await journal.barrier()
        if status == 0:
            return _NO_CONTENT
        return Response(NOT_STORED[status], status_code=409, media_type="application/json")

    async def get_page(request: Request) -> Response:
        service, guest_id, pool_id = await begin(request, 1)
        oid, index = handle(request)
        page = service.core.get(guest_id, pool_id, oid, index)
        journal = service.journal
        if journal.pending:  # an exclusive get removed a persistent page
            await journal.barrier()
        if page is None:
            return MISS
        return Response(page, media_type=_OCTET)

    async def flush_page(request: Request) -> Response:
        service, guest_id, pool_id = await begin(request)
        oid, index = handle(request)
        service.core.flush_page(guest_id, pool_id, oid, index)
        if service.journal.pending:
            await service.journal.barrier()
        return _NO_CONTENT

    async def flush_object(request: Request) -> Response:
        service, guest_id, pool_id = await begin(request)
        oid = _decimal(request.path_params["oid"], MAX_OID, "oid")
        service.core.flush_object(guest_id, pool_id, oid)
        if service.journal.pending:
            await service.journal.barrier()
        return _NO_CONTENT

    async def batch(request: Request) -> Response:
        service, guest_id, pool_id = await begin(request)
        settings = service.settings
        body = await read_body(request, settings.max_batch_bytes)
        try:
            ops = decode_request(body, settings.max_batch_ops)
        except BatchError as exc:
            raise BadBatch(str(exc)) from exc
        if service.limits.enabled:
            service.limits.charge(guest_id, requests=0, pages=len(ops))
        results = service.core.batch(guest_id, pool_id, ops)
        if service.journal.pending:
            await service.journal.barrier()
        return Response(encode_results(results), media_type=BATCH_CONTENT_TYPE)

    page = "/v1/pools/{pool_id}/objects/{oid}/pages/{index}"
    return [
        Route(page, put_page, methods=["PUT"], name="put_page"),
        Route(page, get_page, methods=["GET"], name="get_page"),
        Route(page, flush_page, methods=["DELETE"], name="flush_page"),
        Route("/v1/pools/{pool_id}/objects/{oid}", flush_object, methods=["DELETE"]),
        Route("/v1/pools/{pool_id}/batch", batch, methods=["POST"], name="batch"),
    ]
