"""The guest's own swap: a local file of fixed 4 KiB slots for pages the broker did not take.

::

    store = FallbackStore("/var/lib/tmem/swap.fallback", max_pages=262144)
    store.write(key, page)           # any hashable key, e.g. (swap type, offset)
    page = store.read(key)           # bytes, or None when the key holds nothing
    store.discard(key)               # the slot goes back to the free list

Layout: slot ``i`` is bytes ``[i*4096, (i+1)*4096)`` of the file. Which key lives in which slot
is kept in memory only (a dict), with a free list of released slots, so the file is scratch
space the agent owns: it is truncated when opened, exactly as a swap device's contents mean
nothing after a reboot. ``FallbackStore(None)`` uses an anonymous temporary file.

Not thread-safe on its own; :class:`~guest_agent.shims.Frontswap` serialises access.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Hashable, Iterator

from guest_agent.errors import FallbackFull
from schemas.batch import PAGE_SIZE

__all__ = ["FallbackStore"]


class FallbackStore:
    """Fixed-size page slots in one local file, a free list and an in-memory key map.

    ``max_pages`` bounds the file (``None``: unbounded); a write past it raises
    :class:`~guest_agent.errors.FallbackFull`.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, max_pages: int | None = None
    ) -> None:
        if path is None:
            self._file = tempfile.TemporaryFile(prefix="tmem-fallback-")  # noqa: SIM115
            self.path: str | None = None
        else:
            self._file = open(path, "w+b")  # noqa: SIM115 - closed by close()
            self.path = os.fspath(path)
        self._fd = self._file.fileno()
        self.max_pages = max_pages
        self._slots: dict[Hashable, int] = {}
        self._free: list[int] = []
        self._next = 0  # slots [0, _next) exist in the file

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    def __iter__(self) -> Iterator[Hashable]:
        """The keys that hold a page (a snapshot: the store may change while iterating)."""
        return iter(list(self._slots))

    @property
    def file_slots(self) -> int:
        """Slots the file has grown to (used plus free)."""
        return self._next

    def write(self, key: Hashable, page: bytes | memoryview) -> None:
        """Store ``page`` (4096 bytes) under ``key``, replacing what was there."""
        if len(page) != PAGE_SIZE:
            raise ValueError(f"a page is exactly {PAGE_SIZE} bytes, got {len(page)}")
        slot = self._slots.get(key)
        if slot is None:
            if self._free:
                slot = self._free.pop()
            elif self.max_pages is not None and self._next >= self.max_pages:
                raise FallbackFull(f"fallback store is full ({self.max_pages} pages)")
            else:
                slot = self._next
                self._next += 1
        written = os.pwrite(self._fd, page, slot * PAGE_SIZE)
        if written != PAGE_SIZE:  # a local file short write: disk full
            if key not in self._slots:
                self._free.append(slot)
            raise OSError(f"short write to the fallback file ({written} bytes)")
        self._slots[key] = slot

    def read(self, key: Hashable) -> bytes | None:
        """The page stored under ``key``, or ``None``."""
        slot = self._slots.get(key)
        if slot is None:
            return None
        data = os.pread(self._fd, PAGE_SIZE, slot * PAGE_SIZE)
        if len(data) != PAGE_SIZE:
            raise OSError(f"short read from the fallback file ({len(data)} bytes)")
        return data

    def discard(self, key: Hashable) -> bool:
        """Free the slot of ``key``; True when there was one."""
        slot = self._slots.pop(key, None)
        if slot is None:
            return False
        self._free.append(slot)
        return True

    def sync(self) -> None:
        """Make the pages written so far durable (``fsync``); a shed calls it before the
        broker's copies are flushed."""
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the file (an anonymous one is deleted)."""
        self._file.close()

    def __enter__(self) -> FallbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
