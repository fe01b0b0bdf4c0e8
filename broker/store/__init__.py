"""Where page bytes and persistent-page records live (see docs/dev/interfaces.md).

``open_journal(settings)`` picks the journal: :class:`LmdbJournal` for ``--durability sync``,
:class:`NullJournal` for ``none``; ``reload_journal`` puts persistent pages back at start.
"""

from __future__ import annotations

from broker.store.durable import LmdbJournal
from broker.store.factory import open_journal
from broker.store.null import NullJournal
from broker.store.reload import ReloadReport, reload_journal

__all__ = ["LmdbJournal", "NullJournal", "ReloadReport", "open_journal", "reload_journal"]
