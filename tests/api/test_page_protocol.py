"""``PageProtocol`` (broker/api/page_protocol.py, what ``tmem-broker serve`` runs) answers the
single-page routes and batches inside uvicorn's protocol with the bytes the ASGI path would
send, keeps
pipelined requests in order, honours keep-alive and ``Connection: close``, and reassembles a
request split across TCP segments. A real uvicorn server on a loopback port, raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h11
import pytest
import uvicorn

from broker.api.front import HotRoutes
from broker.api.page_protocol import page_protocol
from broker.app import create_app
from scripts.procs import free_port
from tests.api.conftest import ADMIN, make_settings, page
from tests.api.test_front import BATCH, REQUESTS, _batch

Served = tuple[HotRoutes, int, list[str]]


@contextlib.asynccontextmanager
async def _serve(
    tmp_path: Path, url: str, keep_alive: int = 60, **overrides: Any
) -> AsyncIterator[Served]:
    """The broker's front door under uvicorn with ``page_protocol`` on a free port; yields it,
    the port and the methods ``page_now`` answered (the requests that skipped ASGI)."""
    front = HotRoutes(create_app(make_settings(tmp_path, url, **overrides)))
    answered: list[str] = []
    page_now = front.pages.page_now

    def spy(service: Any, method: str, *args: Any) -> Any:
        answered.append(method)
        return page_now(service, method, *args)

    batch_now = front.pages.batch_now

    def batch_spy(service: Any, *args: Any) -> Any:
        answered.append("POST")
        return batch_now(service, *args)

    front.pages.page_now = spy  # type: ignore[method-assign,assignment]
    front.pages.batch_now = batch_spy  # type: ignore[method-assign]
    port = free_port()
    config = uvicorn.Config(
        front,
        host="127.0.0.1",
        port=port,
        http=page_protocol(front),
        log_level="warning",
        access_log=False,  # as serve runs it (an access log takes the ASGI path)
        timeout_keep_alive=keep_alive,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the server did not start"
        await asyncio.sleep(0.01)
    try:
        yield front, port, answered
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


class Conn:
    """One keep-alive connection: raw bytes out, answers parsed by h11 (another HTTP stack)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h11 = h11.Connection(h11.CLIENT)
        self.raw = b""
        self.methods: list[str] = []

    @classmethod
    async def open(cls, port: int) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> tuple[int, dict[str, str], bytes]:
        """The next answer: status, headers, body (``self.raw`` keeps its bytes)."""
        status, headers, body = 0, {}, b""
        # h11 reads an answer by its request: it is told of them one at a time
        self.h11.send(h11.Request(method=self.methods.pop(0), target="/", headers=[("Host", "x")]))
        self.h11.send(h11.EndOfMessage())
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(self.reader.read(65536), 10)
                self.raw += data
                self.h11.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                if self.h11.our_state is h11.DONE:  # else the answer closes the connection
                    self.h11.start_next_cycle()
                return status, headers, body
            else:
                raise AssertionError(event)

    def expect(self, n: int, method: str = "GET") -> None:
        """``n`` requests of ``method`` went out raw: their answers are to be read."""
        self.methods += [method] * n

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def _request(
    method: str, path: str, body: bytes = b"", token: str | None = None, extra: str = ""
) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n"
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    return (head + extra + "\r\n").encode() + body


async def _post_json(conn: Conn, path: str, body: bytes, token: str) -> bytes:
    await conn.send(_request("POST", path, body, token, "Content-Type: application/json\r\n"))
    conn.expect(1)
    status, _, answer = await conn.answer()
    assert status == 201, answer
    return answer


