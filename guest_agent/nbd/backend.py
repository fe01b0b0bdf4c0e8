"""The block store an export sits on: whole 4 KiB blocks, in batches.

The NBD layer never talks to the broker directly. It hands a :class:`BlockBackend` batches of
whole-block operations (partial blocks are merged by the dispatcher first), so the protocol
can be tested against :class:`MemoryBackend` and served from the broker by
:class:`guest_agent.nbd.broker_backend.BrokerBackend` without changes.

Semantics every backend keeps:

- a block never written, or discarded since, reads as ``None`` (the caller supplies zeros);
- ``write_blocks`` / ``discard_blocks`` within one call touch distinct blocks;
- ``flush`` returns once every write and discard that returned before it is durable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

BLOCK_SIZE = 4096
ZERO_BLOCK = bytes(BLOCK_SIZE)


@runtime_checkable
class BlockBackend(Protocol):
    """Where the export's blocks live. All calls are batched; block numbers are 0-based."""

    async def read_blocks(self, blocks: Sequence[int]) -> list[bytes | None]:
        """The content of each block, in order; ``None`` for a block that holds nothing."""
        ...

    async def write_blocks(self, writes: Sequence[tuple[int, bytes]]) -> None:
        """Store whole blocks (each ``bytes`` is exactly 4096 long; blocks are distinct)."""
        ...

    async def discard_blocks(self, blocks: Sequence[int]) -> None:
        """Forget blocks: they read as ``None`` afterwards."""
        ...

    async def flush(self) -> None:
        """Return once every completed write and discard is durable."""
        ...

    async def close(self) -> None:
        """Release resources; the backend is not used afterwards."""
        ...


class MemoryBackend:
    """A :class:`BlockBackend` in a dict: the protocol tests' twin of the broker backend.

    ``calls`` counts the batches per method, so tests can see that queue depth became batch
    size; ``largest_batch`` is the most blocks one call carried.
    """

    def __init__(self) -> None:
        self.blocks: dict[int, bytes] = {}
        self.calls: dict[str, int] = {"read": 0, "write": 0, "discard": 0, "flush": 0}
        self.largest_batch = 0
        self.closed = False

    def _count(self, name: str, n: int) -> None:
        self.calls[name] += 1
        self.largest_batch = max(self.largest_batch, n)

    async def read_blocks(self, blocks: Sequence[int]) -> list[bytes | None]:
        self._count("read", len(blocks))
        get = self.blocks.get
        return [get(b) for b in blocks]

    async def write_blocks(self, writes: Sequence[tuple[int, bytes]]) -> None:
        self._count("write", len(writes))
        for block, data in writes:
            if len(data) != BLOCK_SIZE:
                raise ValueError(f"block {block}: {len(data)} bytes, not {BLOCK_SIZE}")
            self.blocks[block] = bytes(data)

    async def discard_blocks(self, blocks: Sequence[int]) -> None:
        self._count("discard", len(blocks))
        for block in blocks:
            self.blocks.pop(block, None)

    async def flush(self) -> None:
        self.calls["flush"] += 1

    async def close(self) -> None:
        self.closed = True
