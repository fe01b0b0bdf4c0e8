"""Page contents: the zero page, hashing, lz4 and the layout of content keys.

A content key names one stored content in the :class:`~broker.core.store.PageStore`::

    key = digest | domain_id << 128 | k << 160

``digest`` is the xxh3_128 of the raw page, ``domain_id`` the dedup domain (so identical
pages of two domains never share), and ``k`` numbers contents of one domain whose digests
collide (0 almost always): sharing always needs a byte-for-byte compare, never the digest
alone. The all-zero page has the key :data:`ZERO_KEY` and no storage at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import lz4.block
import xxhash

from schemas.batch import PAGE_SIZE

ZERO_PAGE: Final = bytes(PAGE_SIZE)
ZERO_KEY: Final = -1
DOMAIN_SHIFT: Final = 128
COLLISION_SHIFT: Final = 160
MAX_DOMAINS: Final = 1 << (COLLISION_SHIFT - DOMAIN_SHIFT)

Hasher = Callable[[bytes], int]
"""A content hash: a page's raw bytes to an int below 2**128."""

xxh3_128: Final[Hasher] = xxhash.xxh3_128_intdigest


def compress(page: bytes) -> bytes:
    """The lz4 block of a page, without a size header (the size is always 4096)."""
    out: bytes = lz4.block.compress(page, store_size=False)
    return out


def decompress(stored: bytes) -> bytes:
    """A page back from its lz4 block."""
    out: bytes = lz4.block.decompress(stored, uncompressed_size=PAGE_SIZE)
    return out


def unpack(stored: bytes) -> bytes:
    """The raw page of a stored value: raw values are exactly 4096 bytes, lz4 blocks shorter."""
    return stored if len(stored) == PAGE_SIZE else decompress(stored)
