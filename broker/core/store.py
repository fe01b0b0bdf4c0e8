"""Where page contents live: the :class:`PageStore` protocol and its in-memory implementation.

The core decides everything (dedup, refcounts, sizes, eviction); a store only keeps bytes
under an integer content key the core chose. A stored value is the raw 4096-byte page, its
lz4 block, or a zstd form (``0x00`` then a frame): length and first byte tell which
(:mod:`broker.core.content`). Durable or distributed
stores implement the same three calls and slot in without touching the rules.
"""

from __future__ import annotations

from typing import Protocol


class PageStore(Protocol):
    """Bytes by content key. Keys are non-negative ints below 2**192, unique per content."""

    def get(self, key: int, /) -> bytes | None:
        """The stored bytes, or None when nothing is stored under ``key``."""

    def put(self, key: int, data: bytes, /) -> None:
        """Store ``data`` under a key that holds nothing yet."""

    def delete(self, key: int, /) -> None:
        """Forget ``key`` (it holds something)."""


class MemoryPageStore(dict[int, bytes]):
    """Page contents in a dict: the default store.

    A ``dict`` subclass whose calls are the dict's own C methods, so the hot path pays no
    Python-level call and no per-page object beyond the key and the bytes.
    """

    __slots__ = ()

    def put(self, key: int, data: bytes, /) -> None:
        self[key] = data

    def delete(self, key: int, /) -> None:
        del self[key]
