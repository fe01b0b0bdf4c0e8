"""The pure tmem model: guests, pools, pages, dedup, compression, eviction and accounting.

No I/O and no web, database or asyncio imports; time comes from a clock argument. See
:mod:`broker.core.tmem` for the rules and ``docs/dev/interfaces.md`` for the seam.
"""

from __future__ import annotations

from broker.core.journal import PersistentJournal
from broker.core.model import UNSET, CoreConfig, PoolView, Status, Unset
from broker.core.restore import BatchOp
from broker.core.store import MemoryPageStore, PageStore
from broker.core.tmem import Tmem

__all__ = [
    "UNSET",
    "BatchOp",
    "CoreConfig",
    "MemoryPageStore",
    "PageStore",
    "PersistentJournal",
    "PoolView",
    "Status",
    "Tmem",
    "Unset",
]
