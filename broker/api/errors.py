"""Errors of the HTTP shell and the one place that turns any error into an answer.

The shell's own tree (the core has its own in ``broker.core.errors``)::

    ApiError                      status code
    ├── NotHome                   307  not_home         another broker is the guest's home
    ├── BadInput                  400  bad_request      malformed path, body or batch
    │   ├── BadJson               400  bad_json
    │   ├── BadBatch              400  bad_batch
    │   └── BadExport             400  bad_export       a corrupted or truncated export stream
    ├── Unauthorised              401  unauthorised     no token or a wrong one
    ├── Forbidden                 403  forbidden        a valid token on the wrong side
    ├── UnknownNotice             404  unknown_notice
    ├── ImportDeclined            409  import_declined  an import this broker cannot take whole
    ├── NotACluster               409  not_a_cluster    a cluster call made to a single host
    ├── BodyTooLarge              413  body_too_large
    └── RateLimited               429  rate_limited     over the guest's own rate limit
        └── TooManyWaiters        429  too_many_waiters too many long-polls/WebSockets

:func:`error_response` maps every class of both trees, plus Starlette's and FastAPI's own
exceptions (an unknown route: 404 ``not_found``; a wrong method: 405 ``method_not_allowed``;
a body that fails validation: 422 ``validation_error``, or 400 ``bad_json`` when it is not
JSON at all), to ``{"error": {"code", "message"}}`` with the class's status. A journal failure
(``broker.store.errors.StoreError``) is the one 5xx by design: 503 ``journal_unavailable``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, ClassVar

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from broker.cluster.errors import ClusterUnavailable
from broker.core.errors import TmemError
from broker.store.errors import StoreError
from schemas.batch import STATUS_NAMES

log = logging.getLogger(__name__)


class ApiError(Exception):
    """Base of the shell's errors; ``status`` and ``code`` as in the core's tree."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"


class NotHome(ApiError):
    """Another broker of the cluster is the guest's home: ``307`` with ``Location`` on the
    home's URL and the same path (docs/scale.md, "Redirects")."""

    status = 307
    code = "not_home"

    def __init__(self, location: str, broker_id: str = "") -> None:
        super().__init__(f"the guest's home is broker {broker_id or '?'} at {location}")
        self.location = location
        self.broker_id = broker_id


class BadInput(ApiError):
    status = 400
    code = "bad_request"


class BadJson(BadInput):
    code = "bad_json"


class BadBatch(BadInput):
    code = "bad_batch"


class BadExport(BadInput):
    code = "bad_export"


class ImportDeclined(ApiError):
    status = 409
    code = "import_declined"


class NotACluster(ApiError):
    status = 409
    code = "not_a_cluster"


class Unauthorised(ApiError):
    status = 401
    code = "unauthorised"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class UnknownNotice(ApiError):
    status = 404
    code = "unknown_notice"


class BodyTooLarge(ApiError):
    status = 413
    code = "body_too_large"


class RateLimited(ApiError):
    """429 with ``Retry-After: retry_after`` (whole seconds)."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyWaiters(RateLimited):
    code = "too_many_waiters"


def error_body(code: str, message: str, **extra: Any) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, **extra}}).encode()


def json_error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        error_body(code, message),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


# Prebuilt answers of the hot path: a miss and a declined put are not exceptions there.
MISS = Response(
    error_body("miss", "no page at that handle"), status_code=404, media_type="application/json"
)
NOT_STORED = {
    status: error_body(
        "not_stored",
        f"the broker declined the put ({name}); nothing is stored at that handle",
        reason=name,
    )
    for status, name in STATUS_NAMES.items()
    if status >= 2
}

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorised",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
}


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "bad_json", "the body is not valid JSON"
    parts = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return 422, "validation_error", "; ".join(parts) or "invalid request"


def error_response(exc: Exception) -> Response:
    """The answer for any error a route raised: ``{"error": {"code", "message"}}``."""
    if isinstance(exc, RateLimited):
        headers = {"Retry-After": str(exc.retry_after)}
        return json_error(exc.status, exc.code, str(exc), headers=headers)
    if isinstance(exc, NotHome):
        return json_error(exc.status, exc.code, str(exc), headers={"Location": exc.location})
    if isinstance(exc, TmemError | ApiError):
        return json_error(exc.status, exc.code, str(exc) or exc.code.replace("_", " "))
    if isinstance(exc, ClusterUnavailable):
        # Cluster mode, Redis in a failover or a replica silent: nothing was acknowledged.
        headers = {"Retry-After": str(exc.retry_after)}
        return json_error(503, "cluster_unavailable", str(exc), headers=headers)
    if isinstance(exc, StoreError):
        # The journal cannot promise durability: nothing persistent is acknowledged.
        log.error("journal unavailable: %r", exc)
        return json_error(503, "journal_unavailable", "the durable journal failed; see the log")
    if isinstance(exc, RequestValidationError):
        status, code, message = _validation_message(exc)
        return json_error(status, code, message)
    if isinstance(exc, StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        detail = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such route"
        return json_error(exc.status_code, code, detail, headers=exc.headers)
    log.exception("unhandled error", exc_info=exc)
    return json_error(500, "internal_error", "the broker hit a bug; see its log")


# Every class error_response answers for; anything else is a bug and stays a 500 of the server.
HANDLED: tuple[type[Exception], ...] = (
    TmemError,
    ApiError,
    StoreError,
    RequestValidationError,
    StarletteHTTPException,
)


async def handle_error(_request: Request, exc: Exception) -> Response:
    """The exception handler of the FastAPI app (registered for each of :data:`HANDLED`)."""
    return error_response(exc)


def exception_handlers() -> dict[Any, Any]:
    """``FastAPI(exception_handlers=...)``: :func:`handle_error` for every class of :data:`HANDLED`.

    The page routes (plain ASGI endpoints) catch :data:`HANDLED` and call
    :func:`error_response` themselves, so both paths answer through the same function.
    """
    return dict.fromkeys(HANDLED, handle_error)
