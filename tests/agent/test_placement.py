"""The broker-or-fallback rules and the retry/backoff policy every persistent caller shares."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from guest_agent.client import PutResult
from guest_agent.errors import (
    BadRequest,
    BrokerUnavailable,
    ProtocolError,
    RateLimited,
    ServerError,
    UnknownPool,
)
from guest_agent.placement import Placement, RetryPolicy, aretry, retry
from schemas.wire import Notice

pytestmark = pytest.mark.timeout(10)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def notice(type: Any, **fields: Any) -> Notice:
    return Notice(seq=1, type=type, issued_at=datetime.now(UTC), **fields)


def test_delays_double_up_to_the_cap_and_stop_after_the_attempts() -> None:
    policy = RetryPolicy(attempts=6, backoff=0.05, multiplier=2, max_backoff=0.3)
    assert list(policy.delays()) == [0.05, 0.1, 0.2, 0.3, 0.3]
    assert list(RetryPolicy(attempts=1).delays()) == []
    endless = RetryPolicy(attempts=None).delays()
    assert [next(endless) for _ in range(9)][-3:] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("error", [BrokerUnavailable("down"), ServerError(503, "x", "y")])
def test_retry_waits_out_transient_errors_then_answers(error: Exception) -> None:
    clock = Clock()
    failures = [error, error, RateLimited(429, "slow", "down")]
    retried: list[Exception] = []

    def call() -> str:
        if failures:
            raise failures.pop(0)
        return "page"

    policy = RetryPolicy(attempts=8, backoff=0.05)
    assert retry(call, policy, sleep=clock.sleep, clock=clock, on_retry=retried.append) == "page"
    assert clock.slept == [0.05, 0.1, 0.2] and len(retried) == 3


def test_retry_gives_up_after_the_attempts_with_the_last_error() -> None:
    clock = Clock()
    calls = 0

    def call() -> None:
        nonlocal calls
        calls += 1
        raise BrokerUnavailable(f"down {calls}")

    with pytest.raises(BrokerUnavailable, match="down 3"):
        retry(call, RetryPolicy(attempts=3), sleep=clock.sleep, clock=clock)
    assert calls == 3


def test_retry_stops_at_the_deadline_however_many_attempts_are_left() -> None:
    clock = Clock()

    def call() -> None:
        raise BrokerUnavailable("down")

    policy = RetryPolicy(attempts=None, deadline=2.0)
    with pytest.raises(BrokerUnavailable):
        retry(call, policy, sleep=clock.sleep, clock=clock)
    assert sum(clock.slept) == pytest.approx(2.0)  # the last sleep is cut to the deadline
    assert clock.slept[-1] < 1.0


def test_retry_does_not_retry_a_refusal() -> None:
    clock = Clock()
    with pytest.raises(UnknownPool):
        retry(
            lambda: (_ for _ in ()).throw(UnknownPool(404, "unknown_pool", "gone")),
            RetryPolicy(),
            sleep=clock.sleep,
            clock=clock,
        )
    assert clock.slept == []


async def test_aretry_waits_on_the_event_loop() -> None:
    failures = 2

    async def call() -> int:
        nonlocal failures
        if failures:
            failures -= 1
            raise BrokerUnavailable("restarting")
        return 7

    policy = RetryPolicy(attempts=None, backoff=0.01, deadline=5.0)
    assert await aretry(call, policy) == 7

    async def never() -> int:
        raise BrokerUnavailable("down")

    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(BrokerUnavailable):
        await aretry(never, RetryPolicy(attempts=None, backoff=0.01, deadline=0.1))
    assert 0.09 <= loop.time() - start < 2.0


def test_an_unreachable_broker_is_skipped_for_the_down_interval() -> None:
    clock = Clock()
    placement: Placement[int] = Placement(RetryPolicy(down_interval=1.0), clock=clock)
    assert placement.may_offer()
    assert placement.put_failed(BrokerUnavailable("refused")) is True  # may have landed
    assert placement.broker_down() and not placement.may_offer()
    clock.now += 1.0
    assert placement.may_offer()
    placement.call_failed(BrokerUnavailable("refused"))
    assert not placement.may_offer()
    placement.mark_up()
    assert placement.may_offer()


@pytest.mark.parametrize(
    ("error", "landed"),
    [
        (BadRequest(400, "bad", "x"), False),  # an error answer changed nothing
        (ServerError(500, "internal", "x"), False),
        (ProtocolError("garbled answer"), True),  # no readable answer: it may have landed
        (BrokerUnavailable("reset"), True),
    ],
)
def test_a_failed_put_may_have_landed_unless_the_broker_answered(
    error: Exception, landed: bool
) -> None:
    placement: Placement[int] = Placement()
    assert placement.put_failed(error) is landed


def test_declines_pause_new_pages_or_every_put_until_rechecked() -> None:
    clock = Clock()
    placement: Placement[int] = Placement(RetryPolicy(recheck_interval=5.0), clock=clock)
    placement.cap_pages = 10
    assert placement.room_for(4, held=8) == 2
    placement.note_declines([PutResult(), PutResult("quota")])
    assert placement.room_for(4, held=0) == 0 and placement.may_offer()  # replacements go on
    clock.now += 5.0
    assert placement.room_for(4, held=0) == 4
    placement.note_decline("quota")
    placement.freed()  # a flush gave pages back: no need to wait
    assert placement.room_for(1, held=0) == 1
    placement.note_decline("frozen")
    assert not placement.may_offer() and placement.frozen()
    clock.now += 5.0
    assert placement.may_offer()


def test_notices_set_the_cap_and_freeze_until_thaw() -> None:
    clock = Clock()
    placement: Placement[int] = Placement(clock=clock)
    placement.note_decline("quota")
    placement.handle_notice(notice("quota", cap_pages=3))
    assert placement.cap_pages == 3 and placement.room_for(5, held=1) == 2
    placement.handle_notice(notice("freeze"))
    clock.now += 1e6
    assert not placement.may_offer()
    placement.handle_notice(notice("thaw"))
    assert placement.may_offer()


def test_a_policy_without_pauses_offers_every_put() -> None:
    clock = Clock()
    placement: Placement[int] = Placement(
        RetryPolicy(down_interval=0.0, recheck_interval=0.0), clock=clock
    )
    placement.put_failed(BrokerUnavailable("refused"))
    placement.note_decline("frozen")
    placement.note_decline("quota")
    assert placement.may_offer() and placement.room_for(3, held=0) == 3


def test_take_stale_hands_over_the_keys_once() -> None:
    placement: Placement[tuple[int, int]] = Placement()
    placement.stale.update({(1, 2), (3, 4)})
    assert sorted(placement.take_stale()) == [(1, 2), (3, 4)]
    assert placement.take_stale() == [] and not placement.stale


def test_retry_goes_on_from_a_first_try_the_caller_made() -> None:
    clock = Clock()
    started = clock()
    clock.now += 1.5  # the caller's own first try took this long and failed
    calls = 0

    def call() -> None:
        nonlocal calls
        calls += 1
        raise BrokerUnavailable("down")

    policy = RetryPolicy(attempts=None, backoff=0.25, deadline=2.0)
    with pytest.raises(BrokerUnavailable):
        retry(
            call,
            policy,
            sleep=clock.sleep,
            clock=clock,
            failed=BrokerUnavailable("first"),
            started=started,
        )
    # it slept before its first call, and the deadline counts from the caller's try
    assert clock.slept[0] == 0.25 and clock.now == pytest.approx(started + 2.0)
    assert calls == len(clock.slept) == 2  # each sleep is followed by one call
