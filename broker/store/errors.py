"""Errors of ``broker.store``: the durable journal's failures.

::

    StoreError                  anything the store raises
     └── JournalError           the journal cannot promise durability
          ├── JournalFailed     a commit failed (disk full, I/O error): what was recorded since the
          │                     last good commit is not durable, and no later barrier succeeds
          └── JournalClosed     recorded into or awaited on a journal after close()

The service maps every ``JournalError`` to a 503: a persistent put is never acknowledged unless
the journal confirmed it.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error ``broker.store`` raises."""


class JournalError(StoreError):
    """The journal cannot promise that recorded changes are durable."""


class JournalFailed(JournalError):
    """A commit failed; the journal refuses every later barrier (restart the broker)."""


class JournalClosed(JournalError):
    """The journal was closed."""
