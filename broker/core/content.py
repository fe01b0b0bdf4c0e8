"""Page contents: the zero page, hashing, lz4 and zstd, and the layout of content keys.

A stored value is one of three forms, told apart by length and first byte (:func:`unpack`):

* exactly 4096 bytes: the raw page;
* shorter, first byte ``0x00`` (:data:`ZSTD_TAG`): the tag, then a zstd frame of the page
  (level 1, magicless, no size or checksum: :func:`recompress`), what the idle pass of
  :mod:`broker.core.compression` keeps a cold page as;
* shorter, any other first byte: the page's lz4 block, without a size header.

No lz4 block of a page starts with ``0x00``: a block is a run of sequences, each opening with
a token whose high nibble is its literal count; a sequence with no literal either ends the
block (so the block decodes to nothing: not a page) or copies a match from output already
written, and at the start nothing is written. So the first token of a page's block has at
least one literal: its byte is ``0x10`` or more (tests/core/test_recompress.py proves it on
every first byte below ``0x10``).

A content key names one stored content in the :class:`~broker.core.store.PageStore`::

    key = digest | domain_id << 128 | k << 160

``digest`` is the xxh3_128 of the raw page, ``domain_id`` the dedup domain (so identical
pages of two domains never share), and ``k`` numbers contents of one domain whose digests
collide (0 almost always): sharing always needs a byte-for-byte compare, never the digest
alone. The all-zero page has the key :data:`ZERO_KEY` and no storage at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import lz4.block
import xxhash
import zstandard

from schemas.batch import PAGE_SIZE

if TYPE_CHECKING:
    from broker.core.registry import Domain
    from broker.core.store import PageStore

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


ZSTD_TAG: Final = 0
"""The first byte of a stored zstd frame; no lz4 block of a page starts with it (above)."""

# zstd level 1 without the frame's magic, content size, checksum and dictionary id (the size
# is always 4096; the content key's digest already names the page): 5-6 bytes less per page.
# On 3,000 random non-zero /usr/lib pages (poor compressors counted at 4096): lz4 2,490 B at
# 1.5 us to decompress, this form 2,060 B at 27 us to compress and 6.5 us to decompress
# (load 4-6). Levels 2-3 saved ~1 % more for ~4 % more time.
_ZSTD_PARAMS: Final = zstandard.ZstdCompressionParameters.from_level(
    1,
    format=zstandard.FORMAT_ZSTD1_MAGICLESS,
    write_content_size=0,
    write_checksum=0,
    write_dict_id=0,
)
_zstd_compress: Final = zstandard.ZstdCompressor(compression_params=_ZSTD_PARAMS).compress
_zstd_decompress: Final = zstandard.ZstdDecompressor(
    format=zstandard.FORMAT_ZSTD1_MAGICLESS
).decompress
_TAG: Final = bytes((ZSTD_TAG,))


def recompress(page: bytes) -> bytes:
    """The zstd form of a page: :data:`ZSTD_TAG`, then the frame. Stored only when shorter
    than what is held (so never 4096 bytes long: a noisy page's form is longer than that)."""
    return _TAG + _zstd_compress(page)


def is_zstd(stored: bytes) -> bool:
    """Whether a stored value is the zstd form."""
    return len(stored) != PAGE_SIZE and stored[0] == ZSTD_TAG


def unpack(stored: bytes) -> bytes:
    """The raw page of a stored value: raw values are exactly 4096 bytes, shorter ones an lz4
    block or, after :data:`ZSTD_TAG`, a zstd frame."""
    if len(stored) == PAGE_SIZE:
        return stored
    if stored[0] == ZSTD_TAG:
        out: bytes = _zstd_decompress(memoryview(stored)[1:], max_output_size=PAGE_SIZE)
        return out
    return decompress(stored)


class Contents:
    """The content table: every stored content once per dedup domain, with its references.

    A content's key is its digest plus the domain bits (see the module docstring); sharing
    needs a byte-for-byte compare, so a digest collision gets its own key and its own copy.
    A content's bytes go when its last reference goes. Kept per content, never per page:
    reference counts only of contents with two or more references (absent: 1), sizes only
    of contents stored compressed (absent: 4096), and each colliding digest's highest ``k``.

    ``used_bytes`` and ``unique_pages`` are what the store really holds (``trusted_used``:
    the part in trusted domains). Dedup looks at raw contents. The stored copy is never
    larger than the charge of any page referring to it: a content stored raw is replaced by
    its lz4 block when a compressing putter shares it (:meth:`acquire`). So in an untrusted
    domain the bytes held never exceed the sum of the charges, and the capacity decision
    can count charges alone without other guests' contents ever showing in it.
    """

    __slots__ = (
        "collided",
        "compress_max",
        "delete",
        "get",
        "hash",
        "put",
        "refs",
        "sizes",
        "store",
        "trusted_used",
        "unique_pages",
        "used_bytes",
    )

    def __init__(self, store: PageStore, hasher: Hasher, compress_max: int) -> None:
        self.store = store
        self.hash = hasher
        # a stored lz4 block is kept only when at most this long, else the raw page
        self.compress_max = compress_max
        self.get = store.get
        self.put = store.put
        self.delete = store.delete
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.collided: dict[int, int] = {}
        self.used_bytes = 0
        self.trusted_used = 0
        self.unique_pages = 0

    def pack(self, page: bytes, compressing: bool) -> tuple[bytes, bool]:
        """How a non-zero page is stored: ``(stored, poor)``. A compressing putter keeps the
        lz4 block when it is at most ``compress_max`` long, else the raw page (``poor``)."""
        if not compressing:
            return page, False
        packed = compress(page)
        if len(packed) <= self.compress_max:
            return packed, False
        return page, True

    def load(self, key: int) -> bytes:
        """The raw page of a content key (the zero key included)."""
        if key == ZERO_KEY:
            return ZERO_PAGE
        stored = self.get(key)
        assert stored is not None, "content key without stored bytes"
        return stored if len(stored) == PAGE_SIZE else unpack(stored)

    def find(self, page: bytes, bits: int) -> int | None:
        """The key of the non-zero content ``page`` in the domain ``bits``, or None."""
        base = self.hash(page) | bits
        existing = self.get(base)
        if existing is not None and unpack(existing) == page:
            return base
        for k in range(1, self.collided.get(base, 0) + 1):
            candidate = base | (k << COLLISION_SHIFT)
            other = self.get(candidate)
            if other is not None and unpack(other) == page:
                return candidate
        return None

    def reference(self, page: bytes, stored: bytes, domain: Domain) -> tuple[int, bool]:
        """A reference to the non-zero content ``page`` in ``domain``, stored as ``stored``
        if it is new. Returns ``(key, shared an existing copy)``."""
        key = self.hash(page) | domain.bits
        if self.collided or self.get(key) is not None:
            return self.acquire(key, page, stored, domain)
        self.add(key, stored, domain)
        return key, False

    def add(self, key: int, stored: bytes, domain: Domain) -> None:
        """Store a content under a key known to be free."""
        self.put(key, stored)
        size = len(stored)
        if size != PAGE_SIZE:
            self.sizes[key] = size
        self.used_bytes += size
        domain.used_bytes += size
        if domain.trusted:
            self.trusted_used += size
        self.unique_pages += 1

    def _share(self, key: int, held: bytes, stored: bytes, domain: Domain) -> None:
        """One more reference to ``key``; a raw copy gives way to the sharer's lz4 block."""
        refs = self.refs
        refs[key] = refs.get(key, 1) + 1
        if len(stored) < len(held):
            self._shrink(key, held, stored, domain)

    def _shrink(self, key: int, held: bytes, stored: bytes, domain: Domain) -> None:
        """Keep the content ``key`` (held as ``held``) as the shorter ``stored``."""
        size = len(stored)
        if size < len(held):
            self.delete(key)
            self.put(key, stored)
            self.sizes[key] = size
            saved = len(held) - size
            self.used_bytes -= saved
            domain.used_bytes -= saved
            if domain.trusted:
                self.trusted_used -= saved

    def acquire(self, base: int, page: bytes, stored: bytes, domain: Domain) -> tuple[int, bool]:
        """:meth:`reference` once the digest (plus domain bits) ``base`` is known to be
        taken or to have collided: compare with every content of that digest."""
        existing = self.get(base)
        if existing is not None and unpack(existing) == page:
            self._share(base, existing, stored, domain)
            return base, True
        if existing is None and base not in self.collided:
            key = base
        else:
            top = self.collided.get(base, 0)
            key = -1
            for k in range(1, top + 1):
                candidate = base | (k << COLLISION_SHIFT)
                other = self.get(candidate)
                if other is None:
                    if key < 0:
                        key = candidate
                elif unpack(other) == page:
                    self._share(candidate, other, stored, domain)
                    return candidate, True
            if key < 0:
                if existing is None:
                    key = base
                else:
                    top += 1
                    self.collided[base] = top
                    key = base | (top << COLLISION_SHIFT)
        self.add(key, stored, domain)
        return key, False

    def unref(self, key: int, domain: Domain) -> None:
        """Drop one reference to a non-zero content; its bytes go with the last one."""
        refs = self.refs
        count = refs.get(key)
        if count is None:
            self.delete(key)
            size = self.sizes.pop(key, PAGE_SIZE) if self.sizes else PAGE_SIZE
            self.used_bytes -= size
            domain.used_bytes -= size
            if domain.trusted:
                self.trusted_used -= size
            self.unique_pages -= 1
        elif count == 2:
            del refs[key]
        else:
            refs[key] = count - 1

    def repack(self, key: int, packed: bytes, domain: Domain) -> None:
        """Keep the stored content ``key`` as ``packed`` (its lz4 block, or zstd form) from now
        on, when that is shorter than what is held."""
        held = self.get(key)
        assert held is not None
        self._shrink(key, held, packed, domain)

    def rekey(self, key: int, domain: Domain) -> int:
        """A reference to the same content in ``domain``, for a page moving there; the
        caller drops its reference to ``key`` afterwards."""
        stored = self.get(key)
        assert stored is not None
        page = unpack(stored)
        return self.acquire(self.hash(page) | domain.bits, page, stored, domain)[0]
