"""Compression as policy: the ``pressure`` mode's background pass over cold pages.

A guest's mode is its own ``compress`` setting, else its dedup domain's, else the broker's
default (:meth:`broker.core.registry.Registry.compress_mode`): ``never``, ``always``, or
``pressure`` — zswap's habit: new puts are compressed once storage is above the low watermark
(the put path), and while storage is above the high watermark this pass keeps the stored
pages of such guests least likely to be read soon as lz4 blocks: ephemeral pages as the
ephemeral policy predicts (LRU order; under TinyLFU the pages seen at most once lately first),
then persistent pages by last access (``Guest.recency``, the shed candidates' order). Pages that compress poorly stay raw. A page compressed here
is charged its lz4 length from then on, like a page put compressed.

Which pages the pass takes depends only on the guest's own pages, and it runs only while
``counted_bytes`` (charges, in untrusted domains) is above the watermark: nothing in it
depends on another guest's contents.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

from broker.core.content import ZERO_KEY, is_zstd, recompress, unpack
from broker.core.eviction import Eviction
from broker.core.keys import lru_handle, lru_ref, slot_key
from broker.core.pages import PageTable
from broker.core.policy import ONCE
from broker.core.registry import PACK_PRESSURE, Guest, Pool, Registry
from schemas.batch import PAGE_SIZE

# A step looks at most this many handles per page it may compress (pages compressed already
# or compressing poorly are skipped), so one step's work stays bounded.
EXAMINE_PER_PAGE = 8

# The idle pass (IdleRecompressor): pages per pressure step (1 s in the broker) it may
# recompress, at ~27 us each (content.py): at most ~7 ms of a core per step.
MAX_RECOMPRESS_PER_STEP = 256
# A page is idle when it is in the coldest IDLE_SHARE of its guest's order (the ephemeral
# policy's prediction of the next read, then persistent pages by last access); a zstd page
# pays ~5 us more per read (6.5 us against lz4's 1.5 us). Measured on the scoreboard (one
# seed; bench/README.md "Idle share"): shares 0.25 / 0.5 / 0.75 / 1.0 gave +7 / +16 / +27 /
# +39 % faults per MiB over zswap-like on `shifting` for 6.4k / 12.9k / 19.3k / 28.1k pages
# recompressed; no knee: 0.5 is a CPU budget, the smallest share meeting the +10 % aim.
IDLE_SHARE = 0.5
# zstd must save at least this many bytes on what the page is charged (the mean saving on
# /usr/lib pages is ~430 B of 2,490): below it, the slower reads are not worth it.
MIN_SAVING = 128


class ColdCompressor:
    """One pass at a time over the cold pages of guests in the ``pressure`` mode."""

    __slots__ = ("_pass", "compressed", "ev", "reg", "table")

    def __init__(self, reg: Registry, table: PageTable, ev: Eviction) -> None:
        self.reg = reg
        self.table = table
        self.ev = ev
        self._pass: Iterator[tuple[Guest, int, Pool, int, int]] | None = None
        self.compressed = 0  # pages compressed by the pass, ever

    def step(self, max_pages: int) -> int:
        """Compress up to ``max_pages`` pages while storage is above the high watermark."""
        table, ev = self.table, self.ev
        if table.counted_bytes <= ev.high_bytes or max_pages <= 0:
            self._pass = None
            return 0
        if self._pass is None:
            self._pass = self._handles()
        done = 0
        for examined, (g, pool_id, pool, oid, index) in enumerate(self._pass, 1):
            if g.pools.get(pool_id) is pool and self._compress(pool, oid, index):
                done += 1
            if (
                done >= max_pages
                or examined >= EXAMINE_PER_PAGE * max_pages
                or table.counted_bytes <= ev.high_bytes
            ):
                self.compressed += done
                return done
        self._pass = None  # every cold page seen: the next step starts a new pass
        self.compressed += done
        return done

    def _handles(self) -> Iterator[tuple[Guest, int, Pool, int, int]]:
        """Handles of pressure-mode guests' private pools, least likely to be read soon
        first (:meth:`_ephemeral_order`, then persistent pages by last access). Lists are
        taken lazily (one list at a time), so pages put meanwhile wait for the next pass and
        pages gone meanwhile are skipped."""
        for g in list(self.reg.guests.values()):
            if g.pack != PACK_PRESSURE:
                continue
            own = [(pid, p) for pid, p in g.pools.items() if not p.shared]
            by_ref = {p.ref: (pid, p) for pid, p in own}
            for lru_key in self._ephemeral_order(g):
                entry = by_ref.get(lru_ref(lru_key))
                if entry is not None and not entry[1].persistent:
                    oid, index = lru_handle(lru_key)
                    yield g, entry[0], entry[1], oid, index
            # persistent pages by last access, coldest first (Guest.recency)
            for lru_key in list(g.recency):
                entry = by_ref.get(lru_ref(lru_key))
                if entry is not None:
                    oid, index = lru_handle(lru_key)
                    yield g, entry[0], entry[1], oid, index

    @staticmethod
    def _ephemeral_order(g: Guest) -> Iterator[int]:
        """The guest's ephemeral pages as the policy predicts their next read, farthest
        first: under LRU the account's order; under TinyLFU first the pages it saw at most
        once lately (the eviction's candidates: a scan's), in that order, then the rest."""
        account = g.account
        tinylfu = account.tinylfu
        if tinylfu is None:
            yield from account.coldest()
            return
        estimate = tinylfu.sketch.estimate
        later: list[int] = []
        for lru_key in account.coldest():
            if estimate(lru_key) <= ONCE:
                yield lru_key
            else:
                later.append(lru_key)
        yield from later

    def _compress(self, pool: Pool, oid: int, index: int) -> bool:
        obj = pool.objects.get(oid)
        key = None if obj is None else obj.get(index)
        if key is None or key == ZERO_KEY:
            return False
        if pool.charges.get(slot_key(oid, index), PAGE_SIZE) != PAGE_SIZE:
            return False  # compressed already
        contents = self.table.contents
        held = contents.get(key)
        assert held is not None
        packed, poor = contents.pack(unpack(held), True)
        if poor:
            return False
        contents.repack(key, packed, pool.domain)
        self.table.recharge(pool, oid, index, len(packed))
        return True


class IdleRecompressor:
    """zram's ``recompress type=idle``: keep the idle lz4 pages of every guest as zstd frames.

    Bounded per step (``max_pages`` recompressed, ``EXAMINE_PER_PAGE`` times as many handles
    looked at), whatever the storage level. A page is idle in the coldest ``IDLE_SHARE`` of
    its guest's private pages: ephemeral pages in the policy's order (:meth:`ColdCompressor.
    _ephemeral_order`), then persistent pages by last access. Only pages charged an lz4
    length are taken (raw pages are the cold pass's, poor compressors stay raw); a page whose
    content another handle recompressed already is just charged the held length. Which pages
    are taken depends only on the guest's own pages; a content shared by dedup is held as
    zstd once, every other page on it keeps its own (larger) charge.
    """

    __slots__ = ("_pass", "recompressed", "reg", "saved_bytes", "share", "table")

    def __init__(self, reg: Registry, table: PageTable) -> None:
        self.reg = reg
        self.table = table
        self._pass: Iterator[tuple[Guest, int, Pool, int, int]] | None = None
        self.recompressed = 0  # pages charged a zstd length by the pass, ever
        self.saved_bytes = 0  # the charges those pages lost, ever
        self.share = IDLE_SHARE  # (the scoreboard's zstd-on-everything reference sets 1.0)

    def step(self, max_pages: int) -> int:
        """Recompress up to ``max_pages`` idle pages; returns how many."""
        if max_pages <= 0:
            return 0
        if self._pass is None:
            self._pass = self._handles()
        done = 0
        for examined, (g, pool_id, pool, oid, index) in enumerate(self._pass, 1):
            if g.pools.get(pool_id) is pool and self._recompress(pool, oid, index):
                done += 1
            if done >= max_pages or examined >= EXAMINE_PER_PAGE * max_pages:
                self.recompressed += done
                return done
        self._pass = None  # every idle page seen: the next step starts a new pass
        self.recompressed += done
        return done

    def _handles(self) -> Iterator[tuple[Guest, int, Pool, int, int]]:
        for g in list(self.reg.guests.values()):
            own = [(pid, p) for pid, p in g.pools.items() if not p.shared]
            by_ref = {p.ref: (pid, p) for pid, p in own}
            orders = (
                (ColdCompressor._ephemeral_order(g), g.account.eph_pages, False),
                (iter(list(g.recency)), g.persistent_pages, True),
            )
            for order, held, persistent in orders:
                for lru_key in islice(order, int(held * self.share)):
                    entry = by_ref.get(lru_ref(lru_key))
                    if entry is not None and entry[1].persistent is persistent:
                        oid, index = lru_handle(lru_key)
                        yield g, entry[0], entry[1], oid, index

    def _recompress(self, pool: Pool, oid: int, index: int) -> bool:
        obj = pool.objects.get(oid)
        key = None if obj is None else obj.get(index)
        if key is None or key == ZERO_KEY:
            return False
        charge = pool.charges.get(slot_key(oid, index), PAGE_SIZE)
        if charge == PAGE_SIZE:
            return False  # raw: a poor compressor, or the cold pass's
        contents = self.table.contents
        held = contents.get(key)
        assert held is not None
        if is_zstd(held):
            if len(held) >= charge:
                return False  # recompressed already
            packed = held  # another handle's pass recompressed the content
        else:
            packed = recompress(unpack(held))
            if len(packed) + MIN_SAVING > charge:
                return False
            contents.repack(key, packed, pool.domain)
        self.table.recharge(pool, oid, index, len(packed))
        self.saved_bytes += charge - len(packed)
        return True
