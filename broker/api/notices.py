"""The notices channel: one in-process :class:`NoticeHub` per broker.

Policy code (freeze/thaw, quota changes, later the shed policy) calls
``await hub.publish(guest_id, "shed", pages=..., deadline=...)``: the notice is stored in SQL
under the guest's next sequence number and every long-poll or WebSocket waiting for that guest
wakes. Readers call ``await hub.poll(guest_id, after, wait)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from datetime import datetime

from starlette.concurrency import run_in_threadpool

from broker.db.repo import NoticeRecord, Repository
from schemas.wire import Notice

log = logging.getLogger(__name__)

MAX_WAIT_SECONDS = 60.0
RECENT_NOTICES = 100


def to_wire(record: NoticeRecord) -> Notice:
    return Notice(
        seq=record.seq,
        type=record.type,  # only NoticeType values are stored
        issued_at=record.issued_at,
        cap_pages=record.cap_pages,
        pages=record.pages,
        deadline=record.deadline,
        pool_id=record.pool_id,
    )


class NoticeHub:
    """Stores notices and wakes the guests' waiters; see the module docstring."""

    def __init__(self, repo: Repository, *, max_notices: int = 1000) -> None:
        self._repo = repo
        # Each guest's backlog in SQL is bounded: beyond it, the oldest notices that ask
        # nothing more of the guest are pruned at publish (Repository.prune_notices).
        self.max_notices = max_notices
        self.pruned = 0
        # One event per guest with waiters; publish sets it and drops it, so the next waiter
        # makes a fresh one. A waiter takes the event *before* it queries, so a notice
        # published between its query and its wait still wakes it.
        self._events: dict[int, asyncio.Event] = {}
        self._closing = False
        # how many times each guest was forgotten: a poll that sees the count change ends
        self._forgotten: dict[int, int] = {}
        self.published = 0
        self.issued: dict[str, int] = {}  # notices published since start, by type
        # the latest notices to any guest, as (guest_id, notice): the dashboard's feed
        self.recent: deque[tuple[int, Notice]] = deque(maxlen=RECENT_NOTICES)
        self._active = 0  # polls in progress (they may hold a database connection)
        self._idle = asyncio.Event()
        self._idle.set()

    def _event(self, guest_id: int) -> asyncio.Event:
        event = self._events.get(guest_id)
        if event is None:
            event = self._events[guest_id] = asyncio.Event()
        return event

    def _wake(self, guest_id: int) -> None:
        event = self._events.pop(guest_id, None)
        if event is not None:
            event.set()

    async def publish(
        self,
        guest_id: int,
        type_: str,
        *,
        cap_pages: int | None = None,
        pages: int | None = None,
        deadline: datetime | None = None,
        pool_id: int | None = None,
    ) -> Notice:
        """Store a notice for ``guest_id`` and wake its waiters; returns it with its ``seq``."""
        record = await run_in_threadpool(
            lambda: self._repo.add_notice(
                guest_id,
                type_,
                cap_pages=cap_pages,
                pages=pages,
                deadline=deadline,
                pool_id=pool_id,
            )
        )
        self.pruned += await run_in_threadpool(self._repo.prune_notices, guest_id, self.max_notices)
        self.published += 1
        self.issued[type_] = self.issued.get(type_, 0) + 1
        log.info("notice %s #%d to guest %d", type_, record.seq, guest_id)
        self._wake(guest_id)
        notice = to_wire(record)
        self.recent.append((guest_id, notice))
        return notice

    async def poll(self, guest_id: int, after: int, wait: float) -> list[Notice]:
        """The guest's notices with ``seq > after``; waits up to ``wait`` s when there are none."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(wait, 0.0), MAX_WAIT_SECONDS)
        forgotten = self._forgotten.get(guest_id, 0)
        self._active += 1
        self._idle.clear()
        try:
            while True:
                event = self._event(guest_id)
                records = await run_in_threadpool(self._repo.notices_after, guest_id, after)
                if records:
                    return [to_wire(r) for r in records]
                remaining = deadline - loop.time()
                if remaining <= 0 or self._closing:
                    return []
                if self._forgotten.get(guest_id, 0) != forgotten:
                    return []  # deleted, or served elsewhere now: the caller decides what next
                try:
                    await asyncio.wait_for(event.wait(), remaining)
                except TimeoutError:
                    return []
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    async def ack(self, guest_id: int, seq: int, pages_returned: int) -> bool:
        """Store the guest's ack of notice ``seq``; ``False`` when it has no such notice."""
        record = await run_in_threadpool(self._repo.ack_notice, guest_id, seq, pages_returned)
        if record is not None:
            log.info("guest %d acked notice #%d (%d pages returned)", guest_id, seq, pages_returned)
        return record is not None

    def forget(self, guest_id: int) -> None:
        """End the waits of a guest deleted or no longer served here (a cluster's move): they
        return what there is, maybe nothing (one int per guest ever forgotten)."""
        self._forgotten[guest_id] = self._forgotten.get(guest_id, 0) + 1
        self._wake(guest_id)

    async def close(self, timeout: float = 5.0) -> None:
        """Wake every waiter so long-polls and WebSockets end, and wait (up to ``timeout``
        seconds) until none is left, so the database can be closed under nobody's feet."""
        self._closing = True
        for guest_id in list(self._events):
            self._wake(guest_id)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    @property
    def closing(self) -> bool:
        return self._closing
