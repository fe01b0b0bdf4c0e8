"""Pages in and out without the put and get paths: restore at broker start, export views and
the shed candidates (which pages a shed asks back first); and :class:`PageMoves`, the
:class:`broker.core.tmem.Tmem` methods that wrap them, with ``batch`` (many operations of one
pool through the facade's own page paths).

Restore puts persistent pages back as the journal or a migration holds them: no quota,
capacity or frozen check, not journaled, not counted as a put; a page replaces what is at its
handle. Export reads pages without side effects: no get is counted, nothing leaves an
exclusive-get pool, no LRU moves.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import TYPE_CHECKING

from broker.core.content import ZERO_KEY, ZERO_PAGE, Contents
from broker.core.errors import BadHandle, BadPageSize, BadRequest
from broker.core.keys import M32, MIX, lru_handle, lru_ref
from broker.core.pages import PageTable
from broker.core.registry import PACK_ALWAYS, PACK_PRESSURE, Guest, Pool
from schemas.batch import (
    MAX_INDEX,
    MAX_OID,
    OP_FLUSH_OBJECT,
    OP_FLUSH_PAGE,
    OP_GET,
    OP_PUT,
    PAGE_SIZE,
    STATUS_DONE,
    STATUS_MISS,
)

if TYPE_CHECKING:
    from broker.core.eviction import Eviction
    from broker.core.journal import PersistentJournal
    from broker.core.registry import Registry

BatchOp = tuple[int, int, int, "bytes | memoryview | None"]

_OPS = (OP_PUT, OP_GET, OP_FLUSH_PAGE, OP_FLUSH_OBJECT)


def check_handle(oid: int, index: int) -> None:
    """BadHandle unless 0 <= oid < 2^192 and 0 <= index < 2^32."""
    if not (0 <= oid <= MAX_OID and 0 <= index <= MAX_INDEX):
        raise BadHandle(f"handle out of range: oid={oid} index={index}")


def check_batch(ops: Sequence[BatchOp]) -> None:
    """Raise on the first malformed op (unknown op, bad handle, a put without a whole page),
    before any op of the batch is applied."""
    for op, oid, index, page in ops:
        if op not in _OPS:
            raise BadRequest(f"unknown op {op}")
        if not (0 <= oid <= MAX_OID and 0 <= index <= MAX_INDEX):  # check_handle, inlined
            raise BadHandle(f"handle out of range: oid={oid} index={index}")
        if op == OP_PUT and (page is None or len(page) != PAGE_SIZE):
            raise BadPageSize(f"a page is {PAGE_SIZE} bytes")


def restore_pages(
    table: PageTable,
    pool: Pool,
    pages: Iterable[tuple[int, int, bytes]],
    compressing: bool,
) -> int:
    """Put ``(oid, index, page)`` back into the guest's persistent pool; how many were
    restored (``compressing``: whether the guest compresses now). A malformed page raises (``BadPageSize``, ``BadHandle``) and the pages before
    it stay restored.

    One rule with the put path (PageTable.place, Contents.pack and .reference), called per
    page: 1.4 us a page against 1.05 us when this loop inlined them (100k pages), so a
    million-page restart takes about 0.4 s longer. Kept: restore runs once, at start.
    """
    if not pool.persistent:
        raise BadRequest("restore is for persistent pools")
    contents = table.contents
    objects = pool.objects
    take = table.take
    place = table.place
    pack = contents.pack
    reference = contents.reference
    domain = pool.domain
    n = 0
    for oid, index, data in pages:
        if len(data) != PAGE_SIZE:
            raise BadPageSize(f"a page is {PAGE_SIZE} bytes, not {len(data)}")
        if not (0 <= oid <= MAX_OID and 0 <= index <= MAX_INDEX):
            raise BadHandle(f"handle out of range: oid={oid} index={index}")
        page = data if type(data) is bytes else bytes(data)
        if oid in objects:  # (at start the pool is empty: skip the call)
            take(pool, oid, index)
        if page == ZERO_PAGE:
            place(pool, oid, index, ZERO_KEY, 0)
        else:
            stored = pack(page, compressing)[0]
            place(pool, oid, index, reference(page, stored, domain)[0], len(stored))
        n += 1
    return n


def read_pages(
    table: PageTable, pool: Pool, handles: list[tuple[int, list[int]]]
) -> Iterator[tuple[int, int, bytes]]:
    """The pages at ``handles`` (``(oid, [index, ...])``) as ``(oid, index, page)``, read
    lazily; pages flushed before they are reached are skipped."""
    load = table.contents.load
    for oid, indexes in handles:
        for index in indexes:
            obj = pool.objects.get(oid)
            key = None if obj is None else obj.get(index)
            if key is not None:
                yield oid, index, load(key)


def pool_handles(pool: Pool) -> list[tuple[int, list[int]]]:
    """Every handle of the pool now, by object."""
    return [(oid, list(obj)) for oid, obj in pool.objects.items()]


def shed_candidates(g: Guest, limit: int) -> list[tuple[int, int, int]]:
    """The guest's ``limit`` coldest persistent pages by last access (put or get), coldest
    first, as ``(pool_id, oid, index)``: what a shed asks back first.

    Reads ``Guest.recency`` from its oldest end: O(limit) (plus the slots left empty at that
    end by pages touched since the dict last compacted itself, which its resizes bound). The
    listing moves nothing: as the guest takes pages back and flushes them they leave the
    order, so the next call names the next coldest."""
    pool_ids = {pool.ref: pid for pid, pool in g.pools.items() if pool.persistent}
    out: list[tuple[int, int, int]] = []
    for key in islice(g.recency, limit):
        oid, index = lru_handle(key)
        out.append((pool_ids[lru_ref(key)], oid, index))
    return out


class PageMoves:
    """Part of :class:`broker.core.tmem.Tmem` (a mixin: its methods are the facade's):
    batches, restore, export reads and shed candidates. Kept here so that the facade's module
    holds the hot paths and stays short."""

    _reg: Registry
    _table: PageTable
    _ev: Eviction
    _contents: Contents
    _journal: PersistentJournal | None

    if TYPE_CHECKING:  # the facade's page paths (broker.core.tmem)

        def _put(
            self, g: Guest, pool: Pool, pool_id: int, oid: int, index: int, data: bytes | memoryview
        ) -> int: ...

        def _get(
            self, g: Guest, pool: Pool, pool_id: int, oid: int, index: int
        ) -> bytes | None: ...

        def _flush_page(self, g: Guest, pool: Pool, pool_id: int, oid: int, index: int) -> bool: ...

        def _flush_object(self, g: Guest, pool: Pool, pool_id: int, oid: int) -> int: ...

    def pool_pages(self, guest_id: int, pool_id: int) -> Iterator[tuple[int, int, bytes]]:
        """Every page of a pool as ``(oid, index, page)``, read without side effects: no get
        is counted, nothing leaves an exclusive-get pool, no LRU moves (for export). The
        handles are listed when this is called; pages flushed before they are reached are
        skipped."""
        _g, pool = self._reg.pool(guest_id, pool_id)
        return read_pages(self._table, pool, pool_handles(pool))

    def pool_handles(self, guest_id: int, pool_id: int) -> list[tuple[int, int]]:
        """Every handle ``(oid, index)`` a pool holds now, without touching a page (what an
        export re-opened after a restart needs to know where its blocks are)."""
        _g, pool = self._reg.pool(guest_id, pool_id)
        return [(oid, index) for oid, indexes in pool_handles(pool) for index in indexes]

    def shed_candidates(self, guest_id: int, limit: int) -> list[tuple[int, int, int]]:
        """The guest's ``limit`` (>= 0) coldest persistent pages by last access, coldest
        first, as ``(pool_id, oid, index)`` (:func:`broker.core.restore.shed_candidates`)."""
        if type(limit) is not int or limit < 0:
            raise BadRequest(f"limit must be an integer >= 0, not {limit!r}")
        return shed_candidates(self._reg.guest(guest_id), limit)

    def batch(
        self, guest_id: int, pool_id: int, ops: Sequence[BatchOp]
    ) -> list[tuple[int, bytes | None]]:
        """Apply ``(op, oid, index, page)`` operations in order; one ``(status, page)`` per
        op: put -> its status, get -> (DONE, page) or (MISS, None), flushes -> DONE. Every op
        is validated first: a malformed one (unknown op, bad handle, bad page) raises and
        nothing is applied."""
        g, pool = self._reg.pool(guest_id, pool_id)
        check_batch(ops)
        # A batch of distinct puts goes to the journal first, so that its log write and sync
        # overlap the core's work (why, and the figures: LmdbJournal.put_ahead).
        journal = self._journal
        if journal is not None and pool.persistent and len(ops) > 1:
            ahead = getattr(journal, "put_ahead", None)
            if ahead is not None and self._puts_certain(g, ops) and ahead(g.guest_id, pool_id, ops):
                return self._batch_ahead(g, pool, pool_id, ops, journal)
        out: list[tuple[int, bytes | None]] = []
        append = out.append
        # A hit in a persistent pool without exclusive gets (what get_many and the NBD exports
        # read) is Tmem._get inlined, its counters added once at the end: a batch of 256 gets
        # took 262 / 452 µs through _get, 198 / 373 µs so (two runs, fastest of 15, load ~5).
        # Misses and every other pool take _get.
        fast = pool.persistent and not pool.exclusive_gets
        objects = pool.objects
        recency = g.recency
        tag = pool.lru_tag
        load = self._contents.load
        # Contents.load inlined for a raw page (the zero key has no storage: load serves it,
        # and a compressed one): 256 gets 154-364 -> 144-300 µs (3 interleaved runs, load ~8)
        stored_bytes = self._contents.get
        m32, mix = M32, MIX
        hits = 0
        for op, oid, index, page in ops:
            if op == OP_GET:
                if fast:
                    obj = objects.get(oid)
                    key = None if obj is None else obj.get(index)
                    if key is not None:
                        hits += 1
                        # the page is the guest's most recently used now
                        slot = (oid << 56) | tag | ((index + (oid & m32) * mix) & m32)
                        del recency[slot]
                        recency[slot] = None
                        stored = stored_bytes(key)
                        if stored is None or len(stored) != PAGE_SIZE:
                            stored = load(key)
                        append((STATUS_DONE, stored))
                        continue
                got = self._get(g, pool, pool_id, oid, index)
                append((STATUS_MISS, None) if got is None else (STATUS_DONE, got))
            elif op == OP_PUT:
                assert page is not None
                append((self._put(g, pool, pool_id, oid, index, page), None))
            elif op == OP_FLUSH_PAGE:
                self._flush_page(g, pool, pool_id, oid, index)
                append((STATUS_DONE, None))
            else:
                self._flush_object(g, pool, pool_id, oid)
                append((STATUS_DONE, None))
        if hits:
            pool.gets += hits
            pool.get_hits += hits
            g.gets += hits
            g.get_hits += hits
        return out

    def _puts_certain(self, g: Guest, ops: Sequence[BatchOp]) -> bool:
        """Whether every op is a put, of a handle no other op of the batch names, and none
        can be declined for the guest being frozen, its quota or the broker's capacity (a
        decline by compression's cost is still possible): the batch's puts may then be
        journaled before the core applies them (:meth:`_batch_ahead`)."""
        n = len(ops)
        if g.frozen or (g.limit is not None and g.persistent_pages + n > g.limit):
            return False
        if self._table.counted_bytes + n * PAGE_SIZE > self._ev.capacity:
            return False
        handles: set[int] = set()
        add = handles.add
        for op, oid, index, _page in ops:
            if op != OP_PUT:
                return False
            add((oid << 32) | index)
        return len(handles) == n

    def _batch_ahead(
        self, g: Guest, pool: Pool, pool_id: int, ops: Sequence[BatchOp], journal: PersistentJournal
    ) -> list[tuple[int, bytes | None]]:
        """Apply a batch of puts the journal recorded already (``put_ahead``): its log write
        and sync run while the core applies them. The core records nothing meanwhile; a put it
        declines is journaled as a flush after (handles are distinct in the batch, so the flush
        is exactly what the core holds: nothing). If the core raised part way, each handle not
        reached is journaled as the core holds it. Ordering: the puts, then the flushes, all
        before the answer (the route's barrier)."""
        gid = g.guest_id
        out: list[tuple[int, bytes | None]] = []
        append = out.append
        put = self._put
        self._journal = None  # the puts are in the journal already
        try:
            for _op, oid, index, page in ops:
                assert page is not None
                append((put(g, pool, pool_id, oid, index, page), None))
        finally:
            self._journal = journal
            if len(out) < len(ops):  # raised part way: journal what the core holds
                load = self._contents.load
                for _op, oid, index, _page in ops[len(out) :]:
                    obj = pool.objects.get(oid)
                    key = None if obj is None else obj.get(index)
                    if key is None:
                        journal.record_flush(gid, pool_id, oid, index)
                    else:
                        journal.record_put(gid, pool_id, oid, index, load(key))
        for (status, _), (_op, oid, index, _page) in zip(out, ops, strict=True):
            if status != STATUS_DONE:
                journal.record_flush(gid, pool_id, oid, index)
        return out

    def restore_page(self, guest_id: int, pool_id: int, oid: int, index: int, data: bytes) -> None:
        """Put a persistent page back at broker start: no quota, capacity or frozen check,
        not journaled, not counted as a put. Replaces what is at the handle."""
        g, pool = self._reg.pool(guest_id, pool_id)
        restore_pages(self._table, pool, ((oid, index, data),), self._packs_now(g))

    def restore_pages(
        self, guest_id: int, pool_id: int, pages: Iterable[tuple[int, int, bytes]]
    ) -> int:
        """:meth:`restore_page` for many ``(oid, index, page)`` of one pool (broker start).
        Returns how many pages were restored. A malformed page raises (``BadPageSize``,
        ``BadHandle``) and the pages before it stay restored."""
        g, pool = self._reg.pool(guest_id, pool_id)
        return restore_pages(self._table, pool, pages, self._packs_now(g))

    def _packs_now(self, g: Guest) -> bool:
        """Whether the guest's puts are compressed now (its mode, and for ``pressure`` the
        storage level)."""
        return g.pack == PACK_ALWAYS or (
            g.pack == PACK_PRESSURE and self._table.counted_bytes > self._ev.compress_above
        )
