"""The agent's notice WebSocket follows the guest's home broker, with real processes: two
brokers in cluster mode (the session's Redis Cluster, a fresh PostgreSQL database).

The stream is given the broker that is NOT the guest's home: the handshake's 307 is followed to
the home (pushes, not long polls), and after an admin move of the guest the old home closes the
socket and the reconnect is redirected to the new home, where the next notice is pushed. When
the home is killed, the stream goes back to the broker it was given, which takes the guest over
and pushes from then on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from guest_agent.notices import NoticeStream
from schemas.wire import Notice
from tests.cluster.brokers import ClusterBrokers

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]


@contextlib.asynccontextmanager
async def _following(url: str, token: str) -> AsyncIterator[tuple[NoticeStream, Any]]:
    """A notice stream given ``url`` and its iterator, closed after."""
    stream = NoticeStream(url, token, backoff=0.05, max_backoff=0.5)
    it = stream.__aiter__()
    try:
        yield stream, it
    finally:
        await it.aclose()  # type: ignore[attr-defined]
        await stream.aclose()


async def _next(it: object, timeout: float = 30.0) -> Notice:
    return await asyncio.wait_for(it.__anext__(), timeout)  # type: ignore[attr-defined]


async def _quota_pushed_at(
    stream: NoticeStream, pending: asyncio.Future[Notice], broker: Any, gid: int, cap: int
) -> Notice:
    """Once ``stream`` talks to ``broker`` (``pending`` still waiting), set the guest's cap
    there: ``pending`` gets that quota notice, pushed over the WebSocket."""
    while stream.base_url != broker.url:
        assert not pending.done(), pending
        await asyncio.sleep(0.1)
    await asyncio.to_thread(broker.json, "PATCH", f"/v1/guests/{gid}", {"cap_pages": cap})
    notice = await pending
    assert notice.type == "quota" and notice.cap_pages == cap
    assert stream.transport_in_use == "websocket"
    return notice


def test_notice_websocket_follows_the_home(two_brokers: ClusterBrokers) -> None:
    gid, token, home, other = two_brokers.guest_away("vm-notices")
    other_id = two_brokers.id_of(other)

    async def scenario() -> None:
        async with _following(other.url, token) as (stream, it):
            # the first handshake goes to the non-home broker and lands at the home
            first = asyncio.ensure_future(_next(it))
            await asyncio.sleep(0.5)
            await asyncio.to_thread(home.json, "PATCH", f"/v1/guests/{gid}", {"cap_pages": 1000})
            notice = await first
            assert notice.type == "quota" and notice.cap_pages == 1000
            assert stream.transport_in_use == "websocket"
            assert stream.base_url == home.url and stream.first_url == other.url

            # move the guest: the old home drops it (closing the socket) and the
            # reconnect is redirected to the new home, which pushes the next notice
            moved = await asyncio.to_thread(
                other.json, "POST", f"/v1/guests/{gid}/home", {"broker": other_id}
            )
            assert moved["home_broker"] == other_id
            second = asyncio.ensure_future(_next(it))
            notice = await _quota_pushed_at(stream, second, other, gid, 2000)
            assert stream.base_url == other.url
            assert stream.last_seq == notice.seq

    asyncio.run(scenario())


def test_notice_websocket_finds_the_new_home_after_a_kill(two_brokers: ClusterBrokers) -> None:
    brokers = two_brokers
    gid, token, home, other = brokers.guest_away("vm-notices-kill")
    home_id = brokers.id_of(home)

    async def scenario() -> None:
        async with _following(other.url, token) as (stream, it):
            first = asyncio.ensure_future(_next(it))
            while stream.transport_in_use != "websocket":
                await asyncio.sleep(0.05)
            assert stream.base_url == home.url
            home.kill()
            # the dead home refuses connections: the stream asks the broker it was
            # given again, which takes the guest over once the lease has run out
            await asyncio.to_thread(brokers.wait_home, gid, not_on=home_id)
            await _quota_pushed_at(stream, first, other, gid, 3000)

    asyncio.run(scenario())
