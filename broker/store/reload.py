"""Putting persistent pages back into the core when the broker starts.

Usage, in the lifespan, after the service restored guests and pools from SQL::

    report = await reload_journal(journal, tmem)

Pages of a pool the core does not know (destroyed: the destroy is in SQL, and the journal
record of it was lost or the pool row went with its guest) are dropped from the journal with a
log line, never resurrected. Progress is logged every ``every_pages`` pages or ``every_seconds``
seconds, with the rate. Pages come from the journal in chunks of at most ``chunk`` pages of one
pool and go into the core with one ``Tmem.restore_pages`` call each; the loop yields to the
event loop after every chunk so ``/readyz`` can answer 503 while it runs.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from broker.core.errors import UnknownGuest, UnknownPool
from broker.store.durable import LmdbJournal

log = logging.getLogger(__name__)


class _PoolView(Protocol):
    pool_id: int
    kind: str


class RestoreTarget(Protocol):
    """What reload needs of the core (``broker.core.Tmem`` has it)."""

    def has_guest(self, guest_id: int) -> bool: ...

    def pools(self, guest_id: int) -> Iterable[Any]: ...

    def restore_pages(
        self, guest_id: int, pool_id: int, pages: Iterable[tuple[int, int, bytes]]
    ) -> int: ...


@dataclass
class ReloadReport:
    """What a reload did: pages restored, pools dropped, seconds taken and the rate."""

    pages: int = 0
    dropped_pools: list[tuple[int, int]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def pages_per_second(self) -> float:
        return self.pages / self.seconds if self.seconds > 0 else 0.0


def _persistent_pools(tmem: RestoreTarget, guest_id: int) -> set[int]:
    return {
        int(p.pool_id)
        for p in tmem.pools(guest_id)
        if getattr(p, "kind", "persistent") == "persistent"
    }


async def reload_journal(
    journal: object,
    tmem: RestoreTarget,
    *,
    every_pages: int = 100_000,
    every_seconds: float = 5.0,
    chunk: int = 2048,
    clock: Callable[[], float] = time.monotonic,
) -> ReloadReport:
    """Restore every journaled persistent page into ``tmem``; see the module docstring."""
    report = ReloadReport()
    if not isinstance(journal, LmdbJournal):
        return report  # --durability none: nothing survives a restart
    start = clock()
    known: dict[int, set[int]] = {}
    for guest_id, pool_id in journal.pools():
        if guest_id not in known:
            known[guest_id] = (
                _persistent_pools(tmem, guest_id) if tmem.has_guest(guest_id) else set()
            )
        if pool_id not in known[guest_id]:
            log.warning(
                "journal: dropping the pages of guest %d pool %d: the pool no longer exists "
                "(destroyed), they are not restored",
                guest_id,
                pool_id,
            )
            journal.record_destroy_pool(guest_id, pool_id)
            report.dropped_pools.append((guest_id, pool_id))
    if report.dropped_pools:
        await journal.barrier()

    total = journal.count()
    if total:
        log.info("journal: reloading %d persistent pages", total)
    restore = tmem.restore_pages
    last_log_time = start
    last_log_pages = 0
    n = 0
    gone: set[tuple[int, int]] = set()
    # The cyclic collector off while the core fills: every restored object adds a dict, and
    # with the collector on each few hundred allocations start a pass and the full passes
    # rescan a heap that only grows (measured in bench/reload_bench.py). Nothing built here
    # is cyclic garbage; the collector is restored as it was whatever happens.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for guest_id, pool_id, pages in journal.load_chunks(chunk):
            if (guest_id, pool_id) in gone:
                continue
            try:
                n += restore(guest_id, pool_id, pages)
            except (UnknownGuest, UnknownPool):
                # Destroyed by an admin while we reloaded (the loop yields between chunks);
                # the destroy is journaled, so these pages are gone for good.
                gone.add((guest_id, pool_id))
                log.info("journal: guest %d pool %d went away during the reload", guest_id, pool_id)
                continue
            now = clock()
            if n - last_log_pages >= every_pages or now - last_log_time >= every_seconds:
                log.info(
                    "journal: reloaded %d/%d pages (%.0f pages/s)",
                    n,
                    total,
                    n / max(now - start, 1e-9),
                )
                last_log_time, last_log_pages = now, n
            await asyncio.sleep(0)
    finally:
        if was_enabled:
            gc.enable()
    report.pages = n
    report.seconds = clock() - start
    if n:
        log.info(
            "journal: reloaded %d persistent pages in %.2f s (%.0f pages/s)",
            n,
            report.seconds,
            report.pages_per_second,
        )
    return report
