"""The seam through which durability learns about persistent pages."""

from __future__ import annotations

from typing import Protocol


class PersistentJournal(Protocol):
    """Told synchronously, only for persistent pools, after the core changed its own state.

    ``record_flush`` also reports a declined put that removed an old copy and an exclusive
    get; ``record_remove_guest`` also reports ``flush_guest``.
    """

    def record_put(self, guest_id: int, pool_id: int, oid: int, index: int, data: bytes) -> None:
        """A persistent page was stored (replacing any old copy)."""

    def record_flush(self, guest_id: int, pool_id: int, oid: int, index: int) -> None:
        """A persistent page left its handle."""

    def record_flush_object(self, guest_id: int, pool_id: int, oid: int) -> None:
        """Every page of a persistent object left."""

    def record_destroy_pool(self, guest_id: int, pool_id: int) -> None:
        """A persistent pool and its pages are gone."""

    def record_remove_guest(self, guest_id: int) -> None:
        """Every persistent page of the guest is gone (guest removed or flushed)."""
