"""Operation counters, kept as operations happen: per pool, per guest and for removed guests.

Figures of a guest or of the whole broker are sums of these over pools and guests, never over
pages (see :mod:`broker.core.figures` for what is shown to whom).
"""

from __future__ import annotations

OP_COUNTERS = (
    "puts",
    "declined_quota",
    "declined_capacity",
    "declined_frozen",
    "declined_policy",
    "gets",
    "get_hits",
    "flushes",
    "flushes_found",
    "object_flushes",
    "evictions",
    "compress_poor",
    "dedup_hits",
)


class Ops:
    """Operation counters (Xen's per-client and per-pool counters)."""

    __slots__ = OP_COUNTERS

    def __init__(self) -> None:
        self.puts = 0
        self.declined_quota = 0
        self.declined_capacity = 0
        self.declined_frozen = 0
        self.declined_policy = 0
        self.gets = 0
        self.get_hits = 0
        self.flushes = 0
        self.flushes_found = 0
        self.object_flushes = 0
        self.evictions = 0
        self.compress_poor = 0
        self.dedup_hits = 0

    def add(self, other: Ops) -> None:
        """Add another set of counters to these."""
        for name in OP_COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
