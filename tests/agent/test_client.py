"""TmemClient and AsyncTmemClient against the in-memory broker (MockTransport)."""

from __future__ import annotations

import json

import pytest

from guest_agent import AsyncTmemClient, PutResult, TmemClient
from guest_agent.errors import (
    AuthError,
    BadRequest,
    BrokerError,
    BrokerUnavailable,
    Conflict,
    Forbidden,
    ProtocolError,
    RateLimited,
    ServerError,
    UnknownPool,
)
from guest_agent.transport import MockTransport, Request, Response
from schemas.batch import OP_FLUSH_PAGE, OP_GET, OP_PUT, STATUS_DONE, STATUS_MISS

from .fake_broker import FakeBroker

pytestmark = pytest.mark.timeout(30)


def page(n: int) -> bytes:
    return n.to_bytes(8, "big") * 512


@pytest.fixture
def broker() -> FakeBroker:
    return FakeBroker(cap_pages=5)


@pytest.fixture
def client(broker: FakeBroker) -> TmemClient:
    return TmemClient("http://broker", "tok", transport=broker.transport(), max_batch_ops=7)


def test_put_get_flush_round_trip(client: TmemClient) -> None:
    pool = client.create_pool("persistent")
    r = client.put(pool, 2**191 + 5, 9, page(1))
    assert r and r.stored and r.reason is None
    assert client.get(pool, 2**191 + 5, 9) == page(1)
    assert client.get(pool, 2**191 + 5, 9) == page(1)  # persistent gets are non-destructive
    client.flush_page(pool, 2**191 + 5, 9)
    assert client.get(pool, 2**191 + 5, 9) is None
    client.flush_page(pool, 2**191 + 5, 9)  # idempotent


def test_declined_put_is_a_falsy_result_with_the_reason(
    broker: FakeBroker, client: TmemClient
) -> None:
    pool = client.create_pool("persistent")
    for i in range(5):
        assert client.put(pool, 1, i, page(i))
    declined = client.put(pool, 1, 99, page(99))
    assert not declined
    assert declined.reason == "quota"
    assert declined == PutResult("quota")
    broker.frozen = True
    frozen = client.put(pool, 1, 0, page(7))
    assert not frozen and frozen.reason == "frozen"
    # the declined put flushed the old copy: no stale page comes back
    assert client.get(pool, 1, 0) is None


def test_flush_object_and_destroy_pool(broker: FakeBroker, client: TmemClient) -> None:
    pool = client.create_pool("persistent")
    for i in range(3):
        client.put(pool, 4, i, page(i))
    client.put(pool, 5, 0, page(50))
    client.flush_object(pool, 4)
    assert [client.get(pool, 4, i) for i in range(3)] == [None, None, None]
    assert client.get(pool, 5, 0) == page(50)
    client.destroy_pool(pool)
    with pytest.raises(UnknownPool) as info:
        client.get(pool, 5, 0)
    assert info.value.status == 404 and info.value.code == "unknown_pool"


def test_ephemeral_private_get_is_exclusive(client: TmemClient) -> None:
    pool = client.create_pool("ephemeral")
    client.put(pool, 1, 1, page(3))
    assert client.get(pool, 1, 1) == page(3)
    assert client.get(pool, 1, 1) is None


