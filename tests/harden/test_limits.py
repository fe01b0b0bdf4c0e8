"""Limits: body sizes (413), per-guest rate limits (429 + Retry-After), bounded notice waiters,
a bounded notice backlog, and that no guest can use any of them to starve another."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse

from broker.api.errors import RateLimited, TooManyWaiters
from broker.api.limits import GuestLimits, TokenBucket
from broker.app import service_of
from broker.settings import Settings
from schemas.batch import OP_GET, encode_request
from tests.api.conftest import error_code, page, page_url
from tests.harden.conftest import new_guest, new_pool

pytestmark = pytest.mark.timeout(60)
BATCH = {"Content-Type": "application/x-tmem-batch"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the bucket, with a fake clock ---------------------------------------------------------------


def test_token_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    bucket = TokenBucket(rate=10.0, capacity=20.0, tokens=20.0, stamp=0.0)
    assert [bucket.take(1, 0.0) for _ in range(20)] == [0.0] * 20
    assert bucket.take(1, 0.0) == pytest.approx(0.1)  # one token comes back in 0.1 s
    assert bucket.take(1, 0.1) == 0.0
    assert bucket.take(5, 0.2) == pytest.approx(0.4)  # 1 token there, 4 more needed
    assert bucket.take(5, 10.0) == 0.0  # refilled (to 20 at most) and taken
    assert bucket.tokens == pytest.approx(15.0)


def test_a_request_larger_than_the_bucket_passes_when_full_and_leaves_debt() -> None:
    bucket = TokenBucket(rate=10.0, capacity=20.0, tokens=20.0, stamp=0.0)
    assert bucket.take(64, 0.0) == 0.0
    assert bucket.tokens == pytest.approx(-44.0)
    assert bucket.take(1, 0.0) == pytest.approx(4.5)
    assert bucket.take(64, 1.0) > 0  # still in debt


def test_limits_are_per_guest_and_off_by_default() -> None:
    assert not GuestLimits().enabled
    assert not GuestLimits.from_settings(Settings()).enabled
    clock = FakeClock()
    limits = GuestLimits(requests_per_s=2.0, pages_per_s=4.0, burst_s=1.0, clock=clock)
    limits.charge(1)
    limits.charge(1)
    with pytest.raises(RateLimited) as info:
        limits.charge(1)
    assert info.value.retry_after == 1
    limits.charge(2)  # guest 2 has its own bucket
    clock.now += 0.5
    limits.charge(1)  # one request came back
    limits.charge(2, requests=0, pages=1)
    with pytest.raises(RateLimited):
        limits.charge(2, requests=0, pages=5)  # pages: 3 banked, 5 asked, bucket not full...
    limits.charge(3, requests=0, pages=5)  # ...but a full bucket lets a large batch through
    assert limits.refused == 2


def test_waiters_are_counted_per_guest_and_released() -> None:
    limits = GuestLimits(max_waiters=2)
    with limits.waiter(1), limits.waiter(1):
        with pytest.raises(TooManyWaiters), limits.waiter(1):
            pass
        with limits.waiter(2):
            assert limits.waiters(1) == 2 and limits.waiters(2) == 1
    assert limits.waiters(1) == 0
    with limits.waiter(1):
        pass


# -- through the app -----------------------------------------------------------------------------


def test_bodies_beyond_the_limits_are_413(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory()
    _, a = new_guest(client, "a")
    assert new_pool(client, a) == 0
    r = client.post("/v1/pools", content=b"{" + b" " * (65 << 10) + b"}", headers=a)
    assert r.status_code == 413 and error_code(r) == "body_too_large"
    r = client.put(page_url(0, 1, 0), content=bytes(65 << 10), headers=a)
    assert r.status_code == 413 and error_code(r) == "body_too_large"
    r = client.post("/v1/pools/0/batch", content=bytes(1 << 20), headers={**a, **BATCH})
    assert r.status_code == 413 and error_code(r) == "body_too_large"
    assert client.get("/v1/self", headers=a).json()["stats"]["logical_pages"] == 0


def test_a_guest_over_its_request_rate_gets_429_and_others_do_not(
    client_factory: Callable[..., TestClient],
) -> None:
    # 20 requests/s with a 1 s burst: A's 200 back-to-back requests run far past its bucket
    # (the test client is much slower than 2,000 requests/s, but not than 20).
    client = client_factory(rate_limit_requests=20, rate_limit_burst=1)
    _, a = new_guest(client, "a")
    _, b = new_guest(client, "b")
    for headers in (a, b):
        assert new_pool(client, headers) == 0
    a_codes: dict[int, int] = {}
    b_codes: dict[int, int] = {}
    for i in range(200):
        r = client.put(page_url(0, 1, i), content=page(i), headers=a)
        a_codes[r.status_code] = a_codes.get(r.status_code, 0) + 1
        if r.status_code == 429:
            assert error_code(r) == "rate_limited"
            assert int(r.headers["Retry-After"]) >= 1
        if i % 10 == 0:  # B's modest pace stays within its own bucket
            rb = client.put(page_url(0, 1, i), content=page(i), headers=b)
            b_codes[rb.status_code] = b_codes.get(rb.status_code, 0) + 1
    assert a_codes.get(429, 0) > 0 and a_codes.get(204, 0) > 0
    assert b_codes == {204: 20}
    # a refused put stored nothing; the JSON routes are limited too
    stored = client.get("/v1/self", headers=b).json()["stats"]["logical_pages"]
    assert stored == 20
    seen = {client.get("/v1/notices", headers=a).status_code for _ in range(40)}
    assert 429 in seen


def test_the_page_rate_limits_batches_by_their_pages(
    client_factory: Callable[..., TestClient],
) -> None:
    client = client_factory(rate_limit_pages=32, rate_limit_burst=1)
    _, a = new_guest(client, "a")
    _, b = new_guest(client, "b")
    for headers in (a, b):
        assert new_pool(client, headers) == 0
    body = encode_request([(OP_GET, 1, i, None) for i in range(64)])
    first = client.post("/v1/pools/0/batch", content=body, headers={**a, **BATCH})
    assert first.status_code == 200  # a full bucket lets one large batch through
    second = client.post("/v1/pools/0/batch", content=body, headers={**a, **BATCH})
    assert second.status_code == 429 and int(second.headers["Retry-After"]) >= 1
    assert client.get(page_url(0, 1, 0), headers=a).status_code == 429  # in debt
    assert client.post("/v1/pools/0/batch", content=body, headers={**b, **BATCH}).status_code == 200


def test_notice_waiters_are_bounded_per_guest(client_factory: Callable[..., TestClient]) -> None:
    client = client_factory(max_waiters_per_guest=2)
    _, a = new_guest(client, "a")
    _, b = new_guest(client, "b")
    a_token = a["Authorization"].split()[1]
    with (
        client.websocket_connect(f"/v1/notices/ws?token={a_token}"),
        client.websocket_connect("/v1/notices/ws", headers=a),
    ):
        with (
            pytest.raises(WebSocketDenialResponse) as denied,
            client.websocket_connect("/v1/notices/ws", headers=a),
        ):
            pass
        assert denied.value.status_code == 429
        r = client.get("/v1/notices?wait=5", headers=a)  # a long-poll needs a slot too
        assert r.status_code == 429 and error_code(r) == "too_many_waiters"
        assert "Retry-After" in r.headers
        assert client.get("/v1/notices?wait=0", headers=a).status_code == 200  # no wait: no slot
        # B is not affected by A's waiters
        with client.websocket_connect("/v1/notices/ws", headers=b):
            assert client.get("/v1/notices?wait=0.05", headers=b).status_code == 200
    # slots come back when the waiters end
    assert client.get("/v1/notices?wait=0.05", headers=a).status_code == 200


def test_notice_backlog_is_bounded_and_open_sheds_are_kept(
    client_factory: Callable[..., TestClient],
) -> None:
    client = client_factory(max_notices_per_guest=5)
    gid, a = new_guest(client, "a")
    service = service_of(client.app)
    hub = service.hub
    assert client.portal is not None
    deadline = datetime.now(UTC) + timedelta(hours=1)
    shed = client.portal.call(lambda: hub.publish(gid, "shed", pages=3, deadline=deadline))
    for i in range(20):
        client.portal.call(partial(hub.publish, gid, "evicted", pages=i))
    kept = service.repo.notices_after(gid, 0)
    assert len(kept) == 5
    seqs = [n.seq for n in kept]
    assert seqs[0] == shed.seq  # the open shed stays
    assert seqs[1:] == [18, 19, 20, 21]  # the newest; evicted 2..17 were pruned
    # numbers are never reused after pruning
    nxt = client.portal.call(lambda: hub.publish(gid, "thaw"))
    assert nxt.seq == 22
    assert [n["seq"] for n in client.get("/v1/notices", headers=a).json()][-1] == 22
    # once acked, the shed may go too
    assert (
        client.post(
            f"/v1/notices/{shed.seq}/ack", json={"pages_returned": 3}, headers=a
        ).status_code
        == 204
    )
    client.portal.call(lambda: hub.publish(gid, "thaw"))
    assert shed.seq not in [n.seq for n in service.repo.notices_after(gid, 0)]
    assert len(service.repo.notices_after(gid, 0)) == 5