async def _guest(conn: Conn) -> tuple[str, int]:
    """A guest and its persistent pool, made through the (ASGI) control routes."""
    admin = ADMIN["Authorization"].split()[1]
    token = re.search(
        rb'"token":\s*"([^"]+)"', await _post_json(conn, "/v1/guests", b'{"name": "vm"}', admin)
    )
    assert token is not None
    guest = token.group(1).decode()
    answer = await _post_json(conn, "/v1/pools", b'{"kind": "persistent"}', guest)
    pool = re.search(rb'"pool_id":\s*(\d+)', answer)
    assert pool is not None
    return guest, int(pool.group(1))


_DATE = re.compile(rb"^date: [^\r]*\r\n", re.MULTILINE)


async def test_protocol_answers_with_the_bytes_of_the_asgi_path(
    tmp_path: Path, sqlite_url: str
) -> None:
    # Every request of the front door's differential list, sent as is and with "?" appended
    # (a query string always takes the ASGI path; the routes ignore it): the same bytes back,
    # but for the date header. The status/body/content type also match the full stack's
    # (tests/api/test_front.py checks HotRoutes against it with the same list).
    async with _serve(tmp_path, sqlite_url) as (_, port, answered):
        conn = await Conn.open(port)
        guest, pool = await _guest(conn)
        tokens = {"guest": guest, "admin": ADMIN["Authorization"].split()[1], "bad": "nope"}
        statuses = []
        for method, path, body, ctype, who in REQUESTS:
            target = path.format(pool=pool)
            extra = f"Content-Type: {ctype}\r\n" if ctype else ""
            raws = []
            for suffix in ("", "?"):
                data = _request(method, target + suffix, body, tokens.get(who), extra)
                conn.raw = b""
                await conn.send(data)
                conn.expect(1, method)
                status, _, _ = await conn.answer()
                raws.append(_DATE.sub(b"", conn.raw))
                if status == 413:  # the ASGI path answers before reading the body and
                    await conn.close()  # h11 then refuses the rest: a fresh connection
                    conn = await Conn.open(port)
            assert raws[0] == raws[1], (method, target, raws)
            statuses.append(status)
        await conn.close()
    # the protocol itself answered the single-page requests and batches it can (not the HEAD,
    # PATCH, 413, trailing-slash, empty-oid, GET-a-batch and control ones)
    assert answered.count("PUT") == 4 and answered.count("GET") == 10
    assert answered.count("DELETE") == 1 and answered.count("POST") == 3
    assert {204, 200, 404, 400, 401, 403, 405, 413} <= set(statuses)


async def test_pipelined_requests_keep_their_order(tmp_path: Path, sqlite_url: str) -> None:
    async with _serve(tmp_path, sqlite_url) as (_, port, answered):
        conn = await Conn.open(port)
        guest, pool = await _guest(conn)
        p = f"/v1/pools/{pool}/objects/3/pages/"
        burst = [
            _request("PUT", p + "0", page(1), guest),
            _request("GET", p + "0", b"", guest),
            _request("GET", "/v1/self", b"", guest),  # the ASGI path, between fast ones
            _request("GET", p + "0", b"", guest),
            _request("PUT", p + "1?x", page(2), guest),  # ASGI
            _request("GET", p + "1", b"", guest),
            _request("DELETE", p + "0", b"", guest),
            _request("GET", p + "0", b"", guest),
        ]
        await conn.send(b"".join(burst))
        conn.expect(len(burst))
        answers = [await conn.answer() for _ in burst]
        await conn.close()
    assert [a[0] for a in answers] == [204, 200, 200, 200, 204, 200, 204, 404]
    assert answers[1][2] == answers[3][2] == page(1) and answers[5][2] == page(2)
    assert b'"guest_id"' in answers[2][2]
    # the two before /v1/self were answered by the protocol; the ones parsed while the ASGI
    # answer was in flight queued in uvicorn's pipeline behind it
    assert answered == ["PUT", "GET"]