def test_batches_are_chunked_to_the_limit(broker: FakeBroker, client: TmemClient) -> None:
    broker.cap_pages = None
    pool = client.create_pool("persistent")
    items = [(i // 4, i, page(i)) for i in range(30)]
    results = client.put_many(pool, items)
    assert results == [PutResult()] * 30
    assert broker.batch_sizes == [7, 7, 7, 7, 2]
    handles = [(i // 4, i) for i in range(32)]
    pages = client.get_many(pool, handles)
    assert pages[:30] == [page(i) for i in range(30)]
    assert pages[30:] == [None, None]
    client.flush_many(pool, handles[:10])
    assert client.get_many(pool, handles[:11]) == [None] * 10 + [page(10)]
    raw = client.batch(
        pool,
        [
            (OP_PUT, 1, 1, page(1)),
            (OP_GET, 1, 1, None),
            (OP_FLUSH_PAGE, 1, 1, None),
            (OP_GET, 1, 1, None),
        ],
    )
    assert [r.status for r in raw] == [STATUS_DONE, STATUS_DONE, STATUS_DONE, STATUS_MISS]
    assert raw[1].page == page(1)


def test_put_many_reports_each_decline(broker: FakeBroker, client: TmemClient) -> None:
    pool = client.create_pool("persistent")
    results = client.put_many(pool, [(0, i, page(i)) for i in range(8)])
    assert [bool(r) for r in results] == [True] * 5 + [False] * 3
    assert {r.reason for r in results[5:]} == {"quota"}


def test_self_notices_ack_pressure(broker: FakeBroker, client: TmemClient) -> None:
    client.create_pool("persistent")
    info = client.self_info()
    assert info.cap_pages == 5 and info.pools[0].kind == "persistent"
    broker.add_notice("quota", cap_pages=3)
    seq = broker.add_notice("shed", pages=2)
    notices = client.notices(after=0)
    assert [(n.seq, n.type) for n in notices] == [(1, "quota"), (2, "shed")]
    assert notices[0].cap_pages == 3
    assert [n.seq for n in client.notices(after=1)] == [2]
    client.ack(seq, 2)
    assert broker.acks == [(2, 2)]
    client.report_pressure(psi_some_avg10=1.5, mem_available_bytes=100)
    assert broker.pressure == [{"psi_some_avg10": 1.5, "mem_available_bytes": 100}]


def test_bad_arguments_never_reach_the_broker(broker: FakeBroker, client: TmemClient) -> None:
    pool = client.create_pool("persistent")
    sent = len(broker.requests)
    with pytest.raises(ValueError):
        client.put(pool, 1, 1, b"short")
    with pytest.raises(ValueError):
        client.put(pool, 2**192, 1, page(1))
    with pytest.raises(ValueError):
        client.get(pool, 1, 2**32)
    with pytest.raises(ValueError):
        client.put_many(pool, [(1, 1, b"x")])
    assert len(broker.requests) == sent


def _answer(status: int, body: object, headers: dict[str, str] | None = None) -> MockTransport:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return MockTransport(lambda request: Response(status, raw, headers or {}))


@pytest.mark.parametrize(
    ("status", "code", "exc"),
    [
        (400, "bad_page_size", BadRequest),
        (413, "too_large", BadRequest),
        (422, "validation", BadRequest),
        (401, "unauthorised", AuthError),
        (403, "not_authorised", Forbidden),
        (404, "unknown_pool", UnknownPool),
        (409, "too_many_pools", Conflict),
        (429, "rate_limited", RateLimited),
        (500, "internal", ServerError),
        (503, "starting", ServerError),
    ],
)
def test_error_statuses_map_to_the_tree(status: int, code: str, exc: type[BrokerError]) -> None:
    body = {"error": {"code": code, "message": "m"}}
    client = TmemClient("http://b", "t", transport=_answer(status, body, {"retry-after": "2"}))
    with pytest.raises(exc) as info:
        client.get(0, 1, 1)
    assert info.value.status == status and info.value.code == code
    if isinstance(info.value, RateLimited):
        assert info.value.retry_after == 2.0


def test_non_json_error_and_bad_bodies() -> None:
    client = TmemClient("http://b", "t", transport=_answer(502, b"<html>bad gateway</html>"))
    with pytest.raises(ServerError) as info:
        client.self_info()
    assert info.value.code == "http_502"
    client = TmemClient("http://b", "t", transport=_answer(200, b"short page"))
    with pytest.raises(ProtocolError):
        client.get(0, 1, 1)
    client = TmemClient("http://b", "t", transport=_answer(200, b"\x00\x00"))
    with pytest.raises(ProtocolError):
        client.get_many(0, [(1, 1)])
    # two hits' length, read at once when every status byte is done; else page by page
    hits = b"\x00" + page(1) + b"\x00" + page(2)
    client = TmemClient("http://b", "t", transport=_answer(200, hits))
    assert client.get_many(0, [(1, 1), (1, 2)]) == [page(1), page(2)]
    for bad in (b"\x00" + page(1) + b"\x02" + page(2), b"\x01" + page(1) + b"\x00" + page(2)):
        client = TmemClient("http://b", "t", transport=_answer(200, bad))
        with pytest.raises(ProtocolError):
            client.get_many(0, [(1, 1), (1, 2)])


def test_unreachable_broker_raises_broker_unavailable(
    broker: FakeBroker, client: TmemClient
) -> None:
    broker.down = True
    with pytest.raises(BrokerUnavailable):
        client.create_pool("persistent")


def test_requests_carry_the_token_and_content_types() -> None:
    seen: list[Request] = []

    def handler(request: Request) -> Response:
        seen.append(request)
        return Response(204)

    client = TmemClient("http://b", "secret", transport=MockTransport(handler))
    client.put(3, 10, 11, page(1))
    client.flush_object(3, 10)
    request = seen[0]
    assert (request.method, request.target) == ("PUT", "/v1/pools/3/objects/10/pages/11")
    assert ("Authorization", "Bearer secret") in request.headers
    assert ("Content-Type", "application/octet-stream") in request.headers
    assert seen[1].target == "/v1/pools/3/objects/10"


async def test_async_client_has_the_same_calls(broker: FakeBroker) -> None:
    broker.cap_pages = 3
    async with AsyncTmemClient(
        "http://broker", "tok", transport=broker.transport(), max_batch_ops=2
    ) as client:
        pool = await client.create_pool("persistent")
        assert await client.put(pool, 1, 1, page(1))
        assert await client.get(pool, 1, 1) == page(1)
        results = await client.put_many(pool, [(2, i, page(i)) for i in range(4)])
        assert [r.reason for r in results] == [None, None, "quota", "quota"]
        assert await client.get_many(pool, [(2, 0), (2, 1), (2, 2)]) == [page(0), page(1), None]
        await client.flush_page(pool, 1, 1)
        assert await client.get(pool, 1, 1) is None
        await client.flush_many(pool, [(2, 0)])
        await client.flush_object(pool, 2)
        assert await client.get_many(pool, [(2, 1)]) == [None]
        info = await client.self_info()
        assert info.cap_pages == 3
        seq = broker.add_notice("shed", pages=1)
        assert [n.seq for n in await client.notices()] == [seq]
        await client.ack(seq, 1)
        await client.report_pressure(swap_used_bytes=4096)
        await client.destroy_pool(pool)
        with pytest.raises(UnknownPool):
            await client.get(pool, 1, 1)
    assert broker.acks == [(seq, 1)]


async def test_async_mock_transport_accepts_async_handlers() -> None:
    async def handler(request: Request) -> Response:
        return Response(
            409,
            json.dumps(
                {"error": {"code": "not_stored", "message": "m", "reason": "capacity"}}
            ).encode(),
        )

    client = AsyncTmemClient("http://b", "t", transport=MockTransport(handler))
    result = await client.put(0, 1, 1, page(1))
    assert not result and result.reason == "capacity"


def test_put_batch_answers_are_checked() -> None:
    client = TmemClient("http://b", "t", transport=_answer(200, b"\x00"))
    with pytest.raises(ProtocolError):
        client.put_many(0, [(1, 1, page(1)), (1, 2, page(2))])
    client = TmemClient("http://b", "t", transport=_answer(200, b"\x00\x01"))
    with pytest.raises(ProtocolError):
        client.put_many(0, [(1, 1, page(1)), (1, 2, page(2))])
    client = TmemClient("http://b", "t", transport=_answer(200, b"\x00\x05"))
    assert [r.reason for r in client.put_many(0, [(1, 1, page(1)), (1, 2, page(2))])] == [
        None,
        "policy",
    ]
