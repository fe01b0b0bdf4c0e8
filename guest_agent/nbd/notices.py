"""Acts on the broker's notices for an export: a ``shed`` moves pages to the fallback file.

``follow_notices`` reads a notice stream (the agent's WebSocket ``NoticeStream``), and for
each shed notice calls ``shed(pages)`` — in the agent, :meth:`BrokerBackend.shed` run through
:meth:`Dispatcher.exclusive` — and acks with the number of pages actually moved. Notices issued before the export started are skipped: the export's
pool is new, so they cannot concern it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from typing import Protocol

from schemas.wire import Notice

log = logging.getLogger(__name__)

Shed = Callable[[int], Awaitable[int]]
"""Moves up to N pages off the broker; returns how many it moved."""


class NoticeClient(Protocol):
    """The calls of :class:`guest_agent.client.AsyncTmemClient` the follower uses."""

    async def notices(self, after: int = 0, wait: float = 0) -> Sequence[Notice]: ...

    async def ack(self, seq: int, pages_returned: int = 0) -> None: ...


async def latest_seq(client: NoticeClient) -> int:
    """The sequence number of the newest notice the guest has (0 when none)."""
    notices = await client.notices(after=0, wait=0)
    return max((n.seq for n in notices), default=0)


async def handle_notice(notice: Notice, shed: Shed, client: NoticeClient) -> int:
    """Act on one notice; returns the pages returned (0 for anything but a shed)."""
    if notice.type != "shed":
        log.info("nbd: notice %s %s", notice.seq, notice.type)
        return 0
    moved = await shed(notice.pages or 0)
    await client.ack(notice.seq, moved)
    log.info("nbd: shed notice %s: moved %d of %s pages", notice.seq, moved, notice.pages)
    return moved


async def follow_notices(notices: AsyncIterable[Notice], shed: Shed, client: NoticeClient) -> None:
    """Handle every notice the stream yields until cancelled (in the agent the stream is a
    :class:`guest_agent.notices.NoticeStream`: WebSocket, long-poll fallback, reconnects);
    a notice whose handling fails is logged and skipped (the broker re-asks a shed that goes
    unanswered)."""
    async for notice in notices:
        try:
            await handle_notice(notice, shed, client)
        except Exception as exc:
            log.warning("nbd: notice %s (%s) failed: %s", notice.seq, notice.type, exc)
