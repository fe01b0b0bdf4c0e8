"""Shed notices move broker blocks to the fallback file and are acked with the count."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from guest_agent.nbd.backend import BLOCK_SIZE
from guest_agent.nbd.broker_backend import BROKER, FALLBACK, BrokerBackend
from guest_agent.nbd.errors import BackendError
from guest_agent.nbd.notices import follow_notices, handle_notice, latest_seq
from schemas.wire import Notice
from tests.nbd.test_broker_backend import FakeClient, page

pytestmark = pytest.mark.timeout(30)


def notice(seq: int, type_: str, pages: int | None = None) -> Notice:
    return Notice.model_validate(
        {"seq": seq, "type": type_, "issued_at": datetime.now(UTC), "pages": pages}
    )


class FakeNotices:
    """A notice feed: ``notices(after)`` returns queued notices past ``after``."""

    def __init__(self, backlog: list[Notice]) -> None:
        self.feed = list(backlog)
        self.acks: list[tuple[int, int]] = []
        self.acked = asyncio.Event()
        self.polls: list[int] = []

    async def notices(self, after: int = 0, wait: float = 0) -> list[Notice]:
        self.polls.append(after)
        out = [n for n in self.feed if n.seq > after]
        if not out and wait:
            await asyncio.sleep(0.01)
        return out

    async def ack(self, seq: int, pages_returned: int = 0) -> None:
        self.acks.append((seq, pages_returned))
        self.acked.set()


async def backend_with_pages(tmp_path: Path, n: int) -> BrokerBackend:
    backend = await BrokerBackend.open(
        FakeClient(), size=1024 * BLOCK_SIZE, fallback_path=str(tmp_path / "fb")
    )
    await backend.write_blocks([(b, page(b)) for b in range(n)])
    return backend


async def test_shed_notice_is_handled_and_acked_with_the_count(tmp_path: Path) -> None:
    backend = await backend_with_pages(tmp_path, 50)
    feed = FakeNotices([])
    assert await handle_notice(notice(3, "shed", pages=80), backend.shed, feed) == 50
    assert feed.acks == [(3, 50)]
    assert backend.count(FALLBACK) == 50 and backend.count(BROKER) == 0
    assert await handle_notice(notice(4, "quota"), backend.shed, feed) == 0
    assert feed.acks == [(3, 50)]  # only sheds are acked with a count
    await backend.close()


async def test_latest_seq_skips_the_backlog() -> None:
    feed = FakeNotices([notice(1, "shed", pages=10), notice(2, "thaw")])
    assert await latest_seq(feed) == 2
    assert await latest_seq(FakeNotices([])) == 0


async def test_follower_acts_on_each_streamed_shed_and_survives_failures(
    tmp_path: Path,
) -> None:
    backend = await backend_with_pages(tmp_path, 40)
    feed = FakeNotices([])
    queue: asyncio.Queue[Notice] = asyncio.Queue()

    async def stream() -> AsyncIterator[Notice]:
        while True:
            yield await queue.get()

    calls: list[int] = []

    async def shed(pages: int) -> int:
        calls.append(pages)
        if pages == 13:
            raise BackendError("broker unreachable")
        return await backend.shed(pages)

    task = asyncio.create_task(follow_notices(stream(), shed, feed))
    await queue.put(notice(5, "shed", pages=13))  # fails: logged, not acked
    await queue.put(notice(6, "quota"))
    await queue.put(notice(7, "shed", pages=15))
    await asyncio.wait_for(feed.acked.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == [13, 15]
    assert feed.acks == [(7, 15)]
    assert backend.count(FALLBACK) == 15
    assert await backend.read_blocks(list(range(40))) == [page(b) for b in range(40)]
    await backend.close()