async def test_a_request_split_across_segments(tmp_path: Path, sqlite_url: str) -> None:
    async with _serve(tmp_path, sqlite_url) as (_, port, answered):
        conn = await Conn.open(port)
        guest, pool = await _guest(conn)
        data = _request("PUT", f"/v1/pools/{pool}/objects/5/pages/9", page(7), guest)
        # mid request line, mid header, mid head end, mid body: each its own segment
        cuts = [0, 7, 30, data.index(b"\r\n\r\n") + 2, len(data) - 4000, len(data) - 1, len(data)]
        for a, b in itertools.pairwise(cuts):
            await conn.send(data[a:b])
            await asyncio.sleep(0.02)
        conn.expect(2)
        assert (await conn.answer())[0] == 204
        await conn.send(_request("GET", f"/v1/pools/{pool}/objects/5/pages/9", b"", guest))
        status, _, body = await conn.answer()
        await conn.close()
    assert (status, body) == (200, page(7))
    assert answered == ["PUT", "GET"]


async def test_connection_close_and_http_1_0(tmp_path: Path, sqlite_url: str) -> None:
    async with _serve(tmp_path, sqlite_url) as (_, port, answered):
        conn = await Conn.open(port)
        guest, pool = await _guest(conn)
        target = f"/v1/pools/{pool}/objects/1/pages/1"
        await conn.send(_request("PUT", target, page(3), guest))
        conn.expect(1)
        assert (await conn.answer())[0] == 204
        for request in (
            _request("GET", target, b"", guest, "Connection: close\r\n"),
            _request("GET", target, b"", guest).replace(b"HTTP/1.1", b"HTTP/1.0", 1),
        ):
            fresh = await Conn.open(port)
            await fresh.send(request)
            data = await asyncio.wait_for(fresh.reader.read(), 10)  # to the server's close
            await fresh.close()
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nconnection: close" in head
            assert body == page(3)
        await conn.close()
    assert answered == ["PUT", "GET", "GET"]


async def test_durable_answers_wait_for_the_journal(tmp_path: Path, sqlite_url: str) -> None:
    # With a durable journal the core call is made at once and the answer waits for the
    # journal's barrier; requests pipelined behind it wait their turn; what was acknowledged
    # is there after a restart. Every answer is timed in tmem_request_duration_seconds.
    async with _serve(tmp_path, sqlite_url, durability="sync") as (_, port, answered):
        conn = await Conn.open(port)
        guest, pool = await _guest(conn)
        p = f"/v1/pools/{pool}/objects/4/pages/"
        one_by_one = [
            ("PUT", _request("PUT", p + "0", page(0), guest), 204),
            ("GET", _request("GET", p + "0", b"", guest), 200),
            ("DELETE", _request("DELETE", p + "0", b"", guest), 204),
            ("GET", _request("GET", p + "0", b"", guest), 404),
            ("PUT", _request("PUT", p + "0", page(9), guest), 204),
        ]
        for method, request, want in one_by_one:
            await conn.send(request)
            conn.expect(1, method)
            assert (await conn.answer())[0] == want
        assert answered == [method for method, _, _ in one_by_one]
        burst = [_request("PUT", p + str(i), page(i), guest) for i in range(1, 4)]
        burst += [_request("GET", p + str(i), b"", guest) for i in range(1, 4)]
        await conn.send(b"".join(burst))
        conn.expect(len(burst))
        answers = [await conn.answer() for _ in burst]
        await conn.send(_request("GET", "/metrics", b"", ADMIN["Authorization"].split()[1]))
        conn.expect(1)
        _, _, metrics = await conn.answer()
        await conn.close()
    assert [a[0] for a in answers] == [204, 204, 204, 200, 200, 200]
    assert [a[2] for a in answers[3:]] == [page(1), page(2), page(3)]
    count = re.search(
        rb'tmem_request_duration_seconds_count\{family="guest_pages"\} (\d+)', metrics
    )
    assert count is not None and int(count.group(1)) == len(one_by_one) + len(burst)
    async with _serve(tmp_path, sqlite_url, durability="sync") as (_, port, _answered):
        conn = await Conn.open(port)
        await conn.send(b"".join(_request("GET", p + str(i), b"", guest) for i in range(4)))
        conn.expect(4)
        after = [await conn.answer() for _ in range(4)]
        await conn.close()
    assert [(status, body) for status, _, body in after] == [(200, page(i)) for i in (9, 1, 2, 3)]


