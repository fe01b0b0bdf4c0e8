"""Clients of the broker's guest API (api-v1.md, "Guest endpoints").

::

    with TmemClient("http://127.0.0.1:8470", token) as client:
        pool = client.create_pool("persistent")
        r = client.put(pool, oid=7, index=0, page=b"x" * 4096)
        if not r:                      # declined: r.reason is quota|capacity|frozen|policy
            ...
        page = client.get(pool, 7, 0)  # bytes, or None on a miss
        results = client.put_many(pool, [(7, i, page) for i in range(5000)])  # chunked batches
        pages = client.get_many(pool, [(7, i) for i in range(5000)])

:class:`AsyncTmemClient` has the same methods, awaited, and ``async with``.

Outcomes are values where the contract says so: a declined put is a falsy :class:`PutResult`,
a get miss is ``None``. Real failures raise from :mod:`guest_agent.errors`.

Thread safety: a :class:`TmemClient` holds **one** keep-alive connection and must not be used
from two threads at once (give each thread its own client). An :class:`AsyncTmemClient` may be
shared by the tasks of one event loop: its transport keeps a small pool of connections
(``max_connections``).

Batches (``put_many``, ``get_many``, ``flush_many``, ``batch``) are split into requests of at
most ``max_batch_ops`` operations (the broker's limit, 1024 by default). Each request is atomic
at the broker (a malformed one changes nothing), but a list split into several requests is not:
if a later request fails, earlier ones have taken effect.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any, Literal, TypeVar
from urllib.parse import quote

from guest_agent.errors import BrokerUnavailable, ProtocolError, error_for_status
from guest_agent.redirects import Chain, is_redirect, new_base, resent
from guest_agent.transport import (
    AsyncHTTPTransport,
    AsyncTransport,
    HTTPTransport,
    Request,
    Response,
    Transport,
)
from schemas.batch import (
    BATCH_CONTENT_TYPE,
    MAX_INDEX,
    MAX_OID,
    OP_FLUSH_OBJECT,
    OP_FLUSH_PAGE,
    OP_PUT,
    PAGE_SIZE,
    STATUS_DONE,
    STATUS_MISS,
    STATUS_NAMES,
    BatchError,
    BatchResult,
    decode_results,
    encode_gets,
    encode_request,
)
from schemas.wire import Notice, PoolInfo, SelfInfo

__all__ = ["DEFAULT_MAX_BATCH_OPS", "AsyncTmemClient", "PutResult", "TmemClient"]

DEFAULT_MAX_BATCH_OPS = 1024
PoolKindArg = Literal["persistent", "ephemeral"]
BatchOpArg = tuple[int, int, int, "bytes | memoryview | None"]
_T = TypeVar("_T")


class PutResult:
    """What a put came to: truthy when stored; when declined, ``reason`` says why
    (``"quota"``, ``"capacity"``, ``"frozen"`` or ``"policy"``) and nothing is left at the
    handle (the broker flushed any older copy)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str | None = None) -> None:
        self.reason = reason

    @property
    def stored(self) -> bool:
        return self.reason is None

    def __bool__(self) -> bool:
        return self.reason is None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PutResult) and other.reason == self.reason

    def __hash__(self) -> int:
        return hash(self.reason)

    def __repr__(self) -> str:
        return (
            "PutResult(stored)" if self.reason is None else f"PutResult(declined={self.reason!r})"
        )


STORED = PutResult()
_DECLINED_BY_STATUS = {s: PutResult(n) for s, n in STATUS_NAMES.items() if s > STATUS_MISS}
_DECLINED_BY_REASON = {r.reason: r for r in _DECLINED_BY_STATUS.values()}
_PUT_BY_STATUS: dict[int, PutResult] = {STATUS_DONE: STORED, **_DECLINED_BY_STATUS}


def _chunks(items: Sequence[_T], size: int) -> Iterable[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _check_handle(oid: int, index: int) -> None:
    if not 0 <= oid <= MAX_OID:
        raise ValueError(f"oid {oid} out of range 0..2^192-1")
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"index {index} out of range 0..2^32-1")


