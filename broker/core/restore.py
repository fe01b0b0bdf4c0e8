"""Pages in and out without the put and get paths: restore at broker start, export views and
the shed candidates (which pages a shed asks back first).

Restore puts persistent pages back as the journal or a migration holds them: no quota,
capacity or frozen check, not journaled, not counted as a put; a page replaces what is at its
handle. Export reads pages without side effects: no get is counted, nothing leaves an
exclusive-get pool, no LRU moves.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

from broker.core.content import ZERO_KEY, ZERO_PAGE
from broker.core.errors import BadHandle, BadPageSize, BadRequest
from broker.core.keys import lru_handle, lru_ref
from broker.core.pages import PageTable
from broker.core.registry import Guest, Pool
from schemas.batch import MAX_INDEX, MAX_OID, PAGE_SIZE


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
