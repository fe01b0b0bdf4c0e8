"""The journal of ``--durability none``: nothing is recorded, nothing survives a crash."""

from __future__ import annotations

from collections.abc import Iterator


class NullJournal:
    """Records nothing; :meth:`barrier` returns at once. Persistent pages live in RAM only,
    as they did in Xen, and are lost when the broker stops."""

    pending = False

    def record_put(self, guest_id: int, pool_id: int, oid: int, index: int, data: bytes) -> None:
        return None

    def record_flush(self, guest_id: int, pool_id: int, oid: int, index: int) -> None:
        return None

    def record_flush_object(self, guest_id: int, pool_id: int, oid: int) -> None:
        return None

    def record_destroy_pool(self, guest_id: int, pool_id: int) -> None:
        return None

    def record_remove_guest(self, guest_id: int) -> None:
        return None

    async def barrier(self) -> None:
        return None

    def load(self) -> Iterator[tuple[int, int, int, int, bytes]]:
        return iter(())

    def close(self) -> None:
        return None
