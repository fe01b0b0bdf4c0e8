"""``open_journal(settings)``: the one place that picks the journal for ``--durability``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from broker.store.durable import LmdbJournal
from broker.store.null import NullJournal
from broker.store.writer import WAL_BYTES

JOURNAL_DIR = "journal"


def open_journal(settings: Any) -> NullJournal | LmdbJournal:
    """The journal for ``settings.durability``: ``sync`` (default) opens the LMDB journal in
    ``<data_dir>/journal``; ``none`` keeps persistent pages in RAM only, as Xen did, and loses
    them when the broker stops or crashes."""
    durability = getattr(settings, "durability", "sync")
    if durability == "none":
        return NullJournal()
    if durability != "sync":
        raise ValueError(f"unknown durability {durability!r}: use 'sync' or 'none'")
    return LmdbJournal(
        Path(settings.data_dir) / JOURNAL_DIR, wal_bytes=getattr(settings, "journal_log", WAL_BYTES)
    )
