"""The OpenAPI document: FastAPI's generated schema plus the hot routes, which are plain
Starlette routes FastAPI cannot describe on its own."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

_ERROR = {"$ref": "#/components/schemas/ErrorBody"}
_BEARER: list[dict[str, list[str]]] = [{"HTTPBearer": []}]


def _err(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


def _params(*names: str) -> list[dict[str, Any]]:
    docs = {
        "pool_id": "the guest's pool id (decimal)",
        "oid": "object id, decimal, 0 <= oid < 2^192",
        "index": "page index, decimal, 0 <= index < 2^32",
    }
    return [
        {
            "name": n,
            "in": "path",
            "required": True,
            "description": docs[n],
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        }
        for n in names
    ]


_COMMON = {
    "400": _err("malformed handle or body"),
    "401": _err("no or unknown token"),
    "403": _err("not a guest token"),
    "404": _err("unknown pool (`unknown_pool`) or, for a get, no page (`miss`)"),
}
_PAGE = {"type": "string", "format": "binary", "minLength": 4096, "maxLength": 4096}
_BATCH = {"type": "string", "format": "binary"}


def _hot_paths() -> dict[str, Any]:
    page_params = _params("pool_id", "oid", "index")
    return {
        "/v1/pools/{pool_id}/objects/{oid}/pages/{index}": {
            "put": {
                "tags": ["pages"],
                "summary": "Put a page",
                "description": "Store 4096 raw bytes at the handle, replacing what was there. "
                "A declined put (409 `not_stored`, with `reason`) leaves nothing at the handle.",
                "operationId": "put_page",
                "security": _BEARER,
                "parameters": page_params,
                "requestBody": {
                    "required": True,
                    "content": {"application/octet-stream": {"schema": _PAGE}},
                },
                "responses": {
                    "204": {"description": "stored"},
                    **_COMMON,
                    "409": _err("declined: `not_stored` with reason quota|capacity|frozen|policy"),
                    "413": _err("body too large"),
                },
            },
            "get": {
                "tags": ["pages"],
                "summary": "Get a page",
                "description": "The page at the handle (exclusive in private ephemeral pools "
                "and pools created with `exclusive_gets`).",
                "operationId": "get_page",
                "security": _BEARER,
                "parameters": page_params,
                "responses": {
                    "200": {
                        "description": "the page",
                        "content": {"application/octet-stream": {"schema": _PAGE}},
                    },
                    **_COMMON,
                },
            },
            "delete": {
                "tags": ["pages"],
                "summary": "Flush a page",
                "description": "Remove the page at the handle (idempotent).",
                "operationId": "flush_page",
                "security": _BEARER,
                "parameters": page_params,
                "responses": {"204": {"description": "flushed"}, **_COMMON},
            },
        },
        "/v1/pools/{pool_id}/objects/{oid}": {
            "delete": {
                "tags": ["pages"],
                "summary": "Flush an object",
                "description": "Remove every page of the object (idempotent).",
                "operationId": "flush_object",
                "security": _BEARER,
                "parameters": _params("pool_id", "oid"),
                "responses": {"204": {"description": "flushed"}, **_COMMON},
            }
        },
        "/v1/pools/{pool_id}/batch": {
            "post": {
                "tags": ["pages"],
                "summary": "Apply a batch of page operations",
                "description": "Body `application/x-tmem-batch`: per operation a 29-byte "
                "header `>BQQQI` (op, oid_hi, oid_mid, oid_lo, index), then 4096 page bytes for "
                "a put. op 1 put, 2 get, 3 flush page, 4 flush object. Answer: per operation "
                "a status byte (0 done, 1 miss, 2-5 not stored: quota, capacity, frozen, "
                "policy) followed by 4096 bytes for a get hit. A malformed batch is refused "
                "whole (400) and changes nothing.",
                "operationId": "batch",
                "security": _BEARER,
                "parameters": _params("pool_id"),
                "requestBody": {
                    "required": True,
                    "content": {"application/x-tmem-batch": {"schema": _BATCH}},
                },
                "responses": {
                    "200": {
                        "description": "one result per operation, in order",
                        "content": {"application/x-tmem-batch": {"schema": _BATCH}},
                    },
                    **_COMMON,
                    "413": _err("body larger than the largest legal batch"),
                },
            }
        },
    }


# The errors every /v1 operation can answer, beside those an operation documents itself. All
# carry the ErrorBody schema (FastAPI's own 422 schema is replaced: the broker answers every
# validation error with ErrorBody too).
_V1_ERRORS = {
    "400": "malformed request (`bad_request`, `bad_json`, `bad_handle`, ...)",
    "401": "no or unknown token (`unauthorised`)",
    "403": "a valid token on the wrong side (`forbidden`, `not_authorised`)",
    "404": "unknown guest, pool, notice or page (`code` tells which)",
    "422": "a parameter or body failed validation (`validation_error`)",
}
_GUEST_ERRORS = {
    "429": "over the guest's own rate limit or waiter limit (`rate_limited`, "
    "`too_many_waiters`), with `Retry-After`",
}
_BODY_ERRORS = {"413": "body too large (`body_too_large`)"}
_CONFLICTS = {
    ("post", "/v1/guests"): "a guest of that name exists (`guest_exists`) or the core refused",
    ("patch", "/v1/guests/{guest_id}"): "the core refused the change (`conflict`)",
    ("post", "/v1/pools"): "too many pools (`too_many_pools`) or a conflicting shared pool",
    ("post", "/v1/guests/import"): "the import cannot be taken whole (`import_declined`)",
    ("get", "/v1/guests/{guest_id}/export"): "no export without the journal",
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "whole seconds after which a retry would pass",
        "schema": {"type": "integer"},
    }
}


def _document_errors(paths: dict[str, Any]) -> None:
    """Give every /v1 operation its real error answers, each with the ErrorBody schema."""
    for path, ops in paths.items():
        if not path.startswith("/v1/"):
            continue
        for method, op in ops.items():
            responses: dict[str, Any] = op.setdefault("responses", {})
            extra = dict(_V1_ERRORS)
            if op.get("tags", [None])[0] in ("guest", "pages"):
                extra.update(_GUEST_ERRORS)
            if "requestBody" in op:
                extra.update(_BODY_ERRORS)
            conflict = _CONFLICTS.get((method, path))
            if conflict is not None:
                extra["409"] = conflict
            for status, description in extra.items():
                answer = responses.get(status)
                if answer is None or status == "422":
                    responses[status] = _err(description)
                else:
                    answer.setdefault("content", {"application/json": {"schema": _ERROR}})
            if "429" in responses:
                responses["429"]["headers"] = _RETRY_AFTER


def _document_streams(paths: dict[str, Any]) -> None:
    """The export stream, its import and the metrics text: routes that read or write raw
    bodies FastAPI cannot see."""
    export = "application/x-tmem-export"
    stream = {"type": "string", "format": "binary"}
    imp = paths.get("/v1/guests/import", {}).get("post")
    if imp is not None:
        imp.setdefault(
            "requestBody",
            {"required": True, "content": {export: {"schema": stream}}},
        )
    exp = paths.get("/v1/guests/{guest_id}/export", {}).get("get")
    if exp is not None:
        exp["responses"]["200"] = {
            "description": "the guest's export stream",
            "content": {export: {"schema": stream}},
        }
    metrics = paths.get("/metrics", {}).get("get")
    if metrics is not None:
        metrics["responses"]["200"] = {
            "description": "Prometheus text format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` return the generated schema with the hot paths added."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        paths = schema.setdefault("paths", {})
        for path, ops in _hot_paths().items():
            paths.setdefault(path, {}).update(ops)
        _document_streams(paths)
        _document_errors(paths)
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {})["HTTPBearer"] = {
            "type": "http",
            "scheme": "bearer",
        }
        components.setdefault("schemas", {})["ErrorBody"] = {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string"},
                        "message": {"type": "string"},
                        "reason": {"type": "string"},
                    },
                }
            },
        }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
