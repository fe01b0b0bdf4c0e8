"""The page table: placing a page at a handle and dropping it, with every gauge that moves.

Each page has a *charge*: its own stored size, 0 for a zero page, the lz4 length when its
putter compresses and the page shrinks enough, else 4096, whether or not the content is
shared with other handles. ``charged_bytes`` is the sum of every page's charge (what
``used_bytes`` would be without sharing); capacity decisions use it (see
:mod:`broker.core.eviction`). A pool keeps its pages' charges only where they are neither 0
nor 4096 (``Pool.charges``, by :func:`broker.core.keys.slot_key`).

``counted_bytes`` is what capacity decisions count: the charges of pages in untrusted dedup
domains plus the bytes actually held for trusted domains (where a shared content takes no
more room). With no trusted domain it equals ``charged_bytes``.

:meth:`PageTable.place` and :meth:`PageTable.drop` are the one rule for what a page adds and
takes away: pool gauges, the guest's persistent pages and their last-access order, the
account's ephemeral pages and LRU,
charges and the content reference. The put and get paths of :class:`broker.core.tmem.Tmem`
write parts of them inline (see the comments there and ``tests/core/test_keys.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.core.content import ZERO_KEY, Contents
from broker.core.keys import lru_key, slot_key
from schemas.batch import PAGE_SIZE

if TYPE_CHECKING:
    from broker.core.registry import Domain, Pool


class PageTable:
    """Where pages are, and what they are charged."""

    __slots__ = ("charged_bytes", "contents", "persistent_charged", "trusted_charged")

    def __init__(self, contents: Contents) -> None:
        self.contents = contents
        self.charged_bytes = 0
        self.trusted_charged = 0  # the part of charged_bytes in trusted domains
        self.persistent_charged = 0  # the part of charged_bytes in persistent pools

    @property
    def counted_bytes(self) -> int:
        """Page storage counted against capacity (see the module docstring)."""
        return self.charged_bytes - self.trusted_charged + self.contents.trusted_used

    def charge(self, pool: Pool, delta: int) -> None:
        """Add ``delta`` to the charges of a page of ``pool`` (every gauge of them)."""
        pool.charged_bytes += delta
        self.charged_bytes += delta
        domain = pool.domain
        domain.charged_bytes += delta
        if domain.trusted:
            self.trusted_charged += delta
        if pool.persistent:
            self.persistent_charged += delta

    def place(self, pool: Pool, oid: int, index: int, key: int, charge: int) -> None:
        """Put the content ``key`` (charged ``charge`` bytes, 0 for the zero key) at the free
        handle (oid, index) and count it everywhere."""
        objects = pool.objects
        obj = objects.get(oid)
        if obj is None:
            objects[oid] = {index: key}
        else:
            obj[index] = key
        pool.pages += 1
        if charge == 0:
            pool.zero_pages += 1
        else:
            self.charge(pool, charge)
            if charge != PAGE_SIZE:
                pool.charges[slot_key(oid, index)] = charge
        if pool.persistent:
            owner = pool.owner
            assert owner is not None
            owner.persistent_pages += 1
            owner.recency[lru_key(pool.lru_tag, oid, index)] = None
        else:
            account = pool.account
            assert account is not None
            account.eph_pages += 1
            slot = lru_key(pool.lru_tag, oid, index)
            account.lru[slot] = None
            if account.tinylfu is not None:
                account.tinylfu.on_put(account.lru, account.main, slot)

    def drop(self, pool: Pool, oid: int, index: int, key: int, in_lru: bool = True) -> None:
        """Forget the page ``key`` that was at (oid, index) (already gone from its object):
        gauges, LRU (unless the caller popped it: ``in_lru=False``), charge and content."""
        pool.pages -= 1
        if key == ZERO_KEY:
            pool.zero_pages -= 1
        else:
            charges = pool.charges
            charge = charges.pop(slot_key(oid, index), PAGE_SIZE) if charges else PAGE_SIZE
            self.charge(pool, -charge)
            self.contents.unref(key, pool.domain)
        if pool.persistent:
            owner = pool.owner
            assert owner is not None
            owner.persistent_pages -= 1
            del owner.recency[lru_key(pool.lru_tag, oid, index)]
        else:
            account = pool.account
            assert account is not None
            account.eph_pages -= 1
            if in_lru:
                slot = lru_key(pool.lru_tag, oid, index)
                try:
                    del account.lru[slot]
                except KeyError:  # TinyLFU: the page is in the main list (policy.py)
                    del account.main[slot]

    def trust(self, domain: Domain, trusted: bool) -> None:
        """(Un)trust a dedup domain: its pages count by their contents held, or by their
        charges again (``counted_bytes`` moves at once; the caller makes room)."""
        if trusted == domain.trusted:
            return
        sign = 1 if trusted else -1
        domain.trusted = trusted
        self.trusted_charged += sign * domain.charged_bytes
        self.contents.trusted_used += sign * domain.used_bytes

    def move_domain(self, pool: Pool, domain: Domain) -> None:
        """Re-key a private pool's pages into another dedup domain (O(its pages))."""
        contents = self.contents
        old = pool.domain
        charged = pool.charged_bytes
        self.charge(pool, -charged)
        for obj in pool.objects.values():
            for index, key in obj.items():
                if key != ZERO_KEY:
                    obj[index] = contents.rekey(key, domain)
                    contents.unref(key, old)
        pool.domain = domain
        pool.domain_bits = domain.bits
        self.charge(pool, charged)

    def recharge(self, pool: Pool, oid: int, index: int, charge: int) -> None:
        """The non-zero page at the handle is charged ``charge`` from now on (it was
        stored raw, 4096, and is kept compressed; or lz4 and is kept as zstd)."""
        old = pool.charges.get(slot_key(oid, index), PAGE_SIZE)
        if charge != PAGE_SIZE:
            pool.charges[slot_key(oid, index)] = charge
        else:
            pool.charges.pop(slot_key(oid, index), None)
        self.charge(pool, charge - old)

    def take(self, pool: Pool, oid: int, index: int) -> int | None:
        """Remove the page at the handle; its content key, or None when there was none."""
        obj = pool.objects.get(oid)
        if obj is None:
            return None
        key = obj.pop(index, None)
        if key is None:
            return None
        if not obj:
            del pool.objects[oid]
        self.drop(pool, oid, index, key)
        return key

    def take_object(self, pool: Pool, oid: int) -> int:
        """Remove every page of the object; how many there were."""
        obj = pool.objects.pop(oid, None)
        if obj is None:
            return 0
        for index, key in obj.items():
            self.drop(pool, oid, index, key)
        return len(obj)

    def clear(self, pool: Pool) -> int:
        """Drop every page of the pool; returns how many."""
        n = pool.pages
        for oid, obj in pool.objects.items():
            for index, key in obj.items():
                self.drop(pool, oid, index, key)
        pool.objects.clear()
        return n