async def test_idle_connections_close_after_the_keep_alive_timeout(
    tmp_path: Path, sqlite_url: str
) -> None:
    async with _serve(tmp_path, sqlite_url, keep_alive=2) as (_, port, answered):
        conn = await Conn.open(port)
        guest, pool = await _guest(conn)
        target = f"/v1/pools/{pool}/objects/1/pages/1"
        # busy for over two timeouts: requests every 0.25 s keep the connection open (the
        # one timer armed after the first answer finds it busy and checks again)
        for _ in range(20):
            await conn.send(_request("GET", target, b"", guest))
            conn.expect(1)
            assert (await conn.answer())[0] == 404
            await asyncio.sleep(0.25)
        # then idle: the server closes it
        assert await asyncio.wait_for(conn.reader.read(), 30) == b""
        await conn.close()
    assert answered == ["GET"] * 20


@pytest.mark.parametrize(
    "head",
    [
        "PUT {t} HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n",
        "PUT {t} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n",
        "GET {t} HTTP/1.1\r\nHost: t\r\nAuthorization: Basic eDp5\r\n",
        "GET {t} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer\r\n",
        "GET {t}%30 HTTP/1.1\r\nHost: t\r\n",
    ],
)
async def test_unusual_requests_get_a_4xx_never_a_5xx(
    tmp_path: Path, sqlite_url: str, head: str
) -> None:
    async with _serve(tmp_path, sqlite_url) as (_, port, _answered):
        conn = await Conn.open(port)
        _, pool = await _guest(conn)
        await conn.close()
        fresh = await Conn.open(port)
        target = f"/v1/pools/{pool}/objects/1/pages/1"
        await fresh.send(head.format(t=target).encode() + b"\r\n" + b"5\r\nhello\r\n0\r\n\r\n")
        data = await asyncio.wait_for(fresh.reader.read(1024), 10)
        await fresh.close()
    status = int(data.split(b" ", 2)[1])
    assert 400 <= status < 500, data


@pytest.mark.parametrize(("failure", "status"), [("store", 503), ("bug", 500)])
async def test_a_failed_journal_barrier_never_acknowledges(
    tmp_path: Path, sqlite_url: str, failure: str, status: int
) -> None:
    # The put reached the core but its record was not confirmed: the answer is the ASGI
    # path's (503 journal_unavailable for a journal error, uvicorn's 500 and a close for
    # anything else), never a 204.
    from broker.store.errors import StoreError

    async with _serve(tmp_path, sqlite_url, durability="sync") as (front, port, answered):
        conn = await Conn.open(port)
        guest, pool = await _guest(conn)
        service = front.pages.box.service
        assert service is not None
        journal = service.journal
        barrier = journal.barrier

        async def failing() -> None:
            await barrier()
            raise StoreError("the disk is gone") if failure == "store" else RuntimeError("bug")

        journal.barrier = failing
        target = f"/v1/pools/{pool}/objects/6/pages/0"
        await conn.send(_request("PUT", target, page(6), guest))
        conn.expect(1, "PUT")
        got, _, body = await conn.answer()
        journal.barrier = barrier
        if failure == "store":  # the connection keeps serving
            await conn.send(_request("GET", "/v1/self", b"", guest))
            conn.expect(1)
            assert (await conn.answer())[0] == 200
        else:
            assert await asyncio.wait_for(conn.reader.read(), 10) == b""
        await conn.close()
    assert got == status and answered == ["PUT"]
    if failure == "store":
        assert b"journal_unavailable" in body


