"""An in-memory stand-in for the broker's guest API, behind :class:`MockTransport`.

It implements the contract's guest endpoints closely enough to test the agent without the
broker: pools, put/get/flush with declines (quota, capacity, frozen) that flush the old copy,
exclusive gets in private ephemeral pools, batches, ``/v1/self``, notices and acks, and
the shed candidates (persistent pages by last access, as the broker orders them). ``down``
makes every request raise :class:`BrokerUnavailable`, as an unreachable broker would.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from guest_agent.errors import BrokerUnavailable
from guest_agent.transport import MockTransport, Request, Response
from schemas.batch import (
    BATCH_CONTENT_TYPE,
    OP_FLUSH_OBJECT,
    OP_FLUSH_PAGE,
    OP_GET,
    OP_PUT,
    PAGE_SIZE,
    STATUS_CAPACITY,
    STATUS_DONE,
    STATUS_FROZEN,
    STATUS_MISS,
    STATUS_NAMES,
    STATUS_QUOTA,
    BatchError,
    decode_request,
    encode_results,
)

_PAGE = re.compile(r"^/v1/pools/(\d+)/objects/(\d+)/pages/(\d+)$")
_OBJECT = re.compile(r"^/v1/pools/(\d+)/objects/(\d+)$")
_POOL = re.compile(r"^/v1/pools/(\d+)$")
_BATCH = re.compile(r"^/v1/pools/(\d+)/batch$")
_ACK = re.compile(r"^/v1/notices/(\d+)/ack$")


@dataclass
class FakePool:
    kind: str
    shared: bool = False
    uuid: str | None = None
    exclusive_gets: bool = False
    pages: dict[tuple[int, int], bytes] = field(default_factory=dict)


def _error(status: int, code: str, message: str = "", **extra: Any) -> Response:
    body = {"error": {"code": code, "message": message or code, **extra}}
    return Response(status, json.dumps(body).encode(), {"content-type": "application/json"})


class FakeBroker:
    """One guest's view of a broker; ``transport()`` plugs it into a client."""

    def __init__(
        self,
        *,
        token: str = "tok",
        cap_pages: int | None = None,
        capacity_pages: int | None = None,
        max_batch_ops: int = 1024,
    ) -> None:
        self.token = token
        self.cap_pages = cap_pages
        self.capacity_pages = capacity_pages
        self.max_batch_ops = max_batch_ops
        self.frozen = False
        self.down = False
        self.pools: dict[int, FakePool] = {}
        self.notice_log: list[dict[str, Any]] = []
        self.acks: list[tuple[int, int]] = []
        self.pressure: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []
        self.batch_sizes: list[int] = []

    def transport(self) -> MockTransport:
        return MockTransport(self.handle)

    # --- state helpers
    def persistent_pages(self) -> int:
        return sum(len(p.pages) for p in self.pools.values() if p.kind == "persistent")

    def total_pages(self) -> int:
        return sum(len(p.pages) for p in self.pools.values())

    def add_notice(self, type: str, **fields: Any) -> int:
        seq = len(self.notice_log) + 1
        self.notice_log.append(
            {"seq": seq, "type": type, "issued_at": datetime.now(UTC).isoformat(), **fields}
        )
        return seq

    def _put(self, pool: FakePool, oid: int, index: int, data: bytes) -> int:
        key = (oid, index)
        status = STATUS_DONE
        if self.frozen:
            status = STATUS_FROZEN
        elif (
            pool.kind == "persistent"
            and self.cap_pages is not None
            and key not in pool.pages
            and self.persistent_pages() >= self.cap_pages
        ):
            status = STATUS_QUOTA
        elif (
            self.capacity_pages is not None
            and key not in pool.pages
            and self.total_pages() >= self.capacity_pages
        ):
            status = STATUS_CAPACITY
        if status == STATUS_DONE:
            pool.pages.pop(key, None)  # (re)put: the newest by last access
            pool.pages[key] = bytes(data)
        else:
            pool.pages.pop(key, None)  # a declined put leaves nothing at the handle
        return status

    def _get(self, pool: FakePool, oid: int, index: int) -> bytes | None:
        key = (oid, index)
        exclusive = (pool.kind == "ephemeral" and not pool.shared) or pool.exclusive_gets
        if exclusive:
            return pool.pages.pop(key, None)
        page = pool.pages.pop(key, None)
        if page is not None:
            pool.pages[key] = page  # a get makes it the newest by last access
        return page

    # --- the handler
    def handle(self, request: Request) -> Response:
        if self.down:
            raise BrokerUnavailable("fake broker is down")
        parts = urlsplit(request.target)
        path, query = parts.path, parse_qs(parts.query)
        self.requests.append((request.method, path))
        if ("Authorization", f"Bearer {self.token}") not in request.headers:
            return _error(401, "unauthorised")
        method = request.method
        if method == "POST" and path == "/v1/pools":
            body = json.loads(bytes(request.body))
            if len(self.pools) >= 16:
                return _error(409, "too_many_pools")
            pool_id = min(set(range(16)) - set(self.pools))
            if body.get("shared"):
                for pid, existing in self.pools.items():
                    if existing.uuid == body.get("uuid"):
                        pool_id = pid
                        break
            self.pools.setdefault(
                pool_id,
                FakePool(
                    body["kind"],
                    bool(body.get("shared")),
                    body.get("uuid"),
                    bool(body.get("exclusive_gets")),
                ),
            )
            info = {"pool_id": pool_id, "kind": body["kind"], "shared": bool(body.get("shared"))}
            return Response(201, json.dumps(info).encode())
        if method == "GET" and path == "/v1/self":
            info = {
                "guest_id": 1,
                "name": "g",
                "weight": 100,
                "cap_pages": self.cap_pages,
                "quota_pages": self.cap_pages,
                "dedup_domain": "default",
                "compress": False,
                "frozen": self.frozen,
                "pools": [
                    {"pool_id": pid, "kind": p.kind, "shared": p.shared, "pages": len(p.pages)}
                    for pid, p in self.pools.items()
                ],
                "stats": {"persistent_pages": self.persistent_pages()},
            }
            return Response(200, json.dumps(info).encode())
        if method == "GET" and path == "/v1/self/shed-candidates":
            limit = int(query.get("limit", ["256"])[0])
            # pool by pool: enough for one persistent pool, as the agent's tests use
            named = [
                {"pool_id": pid, "oid": str(oid), "index": index}
                for pid, p in self.pools.items()
                if p.kind == "persistent"
                for oid, index in p.pages
            ]
            return Response(200, json.dumps(named[:limit]).encode(), {})
        if method == "POST" and path == "/v1/self/pressure":
            self.pressure.append(json.loads(bytes(request.body)))
            return Response(204)
        if method == "GET" and path == "/v1/notices":
            after = int(query.get("after", ["0"])[0])
            items = [n for n in self.notice_log if n["seq"] > after]
            return Response(200, json.dumps(items).encode())
        if m := _ACK.match(path):
            self.acks.append((int(m[1]), json.loads(bytes(request.body))["pages_returned"]))
            return Response(204)
        if m := _PAGE.match(path):
            pool = self.pools.get(int(m[1]))
            if pool is None:
                return _error(404, "unknown_pool")
            oid, index = int(m[2]), int(m[3])
            if method == "PUT":
                if len(request.body) != PAGE_SIZE:
                    return _error(400, "bad_page_size")
                status = self._put(pool, oid, index, bytes(request.body))
                if status == STATUS_DONE:
                    return Response(204)
                return _error(409, "not_stored", reason=STATUS_NAMES[status])
            if method == "GET":
                page = self._get(pool, oid, index)
                if page is None:
                    return _error(404, "miss")
                return Response(200, page, {"content-type": "application/octet-stream"})
            if method == "DELETE":
                pool.pages.pop((oid, index), None)
                return Response(204)
        if m := _OBJECT.match(path):
            pool = self.pools.get(int(m[1]))
            if pool is None:
                return _error(404, "unknown_pool")
            oid = int(m[2])
            for key in [k for k in pool.pages if k[0] == oid]:
                del pool.pages[key]
            return Response(204)
        if (m := _POOL.match(path)) and method == "DELETE":
            self.pools.pop(int(m[1]), None)
            return Response(204)
        if (m := _BATCH.match(path)) and method == "POST":
            pool = self.pools.get(int(m[1]))
            if pool is None:
                return _error(404, "unknown_pool")
            try:
                ops = decode_request(bytes(request.body), self.max_batch_ops)
            except BatchError as exc:
                return _error(400, "bad_batch", str(exc))
            self.batch_sizes.append(len(ops))
            results: list[tuple[int, bytes | None]] = []
            for op, oid, index, page in ops:
                if op == OP_PUT:
                    assert page is not None
                    results.append((self._put(pool, oid, index, bytes(page)), None))
                elif op == OP_GET:
                    got = self._get(pool, oid, index)
                    results.append((STATUS_DONE, got) if got is not None else (STATUS_MISS, None))
                elif op == OP_FLUSH_PAGE:
                    pool.pages.pop((oid, index), None)
                    results.append((STATUS_DONE, None))
                elif op == OP_FLUSH_OBJECT:
                    for key in [k for k in pool.pages if k[0] == oid]:
                        del pool.pages[key]
                    results.append((STATUS_DONE, None))
            return Response(200, encode_results(results), {"content-type": BATCH_CONTENT_TYPE})
        return _error(404, "not_found", f"no route {method} {path}")
