"""The replacing put's short way: a page overwritten in place by a new content of its size.

A swap device (the broker's NBD exports, a VM's swap) mostly writes pages over pages it
stored before. The general put (:meth:`broker.core.tmem.Tmem._put`) takes the old page away
(:meth:`PageTable.drop <broker.core.pages.PageTable.drop>`: pool and guest gauges, charges,
recency or LRU, the content's reference and bytes) and then places the new one, moving every
gauge back to where it was. :meth:`Replace._replace` does what that pair amounts to when it
amounts to little, and declines (returns False, having changed nothing) in every other case,
which then takes the general path:

* the old page is not the zero page, its content has no other reference and is stored raw
  (so its charge and its bytes are 4096, as the new page's will be: no gauge moves);
* the new page is not all zeros, and no other content has its digest (no dedup hit, no
  collision: then the general path compares bytes and shares);
* nothing would decline the put or change anything else: the guest is not frozen, under its
  quota, its put needs no compression, no admission gate and no TinyLFU is in force, and
  storage is at or below the reclaim watermark with room for the page without evicting.

Then only the content key at the handle changes (the old bytes go, the new ones come), the
page becomes the most recent of its guest's recency or its account's LRU, and a persistent
put is journaled, exactly as the general path leaves it: ``tests/core/test_replace.py`` holds
the two equal, field by field, for every kind of page and pool.

Why: a ``process_time`` loop of :meth:`Tmem.put <broker.core.tmem.Tmem.put>` replacing
random pages of a 65k-page persistent pool with new random contents (the exports' load):
4.29-4.58 µs per put through the general path, 3.22-3.64 µs this way (5 runs each, load 3);
5.2-6.2 against 4.0-4.9 µs in three interleaved pairs at load 11-14. What is left is mostly
the facade's checks, the digest (0.46 µs) and freeing the old 4 KiB (0.5-1 µs: glibc, a
page at a random place; ``MemoryPageStore``'s calls as dict slots did not change it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.core.content import ZERO_PAGE, Contents
from broker.core.keys import M32, MIX
from broker.core.pages import PageTable
from broker.core.registry import PACK_ALWAYS, Guest, Pool
from schemas.batch import PAGE_SIZE

if TYPE_CHECKING:
    from broker.core.admission import Admission
    from broker.core.eviction import Eviction
    from broker.core.journal import PersistentJournal


class Replace:
    """Mixed into :class:`broker.core.tmem.Tmem`: the short way of a replacing put."""

    _table: PageTable
    _ev: Eviction
    _contents: Contents
    _adm: Admission
    _journal: PersistentJournal | None

    def _replace(
        self,
        g: Guest,
        pool: Pool,
        pool_id: int,
        obj: dict[int, int],
        oid: int,
        index: int,
        old: int,
        data: bytes,
    ) -> bool:
        """Store ``data`` at the handle whose content key ``old`` (non-zero) was just popped
        from ``obj`` (the handle's object, possibly empty now), when the short way applies
        (module docstring); False: nothing changed, the caller goes on with the general path
        (whose first step is dropping ``old``). The put's counters are the caller's."""
        contents = self._contents
        if old in contents.refs or old in contents.sizes or g.frozen or data == ZERO_PAGE:
            return False
        persistent = pool.persistent
        account = pool.account
        if persistent:
            # the general path checks the quota once the old copy is gone: pages - 1 >= limit
            limit = g.limit
            if limit is not None and g.persistent_pages > limit:
                return False
        elif self._adm.settings is not None or account is None or account.tinylfu is not None:
            return False
        mixed = (index + (oid & M32) * MIX) & M32
        charges = pool.charges
        if charges and (oid << 32) | mixed in charges:
            return False  # (a raw content's only page is charged 4096: never true)
        table = self._table
        ev = self._ev
        # the general path's level: counted_bytes once the old copy (4096 counted, whether
        # its domain is trusted or not: bytes and charge are both 4096) is gone
        level = table.charged_bytes - table.trusted_charged + contents.trusted_used - PAGE_SIZE
        if level > ev.reclaim_above or level + PAGE_SIZE > ev.capacity:
            return False
        pack = g.pack
        if pack and (pack == PACK_ALWAYS or level > ev.compress_above):
            return False
        if contents.collided:
            return False
        key = contents.hash(data) | pool.domain_bits
        held = contents.get(key)
        if held is None:
            contents.delete(old)
            contents.put(key, data)
        elif key != old or held != data:
            return False  # another content has this digest: dedup (or a collision)
        # (else the same bytes again: the content stays as it is)
        if obj:
            obj[index] = key  # popped by the caller: the handle is its object's newest
        else:
            objects = pool.objects
            del objects[oid]
            objects[oid] = {index: key}
        slot = (oid << 56) | pool.lru_tag | mixed
        if persistent:
            recency = g.recency
            del recency[slot]
            recency[slot] = None
            if self._journal is not None:
                self._journal.record_put(g.guest_id, pool_id, oid, index, data)
        else:
            assert account is not None
            account.lru.move_to_end(slot)
        return True