def _batch_request(pool: int, body: bytes, token: str | None, suffix: str = "") -> bytes:
    return _request(
        "POST", f"/v1/pools/{pool}/batch{suffix}", body, token, f"Content-Type: {BATCH}\r\n"
    )


async def test_batches_answer_with_the_bytes_of_the_asgi_path(
    tmp_path: Path, sqlite_url: str
) -> None:
    # Each batch twice, through the protocol and with "?" (uvicorn's ASGI path): puts, gets
    # (hits are written with writev from the stored pages: 64 of them, 256 KiB, more than the
    # socket takes at once), mixed, misses, and every refusal; the same bytes but the date.
    async with _serve(tmp_path, sqlite_url) as (_, port, answered):
        conn = await Conn.open(port)
        guest, pool = await _guest(conn)
        puts = _batch(*[(1, 11, i, page(100 + i)) for i in range(64)])
        gets = _batch(*[(2, 11, i, None) for i in range(64)])
        cases: list[tuple[int | str, bytes, str | None, int]] = [
            (pool, puts, guest, 200),  # (idempotent: the second put stores the same pages)
            (pool, gets, guest, 200),
            (pool, _batch((2, 11, 3, None), (2, 12, 0, None), (1, 12, 1, page(5))), guest, 200),
            (pool, _batch((3, 11, 63, None), (2, 11, 63, None), (4, 13, 0, None)), guest, 200),
            (pool, b"", guest, 200),  # an empty batch
            (pool, _batch(*[(2, 11, i, None) for i in range(65)]), guest, 400),  # > max ops
            (pool, _batch((7, 9, 0, None)), guest, 400),  # unknown op
            (pool, b"\x01" + b"\x00" * 40, guest, 400),  # truncated
            (pool, gets, "nope", 401),
            (pool, gets, None, 401),
            (pool, gets, ADMIN["Authorization"].split()[1], 403),
            (99, gets, guest, 404),  # unknown pool
            ("x", gets, guest, 400),
            (pool, b"\x02" * (64 * 4125 + 1), guest, 413),  # past max_batch_bytes: ASGI's
        ]
        for target, body, token, want in cases:
            raws = []
            for suffix in ("", "?"):
                conn.raw = b""
                await conn.send(_request("POST", f"/v1/pools/{target}/batch{suffix}", body, token))
                conn.expect(1, "POST")
                status, _, _ = await conn.answer()
                assert status == want, (target, len(body), token, conn.raw[:300])
                raws.append(_DATE.sub(b"", conn.raw))
                if status == 413:  # answered before the body was read: a fresh connection
                    await conn.close()
                    conn = await Conn.open(port)
            assert raws[0] == raws[1], (target, len(body), token)
        await conn.close()
    assert answered == ["POST"] * (len(cases) - 1)


async def test_pipelined_batches_keep_their_order(tmp_path: Path, sqlite_url: str) -> None:
    async with _serve(tmp_path, sqlite_url) as (_, port, answered):
        conn = await Conn.open(port)
        guest, pool = await _guest(conn)
        p = f"/v1/pools/{pool}/objects/3/pages/"
        gets = _batch(*[(2, 3, i, None) for i in range(4)])
        burst = [
            _batch_request(
                pool, _batch(*[(1, 3, i, page(i)) for i in range(3)], (3, 3, 3, None)), guest
            ),
            _request("GET", p + "1", b"", guest),
            _batch_request(pool, gets, guest),
            _request("PUT", p + "3", page(3), guest),
            _batch_request(pool, gets, guest),
            _request("GET", "/v1/self", b"", guest),  # the ASGI path, between fast ones
            _batch_request(pool, gets, guest),  # ASGI too: parsed while /v1/self was answered
            _batch_request(pool, gets, guest, "?"),
        ]
        data = b"".join(burst)
        # the whole burst in one send, then again cut mid-head and mid-body of a batch
        for cuts in ([0, len(data)], [0, 200, len(burst[0]) - 4000, len(data)]):
            answered.clear()
            for a, b in itertools.pairwise(cuts):
                await conn.send(data[a:b])
                await asyncio.sleep(0.02)
            conn.expect(len(burst), "POST")
            answers = [await conn.answer() for _ in burst]
            assert [a[0] for a in answers] == [200, 200, 200, 204, 200, 200, 200, 200]
            assert answers[0][2] == b"\x00" * 4 and answers[1][2] == page(1)
            first = b"".join(b"\x00" + page(i) for i in range(3)) + b"\x01"
            every = b"".join(b"\x00" + page(i) for i in range(4))
            assert answers[2][2] == first and answers[4][2] == answers[6][2] == every
            assert answers[7][2] == every and b'"guest_id"' in answers[5][2]
            # the ones parsed while the ASGI answer was in flight queued behind it
            assert answered == ["POST", "GET", "POST", "PUT", "POST"]
        await conn.close()