def _raise_for(response: Response) -> None:
    """Raise the tree's exception for an error response."""
    code = f"http_{response.status}"
    message = response.body[:200].decode("utf-8", "replace")
    try:
        err = json.loads(response.body)["error"]
        code = str(err.get("code", code))
        message = str(err.get("message", message))
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    retry_after: float | None = None
    if "retry-after" in response.headers:
        try:
            retry_after = float(response.headers["retry-after"])
        except ValueError:
            retry_after = None
    raise error_for_status(response.status, code, message, retry_after)


def _json(response: Response) -> Any:
    try:
        return json.loads(response.body)
    except ValueError as exc:
        raise ProtocolError(f"broker sent invalid JSON ({response.status})") from exc


def _declined_reason(response: Response) -> str | None:
    try:
        err = json.loads(response.body)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(err, dict) or err.get("code") != "not_stored":
        return None
    reason = err.get("reason")
    return reason if isinstance(reason, str) else "policy"


class _Base:
    """Request building and response parsing shared by the sync and async clients."""

    def __init__(self, token: str, max_batch_ops: int) -> None:
        if max_batch_ops < 1:
            raise ValueError("max_batch_ops must be at least 1")
        self.max_batch_ops = max_batch_ops
        self.token = token
        auth = ("Authorization", f"Bearer {token}")
        self._h_plain = [auth]
        self._h_octet = [auth, ("Content-Type", "application/octet-stream")]
        self._h_json = [auth, ("Content-Type", "application/json")]
        self._h_batch = [auth, ("Content-Type", BATCH_CONTENT_TYPE)]

    # --- requests
    def _json_request(self, method: str, target: str, payload: Any) -> Request:
        return Request(method, target, json.dumps(payload).encode(), self._h_json)

    def _req_create_pool(
        self, kind: str, shared: bool, uuid: str | None, exclusive_gets: bool
    ) -> Request:
        payload: dict[str, Any] = {"kind": kind, "shared": shared, "page_size": PAGE_SIZE}
        if uuid is not None:
            payload["uuid"] = str(uuid)
        if exclusive_gets:
            payload["exclusive_gets"] = True
        return self._json_request("POST", "/v1/pools", payload)

    def _req_put(self, pool_id: int, oid: int, index: int, page: bytes | memoryview) -> Request:
        if len(page) != PAGE_SIZE:
            raise ValueError(f"a page is exactly {PAGE_SIZE} bytes, got {len(page)}")
        _check_handle(oid, index)
        target = f"/v1/pools/{pool_id}/objects/{oid}/pages/{index}"
        return Request("PUT", target, page, self._h_octet)

    def _req_page(self, method: str, pool_id: int, oid: int, index: int) -> Request:
        _check_handle(oid, index)
        return Request(
            method, f"/v1/pools/{pool_id}/objects/{oid}/pages/{index}", b"", self._h_plain
        )

    def _req_batch(self, pool_id: int, ops: Sequence[BatchOpArg], borrow: bool = False) -> Request:
        try:
            body = encode_request(ops)
        except BatchError as exc:
            raise ValueError(str(exc)) from exc
        return Request("POST", f"/v1/pools/{pool_id}/batch", body, self._h_batch, borrow)

    def _req_get_batch(self, pool_id: int, handles: Sequence[tuple[int, int]]) -> Request:
        # a get per handle; the answer is parsed before the next request (borrowed)
        try:
            body = encode_gets(handles)
        except BatchError as exc:
            raise ValueError(str(exc)) from exc
        return Request("POST", f"/v1/pools/{pool_id}/batch", body, self._h_batch, True)

    def _req_notices(self, after: int, wait: float) -> Request:
        return Request("GET", f"/v1/notices?after={int(after)}&wait={wait:g}", b"", self._h_plain)

    # --- responses
    @staticmethod
    def _ok(response: Response) -> None:
        if not 200 <= response.status < 300:
            _raise_for(response)

    @staticmethod
    def _parse_put(response: Response) -> PutResult:
        if response.status == 204 or response.status == 200:
            return STORED
        if response.status == 409:
            reason = _declined_reason(response)
            if reason is not None:
                return _DECLINED_BY_REASON.get(reason) or PutResult(reason)
        _raise_for(response)
        raise AssertionError("unreachable")

    @staticmethod
    def _parse_get(response: Response) -> bytes | None:
        if response.status == 200:
            if len(response.body) != PAGE_SIZE:
                raise ProtocolError(f"a page of {len(response.body)} bytes came back")
            return response.body
        if response.status == 404:
            try:
                code = json.loads(response.body)["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = None
            if code == "miss":
                return None
        _raise_for(response)
        raise AssertionError("unreachable")

    @staticmethod
    def _parse_batch(response: Response, ops: Sequence[BatchOpArg]) -> list[BatchResult]:
        if response.status != 200:
            _raise_for(response)
        try:
            return decode_results(response.body, [op[0] for op in ops])
        except BatchError as exc:
            raise ProtocolError(f"bad batch response: {exc}") from exc

    @staticmethod
    def _parse_put_batch(response: Response, n: int) -> list[PutResult]:
        # A batch of puts answers one status byte per op: no need for the general decoder.
        if response.status != 200:
            _raise_for(response)
        body = response.body
        if len(body) != n:
            raise ProtocolError(f"{len(body)} result bytes for {n} puts")
        try:
            return [_PUT_BY_STATUS[status] for status in body]
        except KeyError as exc:
            raise ProtocolError(f"status {exc.args[0]} for a put") from exc

    @staticmethod
    def _parse_get_batch(response: Response, n: int) -> list[bytes | None]:
        # A status byte per get and a page after each hit, sliced here directly rather than
        # through the general decoder; a borrowed body (a memoryview) has each page copied once.
        if response.status != 200:
            _raise_for(response)
        body = response.body if response.view is None else response.view
        size = len(body)
        if size == n * _HIT and n and bytes(body[::_HIT]) == bytes(n):
            # every get a hit: the pages copied out by one struct unpack (256 pages: 234 ->
            # 68 µs against a slice and a copy per page, issue #21 b)
            return list(_hits(n).unpack_from(body))
        out: list[bytes | None] = []
        pos = 0
        for _ in range(n):
            status = body[pos] if pos < size else None
            if status == STATUS_DONE and pos + 1 + PAGE_SIZE <= size:
                out.append(bytes(body[pos + 1 : pos + 1 + PAGE_SIZE]))
                pos += 1 + PAGE_SIZE
            elif status == STATUS_MISS:
                out.append(None)
                pos += 1
            else:
                raise ProtocolError(f"truncated batch response or status {status} for a get")
        if pos != size:
            raise ProtocolError("trailing bytes in batch response")
        return out

    @staticmethod
    def _parse_pool(response: Response) -> int:
        if response.status not in (200, 201):
            _raise_for(response)
        try:
            return PoolInfo.model_validate(_json(response)).pool_id
        except ValueError as exc:
            raise ProtocolError(f"bad pool answer: {exc}") from exc

    @staticmethod
    def _parse_self(response: Response) -> SelfInfo:
        if response.status != 200:
            _raise_for(response)
        try:
            return SelfInfo.model_validate(_json(response))
        except ValueError as exc:
            raise ProtocolError(f"bad /v1/self answer: {exc}") from exc

    @staticmethod
    def _parse_notices(response: Response) -> list[Notice]:
        if response.status != 200:
            _raise_for(response)
        data = _json(response)
        try:
            return [Notice.model_validate(item) for item in data]
        except (ValueError, TypeError) as exc:
            raise ProtocolError(f"bad notices answer: {exc}") from exc

    @staticmethod
    def _parse_candidates(response: Response) -> list[tuple[int, int, int]]:
        if response.status != 200:
            _raise_for(response)
        data = _json(response)
        try:
            return [(int(c["pool_id"]), int(c["oid"]), int(c["index"])) for c in data]
        except (ValueError, TypeError, KeyError) as exc:
            raise ProtocolError(f"bad shed candidates answer: {exc}") from exc

    def _req_candidates(self, limit: int) -> Request:
        return Request("GET", f"/v1/self/shed-candidates?limit={int(limit)}", b"", self._h_plain)

    @staticmethod
    def _pressure_payload(
        psi_some_avg10: float | None,
        psi_full_avg10: float | None,
        mem_available_bytes: int | None,
        swap_used_bytes: int | None,
    ) -> dict[str, Any]:
        fields = {
            "psi_some_avg10": psi_some_avg10,
            "psi_full_avg10": psi_full_avg10,
            "mem_available_bytes": mem_available_bytes,
            "swap_used_bytes": swap_used_bytes,
        }
        return {k: v for k, v in fields.items() if v is not None}


def _put_ops(pages: Sequence[tuple[int, int, bytes | memoryview]]) -> list[BatchOpArg]:
    return [(OP_PUT, oid, index, page) for oid, index, page in pages]


_HIT = 1 + PAGE_SIZE  # a get hit's result: its status byte and the page


@lru_cache(maxsize=16)
def _hits(n: int) -> struct.Struct:
    """The layout of ``n`` get hits: skip each status byte, a page each."""
    return struct.Struct("<" + f"x{PAGE_SIZE}s" * n)


def _handle_list(handles: Sequence[tuple[int, int]]) -> Sequence[tuple[int, int]]:
    return handles if isinstance(handles, list | tuple) else list(handles)


def _flush_ops(handles: Sequence[tuple[int, int]]) -> list[BatchOpArg]:
    return [(OP_FLUSH_PAGE, oid, index, None) for oid, index in handles]


class TmemClient(_Base):
    """Synchronous client; one keep-alive connection (not thread-safe: one per thread).

    ``transport`` replaces the network (e.g. :class:`~guest_agent.transport.MockTransport`);
    ``max_batch_ops`` is the broker's batch limit; ``timeout`` bounds connect and reads.
    A ``307`` to the guest's home broker is followed and remembered (``base_url`` changes;
    :mod:`guest_agent.redirects`); ``transport_factory(base_url)`` makes the transport for
    the new address (by default an :class:`~guest_agent.transport.HTTPTransport`).
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        transport: Transport | None = None,
        timeout: float = 30.0,
        max_batch_ops: int = DEFAULT_MAX_BATCH_OPS,
        transport_factory: Callable[[str], Transport] | None = None,
    ) -> None:
        super().__init__(token, max_batch_ops)
        self.base_url = self.first_url = base_url
        self._factory = transport_factory or (lambda url: HTTPTransport(url, timeout=timeout))
        self._transport: Transport = transport or self._factory(base_url)

    def __enter__(self) -> TmemClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the client reconnects if used again)."""
        close = getattr(self._transport, "close", None)
        if close is not None:
            close()

    def _send(self, request: Request) -> Response:
        try:
            response = self._transport.handle_request(request)
        except BrokerUnavailable:
            if self.base_url != self.first_url:
                # the home we were sent to is gone (a crash): the next call asks the broker
                # we were given, which knows (or soon knows) the guest's new home
                self.close()
                self.base_url, self._transport = self.first_url, self._factory(self.first_url)
            raise
        if not is_redirect(response):
            return response
        chain = Chain(self.base_url)
        while is_redirect(response):
            base = chain.next(new_base(request.target, response))
            self.close()
            self.base_url, self._transport = base, self._factory(base)
            request = resent(request)
            response = self._transport.handle_request(request)
        return response

    # --- pools
    def create_pool(
        self,
        kind: PoolKindArg,
        *,
        shared: bool = False,
        uuid: str | None = None,
        exclusive_gets: bool = False,
    ) -> int:
        """Create (or, for a shared ``uuid``, join) a pool and return its id."""
        return self._parse_pool(
            self._send(self._req_create_pool(kind, shared, uuid, exclusive_gets))
        )

    def destroy_pool(self, pool_id: int) -> None:
        """Destroy a pool and every page in it (idempotent)."""
        self._ok(self._send(Request("DELETE", f"/v1/pools/{pool_id}", b"", self._h_plain)))

    # --- pages
    def put(self, pool_id: int, oid: int, index: int, page: bytes | memoryview) -> PutResult:
        """Store a 4096-byte page; a declined put returns a falsy :class:`PutResult`."""
        return self._parse_put(self._send(self._req_put(pool_id, oid, index, page)))

    def get(self, pool_id: int, oid: int, index: int) -> bytes | None:
        """The page at the handle, or ``None`` on a miss."""
        return self._parse_get(self._send(self._req_page("GET", pool_id, oid, index)))

    def flush_page(self, pool_id: int, oid: int, index: int) -> None:
        """Remove the page at the handle (idempotent)."""
        self._ok(self._send(self._req_page("DELETE", pool_id, oid, index)))

    def flush_object(self, pool_id: int, oid: int) -> None:
        """Remove every page of the object (idempotent)."""
        _check_handle(oid, 0)
        self._ok(
            self._send(Request("DELETE", f"/v1/pools/{pool_id}/objects/{oid}", b"", self._h_plain))
        )

    # --- batches
    def batch(self, pool_id: int, ops: Sequence[BatchOpArg]) -> list[BatchResult]:
        """Raw batch of ``(op, oid, index, page_or_None)``; one result per op, in order."""
        out: list[BatchResult] = []
        for chunk in _chunks(ops, self.max_batch_ops):
            out.extend(self._parse_batch(self._send(self._req_batch(pool_id, chunk)), chunk))
        return out

    def put_many(
        self, pool_id: int, pages: Sequence[tuple[int, int, bytes | memoryview]]
    ) -> list[PutResult]:
        """Put ``(oid, index, page)`` triples; one :class:`PutResult` per page, in order."""
        out: list[PutResult] = []
        for chunk in _chunks(_put_ops(pages), self.max_batch_ops):
            response = self._send(self._req_batch(pool_id, chunk))
            out.extend(self._parse_put_batch(response, len(chunk)))
        return out

    def get_many(self, pool_id: int, handles: Sequence[tuple[int, int]]) -> list[bytes | None]:
        """Get ``(oid, index)`` handles; the page or ``None`` per handle, in order."""
        out: list[bytes | None] = []
        for chunk in _chunks(_handle_list(handles), self.max_batch_ops):
            response = self._send(self._req_get_batch(pool_id, chunk))
            out.extend(self._parse_get_batch(response, len(chunk)))
        return out

    def flush_many(self, pool_id: int, handles: Sequence[tuple[int, int]]) -> None:
        """Flush ``(oid, index)`` handles in batches."""
        self.batch(pool_id, _flush_ops(handles))

    def flush_objects(self, pool_id: int, oids: Sequence[int]) -> None:
        """Flush whole objects in batches."""
        self.batch(pool_id, [(OP_FLUSH_OBJECT, oid, 0, None) for oid in oids])

    # --- self and notices
    def self_info(self) -> SelfInfo:
        """The guest, its quota, its pools and its own stats."""
        return self._parse_self(self._send(Request("GET", "/v1/self", b"", self._h_plain)))

    def notices(self, after: int = 0, wait: float = 0) -> list[Notice]:
        """Notices with ``seq > after``; waits up to ``wait`` seconds (<= 60) for one."""
        return self._parse_notices(self._send(self._req_notices(after, wait)))

    def ack(self, seq: int, pages_returned: int = 0) -> None:
        """Acknowledge a notice (for a shed: how many pages were returned)."""
        req = self._json_request(
            "POST", f"/v1/notices/{int(seq)}/ack", {"pages_returned": pages_returned}
        )
        self._ok(self._send(req))

    def shed_candidates(self, limit: int = 256) -> list[tuple[int, int, int]]:
        """The guest's coldest persistent pages at the broker, coldest first, as
        ``(pool_id, oid, index)`` (at most ``limit``, <= 4096): what a shed returns first."""
        return self._parse_candidates(self._send(self._req_candidates(limit)))

    def report_pressure(
        self,
        *,
        psi_some_avg10: float | None = None,
        psi_full_avg10: float | None = None,
        mem_available_bytes: int | None = None,
        swap_used_bytes: int | None = None,
    ) -> None:
        """Tell the broker the guest's own view of its memory pressure."""
        payload = self._pressure_payload(
            psi_some_avg10, psi_full_avg10, mem_available_bytes, swap_used_bytes
        )
        self._ok(self._send(self._json_request("POST", "/v1/self/pressure", payload)))

    def report_export(self, name: str, figures: dict[str, int]) -> None:
        """Tell the broker an export's figures (``PUT /v1/self/exports/{name}``)."""
        req = self._json_request("PUT", f"/v1/self/exports/{quote(name, safe='')}", figures)
        self._ok(self._send(req))


class AsyncTmemClient(_Base):
    """The asyncio client: the methods of :class:`TmemClient`, awaited.

    Safe to share between tasks of one event loop; the default transport pools up to
    ``max_connections`` keep-alive connections. Redirects to the guest's home broker are
    followed as :class:`TmemClient` does (``transport_factory`` makes the new transport).
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        transport: AsyncTransport | None = None,
        timeout: float = 30.0,
        max_batch_ops: int = DEFAULT_MAX_BATCH_OPS,
        max_connections: int = 4,
        transport_factory: Callable[[str], AsyncTransport] | None = None,
    ) -> None:
        super().__init__(token, max_batch_ops)
        self.base_url = self.first_url = base_url
        self._factory = transport_factory or (
            lambda url: AsyncHTTPTransport(url, timeout=timeout, max_connections=max_connections)
        )
        self._transport: AsyncTransport = transport or self._factory(base_url)

    async def __aenter__(self) -> AsyncTmemClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the pooled connections."""
        aclose = getattr(self._transport, "aclose", None)
        if aclose is not None:
            await aclose()

    async def _send(self, request: Request) -> Response:
        try:
            response = await self._transport.handle_async_request(request)
        except BrokerUnavailable:
            if self.base_url != self.first_url:
                # the home we were sent to is gone: back to the broker we were given
                old, self._transport = self._transport, self._factory(self.first_url)
                self.base_url = self.first_url
                aclose = getattr(old, "aclose", None)
                if aclose is not None:
                    await aclose()
            raise
        if not is_redirect(response):
            return response
        chain = Chain(self.base_url)
        while is_redirect(response):
            base = chain.next(new_base(request.target, response))
            if base != self.base_url:
                # other tasks may have followed the same move already: switch once
                old, self._transport = self._transport, self._factory(base)
                self.base_url = base
                aclose = getattr(old, "aclose", None)
                if aclose is not None:
                    await aclose()
            request = resent(request)
            response = await self._transport.handle_async_request(request)
        return response

    async def create_pool(
        self,
        kind: PoolKindArg,
        *,
        shared: bool = False,
        uuid: str | None = None,
        exclusive_gets: bool = False,
    ) -> int:
        """Create (or, for a shared ``uuid``, join) a pool and return its id."""
        req = self._req_create_pool(kind, shared, uuid, exclusive_gets)
        return self._parse_pool(await self._send(req))

    async def destroy_pool(self, pool_id: int) -> None:
        """Destroy a pool and every page in it (idempotent)."""
        self._ok(await self._send(Request("DELETE", f"/v1/pools/{pool_id}", b"", self._h_plain)))

    async def put(self, pool_id: int, oid: int, index: int, page: bytes | memoryview) -> PutResult:
        """Store a 4096-byte page; a declined put returns a falsy :class:`PutResult`."""
        return self._parse_put(await self._send(self._req_put(pool_id, oid, index, page)))

    async def get(self, pool_id: int, oid: int, index: int) -> bytes | None:
        """The page at the handle, or ``None`` on a miss."""
        return self._parse_get(await self._send(self._req_page("GET", pool_id, oid, index)))

    async def flush_page(self, pool_id: int, oid: int, index: int) -> None:
        """Remove the page at the handle (idempotent)."""
        self._ok(await self._send(self._req_page("DELETE", pool_id, oid, index)))

    async def flush_object(self, pool_id: int, oid: int) -> None:
        """Remove every page of the object (idempotent)."""
        _check_handle(oid, 0)
        req = Request("DELETE", f"/v1/pools/{pool_id}/objects/{oid}", b"", self._h_plain)
        self._ok(await self._send(req))

    async def batch(self, pool_id: int, ops: Sequence[BatchOpArg]) -> list[BatchResult]:
        """Raw batch of ``(op, oid, index, page_or_None)``; one result per op, in order."""
        out: list[BatchResult] = []
        for chunk in _chunks(ops, self.max_batch_ops):
            response = await self._send(self._req_batch(pool_id, chunk))
            out.extend(self._parse_batch(response, chunk))
        return out

    async def put_many(
        self, pool_id: int, pages: Sequence[tuple[int, int, bytes | memoryview]]
    ) -> list[PutResult]:
        """Put ``(oid, index, page)`` triples; one :class:`PutResult` per page, in order."""
        out: list[PutResult] = []
        for chunk in _chunks(_put_ops(pages), self.max_batch_ops):
            response = await self._send(self._req_batch(pool_id, chunk))
            out.extend(self._parse_put_batch(response, len(chunk)))
        return out

    async def get_many(
        self, pool_id: int, handles: Sequence[tuple[int, int]]
    ) -> list[bytes | None]:
        """Get ``(oid, index)`` handles; the page or ``None`` per handle, in order."""
        out: list[bytes | None] = []
        for chunk in _chunks(_handle_list(handles), self.max_batch_ops):
            response = await self._send(self._req_get_batch(pool_id, chunk))
            out.extend(self._parse_get_batch(response, len(chunk)))
        return out

    async def flush_many(self, pool_id: int, handles: Sequence[tuple[int, int]]) -> None:
        """Flush ``(oid, index)`` handles in batches."""
        await self.batch(pool_id, _flush_ops(handles))

    async def flush_objects(self, pool_id: int, oids: Sequence[int]) -> None:
        """Flush whole objects in batches."""
        await self.batch(pool_id, [(OP_FLUSH_OBJECT, oid, 0, None) for oid in oids])

    async def self_info(self) -> SelfInfo:
        """The guest, its quota, its pools and its own stats."""
        return self._parse_self(await self._send(Request("GET", "/v1/self", b"", self._h_plain)))

    async def notices(self, after: int = 0, wait: float = 0) -> list[Notice]:
        """Notices with ``seq > after``; waits up to ``wait`` seconds (<= 60) for one."""
        return self._parse_notices(await self._send(self._req_notices(after, wait)))

    async def ack(self, seq: int, pages_returned: int = 0) -> None:
        """Acknowledge a notice (for a shed: how many pages were returned)."""
        req = self._json_request(
            "POST", f"/v1/notices/{int(seq)}/ack", {"pages_returned": pages_returned}
        )
        self._ok(await self._send(req))

    async def shed_candidates(self, limit: int = 256) -> list[tuple[int, int, int]]:
        """The guest's coldest persistent pages at the broker, coldest first, as
        ``(pool_id, oid, index)`` (at most ``limit``, <= 4096): what a shed returns first."""
        return self._parse_candidates(await self._send(self._req_candidates(limit)))

    async def report_pressure(
        self,
        *,
        psi_some_avg10: float | None = None,
        psi_full_avg10: float | None = None,
        mem_available_bytes: int | None = None,
        swap_used_bytes: int | None = None,
    ) -> None:
        """Tell the broker the guest's own view of its memory pressure."""
        payload = self._pressure_payload(
            psi_some_avg10, psi_full_avg10, mem_available_bytes, swap_used_bytes
        )
        self._ok(await self._send(self._json_request("POST", "/v1/self/pressure", payload)))

    async def report_export(self, name: str, figures: dict[str, int]) -> None:
        """Tell the broker an export's figures (``PUT /v1/self/exports/{name}``)."""
        req = self._json_request("PUT", f"/v1/self/exports/{quote(name, safe='')}", figures)
        self._ok(await self._send(req))