async def test_durable_batches_wait_for_the_journal(tmp_path: Path, sqlite_url: str) -> None:
    # A batch of puts is answered once the journal's barrier returns; what it acknowledged is
    # there after a restart; batches are timed in tmem_request_duration_seconds{family="batch"}.
    async with _serve(tmp_path, sqlite_url, durability="sync") as (_, port, answered):
        conn = await Conn.open(port)
        guest, pool = await _guest(conn)
        puts = [_batch_request(pool, _batch(*[(1, 8, i + j, page(i + j)) for j in range(4)]), guest)
                for i in (0, 4, 8)]  # fmt: skip
        for request in puts:  # (pipelined, those behind a waiting one would take ASGI's path)
            await conn.send(request)
            conn.expect(1, "POST")
            assert (await conn.answer())[2] == b"\x00" * 4
        await conn.send(_request("GET", "/metrics", b"", ADMIN["Authorization"].split()[1]))
        conn.expect(1)
        _, _, metrics = await conn.answer()
        await conn.close()
    assert answered == ["POST"] * 3
    count = re.search(rb'tmem_request_duration_seconds_count\{family="batch"\} (\d+)', metrics)
    assert count is not None and int(count.group(1)) == 3
    async with _serve(tmp_path, sqlite_url, durability="sync") as (_, port, _answered):
        conn = await Conn.open(port)
        await conn.send(_batch_request(pool, _batch(*[(2, 8, i, None) for i in range(12)]), guest))
        conn.expect(1, "POST")
        _, _, body = await conn.answer()
        await conn.close()
    assert body == b"".join(b"\x00" + page(i) for i in range(12))


async def test_a_rate_limited_batch_is_refused_and_changes_nothing(
    tmp_path: Path, sqlite_url: str
) -> None:
    # a bucket of 8 pages: the first batch of 20 takes it (and borrows), the second is refused
    settings = {"rate_limit_pages": 4, "rate_limit_burst": 2}
    async with _serve(tmp_path, sqlite_url, **settings) as (_, port, answered):
        conn = await Conn.open(port)
        guest, pool = await _guest(conn)
        answers = []
        for oid in (2, 5):
            ops = [(1, oid, i, page(i)) for i in range(20)]
            await conn.send(_batch_request(pool, _batch(*ops), guest))
            conn.expect(1, "POST")
            answers.append(await conn.answer())
        (first, _, stored), (status, headers, body) = answers
        assert first == 200 and stored == b"\x00" * 20
        assert status == 429 and b"rate_limited" in body and "retry-after" in headers
        await conn.send(_request("GET", "/v1/self", b"", guest))  # (no page charged)
        conn.expect(1)
        _, _, info = await conn.answer()
        await conn.close()
    assert answered == ["POST", "POST"]
    stats = re.search(rb'"logical_pages":(\d+).*"puts":(\d+)', info)
    assert stats is not None and stats.groups() == (b"20", b"20"), info
