"""The tmem facade: every operation of the broker's memory, each rule in its own module.

:class:`Tmem` is what the service calls. It checks its arguments, then hands each concern to
the module that owns it (read those for the rules):

* :mod:`broker.core.registry` — guests, pools, shared pools and their authorisation, dedup
  domains (Xen: clients, pools, objects).
* :mod:`broker.core.content` — the content table: dedup by digest plus a byte compare,
  reference counts, compression (Xen: page content descriptors).
* :mod:`broker.core.pages` — placing and dropping a page at a handle, and every gauge and
  charge that moves with it (Xen: page descriptors).
* :mod:`broker.core.eviction` — capacity, eviction accounts and their LRUs, the watermarks.
* :mod:`broker.core.admission` — which ephemeral puts are admitted while memory is tight.
* :mod:`broker.core.compression` — compression modes' background pass over cold pages.
* :mod:`broker.core.accounting` — operation counters; :mod:`broker.core.figures` — the typed
  figures built from them.
* :mod:`broker.core.restore` — batches, restore at start, export views, shed candidates
  (:class:`~broker.core.restore.PageMoves`, mixed in); :mod:`broker.core.stats` — the
  figure methods (:class:`~broker.core.stats.Stats`, mixed in).
* :mod:`broker.core.keys` — the int keys naming a handle in those dicts.
* :mod:`broker.core.replace` — a replacing put's short way (:class:`Replace`, mixed in).

The put and get paths here are the hot path; where they write a rule of those modules inline
for speed, a comment names the one method mirrored and a figure says what it pays.

Privacy (no guest may learn whether another guest holds some content)
    * A put's *charge* is its own stored size (:mod:`broker.core.pages`); in an untrusted
      dedup domain every capacity decision counts charges, never bytes actually held
      (:mod:`broker.core.eviction`; trusted domains give this up on purpose). The old copy at
      the handle is removed *before* the decision because both outcomes remove it.
    * :meth:`Tmem.guest_stats` and :meth:`Tmem.pool_stats` report only figures that depend on
      the guest's own operations and contents: pages, zero pages, the sum of its charges
      (``charged_bytes``) and its compression ratio; never unique pages, dedup hits or actual
      bytes held. Those appear only in the admin view (:meth:`Tmem.stats`).
    * Known limit: a put or get that shares a content takes a different time than one that
      stores a new copy; Python cannot make that constant. Dedup domains bound who shares.
    * Quotas: see :mod:`broker.core.registry` (``Guest.relimit``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from broker.core.accounting import Ops
from broker.core.admission import Admission
from broker.core.compression import MAX_RECOMPRESS_PER_STEP, ColdCompressor, IdleRecompressor
from broker.core.content import ZERO_KEY, ZERO_PAGE, Contents, Hasher, xxh3_128
from broker.core.errors import BadPageSize, BadRequest, GuestExists
from broker.core.eviction import Eviction
from broker.core.journal import PersistentJournal
from broker.core.keys import M32, MIX
from broker.core.model import (
    UNSET,
    CoreConfig,
    DomainView,
    PoolView,
    Unset,
)
from broker.core.pages import PageTable
from broker.core.pressure import PressureSettings
from broker.core.registry import (
    PACK_ALWAYS,
    Domain,
    Guest,
    Pool,
    Registry,
    check_cap,
    check_compress_mode,
    check_weight,
    normalise_uuid,
)
from broker.core.replace import Replace
from broker.core.restore import BatchOp as BatchOp
from broker.core.restore import PageMoves, check_handle
from broker.core.stats import Stats
from broker.core.store import MemoryPageStore, PageStore
from schemas.batch import (
    PAGE_SIZE,
    STATUS_CAPACITY,
    STATUS_DONE,
    STATUS_FROZEN,
    STATUS_POLICY,
    STATUS_QUOTA,
)


class Tmem(Replace, PageMoves, Stats):
    """The broker's memory: every rule of tmem, no I/O. Not thread-safe: call from one thread
    (the event loop). Page calls return statuses; only malformed input raises (and then
    nothing changed)."""

    def __init__(
        self,
        config: CoreConfig,
        *,
        store: PageStore | None = None,
        journal: PersistentJournal | None = None,
        clock: Callable[[], float] = time.monotonic,
        hasher: Hasher = xxh3_128,
        salt: int | None = None,
    ) -> None:
        if config.capacity_bytes < 0:
            raise BadRequest("capacity_bytes must be >= 0")
        if config.max_pools_per_guest < 1:
            raise BadRequest("max_pools_per_guest must be >= 1")
        self.config = config
        self.clock = clock
        self.store: PageStore = store if store is not None else MemoryPageStore()
        self._journal = journal
        self._contents = Contents(self.store, hasher, int(config.compress_max_ratio * PAGE_SIZE))
        self._table = PageTable(self._contents)
        self._ev = Eviction(self._table, config.capacity_bytes, salt=salt)
        self.ephemeral_policy = config.ephemeral_policy
        self._adm = Admission()
        self._reg = Registry(config.max_pools_per_guest, config.compress_default)
        self._retired = Ops()  # counters of removed guests
        self._cold = ColdCompressor(self._reg, self._table, self._ev)
        self._idle = IdleRecompressor(self._reg, self._table) if config.recompress else None

    # ------------------------------------------------------------------ figures read often

    @property
    def charged_bytes(self) -> int:
        """The sum of every page's charge: what ``used_bytes`` would be without sharing.
        Capacity decisions use it (see :mod:`broker.core.eviction`)."""
        return self._table.charged_bytes

    @property
    def counted_bytes(self) -> int:
        """Page storage counted against capacity: charges in untrusted dedup domains, bytes
        actually held in trusted ones (see :mod:`broker.core.eviction`)."""
        return self._table.counted_bytes

    # ------------------------------------------------------------------ capacity

    @property
    def capacity_bytes(self) -> int:
        """Bytes of page storage the broker may hold; settable at run time (evicts at once)."""
        return self._ev.capacity

    @capacity_bytes.setter
    def capacity_bytes(self, value: int) -> None:
        if type(value) is not int or value < 0:
            raise BadRequest(f"capacity_bytes must be an integer >= 0, not {value!r}")
        self._ev.set_capacity(value)

    def evict(self, bytes_to_free: int) -> int:
        """Evict ephemeral pages (weight-fair LRU) until ``charged_bytes`` fell by
        ``bytes_to_free`` or none is left; returns the pages evicted. Like every capacity
        decision this counts charges, not bytes actually held, so how many pages go never
        depends on what other guests share."""
        return self._ev.evict(bytes_to_free)

    # ------------------------------------------------------------------ pressure hooks

    def configure_pressure(self, settings: PressureSettings | None) -> None:
        """Turn on (or, with None, off) the put path's watermark step and admission gate;
        settings also choose the ephemeral policy (None keeps the one in force)."""
        self._ev.configure(settings)
        self._adm.settings = settings
        if settings is not None:
            self.ephemeral_policy = settings.ephemeral_policy

    @property
    def ephemeral_policy(self) -> str:
        """Which page of an eviction account goes: ``lru`` or ``tinylfu``
        (:mod:`broker.core.policy`); settable (pages held stay, O(pages) once)."""
        return self._ev.ephemeral_policy

    @ephemeral_policy.setter
    def ephemeral_policy(self, name: str) -> None:
        if name != self._ev.ephemeral_policy:
            try:
                self._ev.set_policy(name)
            except ValueError as exc:
                raise BadRequest(str(exc)) from exc

    def set_pressure_bias(self, guest_id: int, bias: float) -> None:
        """Multiply the guest's weight by ``bias`` (> 0) when choosing whose ephemeral pages
        go (:func:`broker.core.pressure.pressure_multiplier`; 1: neutral)."""
        if not bias > 0:
            raise BadRequest(f"bias must be > 0, not {bias!r}")
        account = self._reg.guest(guest_id).account
        if account.bias != bias:
            account.bias = bias

    @property
    def reclaiming(self) -> bool:
        """Whether puts are evicting toward the low watermark (above the high one lately)."""
        return self._ev.reclaiming

    def set_quota(self, guest_id: int, quota_pages: int | None, *, hold: int | None = None) -> None:
        """Set the guest's dynamic quota (None: none); ``hold`` lets it keep (not grow past)
        that many pages until the quota is set again without one (the shed's deadline)."""
        g = self._reg.guest(guest_id)
        check_cap(quota_pages)
        check_cap(hold)
        g.quota_pages = quota_pages
        g.hold = hold
        g.relimit()

    def quota_of(self, guest_id: int) -> int | None:
        """The guest's effective quota, ``min(cap_pages, dynamic quota)``."""
        return self._reg.guest(guest_id).effective_quota()

    def persistent_pages_of(self) -> dict[int, tuple[int, int, int | None]]:
        """``guest_id -> (persistent pages, weight, cap_pages)`` for every guest: O(guests)."""
        return {
            gid: (g.persistent_pages, g.weight, g.cap_pages) for gid, g in self._reg.guests.items()
        }

    # ------------------------------------------------------------------ guests

    def add_guest(
        self,
        guest_id: int,
        *,
        name: str,
        weight: int = 100,
        cap_pages: int | None = None,
        dedup_domain: str = "default",
        compress: bool | None = None,
        frozen: bool = False,
    ) -> None:
        """Make a guest known. ``guest_id`` is the caller's (the service's database id).
        ``compress`` None takes the domain's mode, else the broker's default."""
        reg = self._reg
        if guest_id in reg.guests:
            raise GuestExists(f"guest {guest_id} exists")
        check_weight(weight)
        check_cap(cap_pages)
        domain = reg.domain(dedup_domain)
        g = reg.guests[guest_id] = Guest(
            guest_id,
            name,
            cap_pages=cap_pages,
            domain=domain,
            compress=None if compress is None else bool(compress),
            frozen=bool(frozen),
            account=self._ev.new_account(weight),
        )
        reg.repack(g)

    def update_guest(
        self,
        guest_id: int,
        *,
        weight: int | None = None,
        cap_pages: int | Unset | None = UNSET,
        compress: bool | Unset | None = UNSET,
        dedup_domain: str | None = None,
    ) -> None:
        """Change a guest's settings; arguments left out stay (``compress`` None: inherit
        the domain's mode). A lower ``cap_pages`` drops nothing (the guest's new puts are
        declined until it is under). A new ``dedup_domain`` moves the guest's private pages
        to that domain (O(its pages))."""
        reg = self._reg
        g = reg.guest(guest_id)
        if weight is not None:
            check_weight(weight)
        if not isinstance(cap_pages, Unset):
            check_cap(cap_pages)
        domain = reg.domain(dedup_domain) if dedup_domain is not None else g.domain
        if weight is not None:
            g.account.weight = weight
            for pool in g.pools.values():
                if pool.shared:
                    reg.reweigh(pool)
        if not isinstance(cap_pages, Unset):
            g.cap_pages = cap_pages
            g.relimit()
        if domain is not g.domain:
            self._move_domain(g, domain)
        if not isinstance(compress, Unset):
            g.compress = None if compress is None else bool(compress)
        reg.repack(g)

    def _move_domain(self, g: Guest, domain: Domain) -> None:
        """Re-key the guest's private pages into another dedup domain."""
        for pool in g.pools.values():
            if not pool.shared:
                self._table.move_domain(pool, domain)
        g.domain = domain
        self._ev.make_room(0)

    # ------------------------------------------------------------------ dedup domains

    def set_domain(
        self, name: str, *, trusted: bool | None = None, compress: str | Unset | None = UNSET
    ) -> list[int]:
        """Set a dedup domain's trust and compression mode (None: the broker's default);
        arguments left out stay. Returns the ids of the domain's guests whose own explicit
        ``compress`` overrides the domain's mode (reported, not guessed: theirs wins).
        Untrusting a domain may evict ephemeral pages at once (its shared contents count
        per page again)."""
        if trusted is not None and type(trusted) is not bool:
            raise BadRequest(f"trusted must be true or false, not {trusted!r}")
        if not isinstance(compress, Unset):
            check_compress_mode(compress)
        domain = self._reg.domain(name)
        if trusted is not None:
            self._table.trust(domain, trusted)
        overriding = self._reg.set_compress(domain, compress)
        self._ev.make_room(0)
        return overriding

    def domains(self) -> list[DomainView]:
        """Every dedup domain known (named by a guest or by :meth:`set_domain`)."""
        return self._reg.domain_views()

    @property
    def compress_default(self) -> str:
        """The compression mode of guests and domains that set none; settable."""
        return self._reg.compress_default

    @compress_default.setter
    def compress_default(self, mode: str) -> None:
        self._reg.set_compress_default(mode)

    def compress_mode_of(self, guest_id: int) -> str:
        """The guest's compression mode: its own, else its domain's, else the default."""
        return self._reg.compress_mode(self._reg.guest(guest_id))

    def compress_cold(self, max_pages: int) -> int:
        """The ``pressure`` mode's background pass: while storage is above the high
        watermark, keep up to ``max_pages`` stored pages of guests in that mode as lz4
        blocks, those least likely to be read soon first (:mod:`broker.core.compression`).
        Returns the pages compressed. Call it from a background loop."""
        return self._cold.step(max_pages)

    def recompress_idle(self, max_pages: int = MAX_RECOMPRESS_PER_STEP) -> int:
        """With ``CoreConfig.recompress``: keep up to ``max_pages`` idle lz4 pages as zstd
        (:class:`broker.core.compression.IdleRecompressor`); returns how many."""
        return 0 if self._idle is None else self._idle.step(max_pages)

    def remove_guest(self, guest_id: int) -> None:
        """Every page of the guest goes; it leaves its shared pools (which live on while
        other members use them)."""
        reg = self._reg
        g = reg.guest(guest_id)
        had_persistent = any(p.persistent for p in g.pools.values())
        for pool_id in list(g.pools):
            self._destroy(g, pool_id, journal=False)
        del reg.guests[guest_id]
        self._ev.close_account(g.account)
        reg.forget_authorisations(guest_id)
        self._retired.add(g)
        if had_persistent and self._journal is not None:
            self._journal.record_remove_guest(guest_id)

    def has_guest(self, guest_id: int) -> bool:
        """Whether the guest is known."""
        return guest_id in self._reg.guests

    def freeze(self, guest_id: int) -> None:
        """Decline the guest's puts with ``frozen`` until :meth:`thaw` (gets still work)."""
        self._reg.guest(guest_id).frozen = True

    def thaw(self, guest_id: int) -> None:
        """Undo :meth:`freeze`."""
        self._reg.guest(guest_id).frozen = False

    def is_frozen(self, guest_id: int) -> bool:
        """Whether the guest is frozen."""
        return self._reg.guest(guest_id).frozen

    def flush_guest(self, guest_id: int) -> int:
        """Flush every page of the guest's own pools (shared pools are not its own); the
        pools stay. Returns the pages flushed."""
        g = self._reg.guest(guest_id)
        flushed = 0
        persistent = False
        for pool in g.pools.values():
            if not pool.shared:
                persistent = persistent or (pool.persistent and pool.pages > 0)
                flushed += self._table.clear(pool)
        if persistent and self._journal is not None:
            self._journal.record_remove_guest(guest_id)
        return flushed

    def drain_evicted(self, guest_id: int) -> int:
        """Pages of the guest's private pools evicted since the last call (for the
        ``evicted`` notice)."""
        g = self._reg.guest(guest_id)
        n, g.evicted_unreported = g.evicted_unreported, 0
        return n

    def authorise_shared(self, uuid: str, guest_id: int, allow: bool) -> None:
        """Allow (or stop allowing) the guest to create or join the shared pool ``uuid``.
        Revoking does not throw out a guest that has joined already."""
        self._reg.authorise(uuid, guest_id, allow)

    def is_authorised(self, uuid: str, guest_id: int) -> bool:
        """Whether the guest may create or join the shared pool ``uuid``."""
        return self._reg.is_authorised(normalise_uuid(uuid), guest_id)

    def guests(self) -> Iterable[int]:
        """Ids of the known guests, in the order they were added."""
        return list(self._reg.guests)

    # ------------------------------------------------------------------ pools

    def create_pool(
        self,
        guest_id: int,
        kind: str,
        *,
        shared: bool = False,
        uuid: str | None = None,
        exclusive_gets: bool = False,
        pool_id: int | None = None,
    ) -> int:
        """Create a pool (or join the shared pool ``uuid``) and return the guest's id for it:
        ``pool_id`` when given (restart), else the lowest free one. Joining a shared pool the
        guest is in already returns the id it has."""
        return self._reg.create_pool(
            self._reg.guest(guest_id),
            kind,
            self._ev,
            shared=shared,
            uuid=uuid,
            exclusive_gets=exclusive_gets,
            pool_id=pool_id,
        )

    def destroy_pool(self, guest_id: int, pool_id: int) -> None:
        """Destroy the guest's pool and its pages; for a shared pool, leave it (its pages go
        with its last member). Idempotent for a free pool id."""
        self._destroy(self._reg.guest(guest_id), pool_id, journal=True)

    def _destroy(self, g: Guest, pool_id: int, *, journal: bool) -> None:
        pool = g.pools.pop(pool_id, None)
        if pool is None:
            return
        if pool.shared:
            del pool.members[g.guest_id]
            if pool.members:
                self._reg.reweigh(pool)
                return
            assert pool.uuid is not None and pool.account is not None
            del self._reg.shared[pool.uuid]
            self._ev.close_account(pool.account)
        self._table.clear(pool)
        self._ev.remove_pool(pool)
        if pool.persistent and journal and self._journal is not None:
            self._journal.record_destroy_pool(g.guest_id, pool_id)

    def pools(self, guest_id: int) -> list[PoolView]:
        """The guest's pools, by pool id."""
        g = self._reg.guest(guest_id)
        return [
            PoolView(pid, p.kind, p.shared, p.uuid, p.exclusive_gets, p.pages)
            for pid, p in sorted(g.pools.items())
        ]

    # ------------------------------------------------------------------ pages

    def put(
        self, guest_id: int, pool_id: int, oid: int, index: int, data: bytes | memoryview
    ) -> int:
        """Store a page at (pool, oid, index), replacing what was there. Returns
        ``Status.DONE`` or the reason it was declined (then nothing is at the handle)."""
        g, pool = self._reg.pool(guest_id, pool_id)
        if len(data) != PAGE_SIZE:
            raise BadPageSize(f"a page is {PAGE_SIZE} bytes, not {len(data)}")
        check_handle(oid, index)
        return self._put(g, pool, pool_id, oid, index, data)

    def _put(
        self, g: Guest, pool: Pool, pool_id: int, oid: int, index: int, data: bytes | memoryview
    ) -> int:
        # The hot path. Three rules are written inline here, each marked with the one method it
        # mirrors: PageTable.take (the old copy), Contents.reference (a new content) and
        # PageTable.place. Calling them instead cost 1.47-1.55 -> 1.74-1.85 us per persistent
        # put (+20 %, core only: a process_time loop over Tmem.put, as bench/core_bench.py);
        # tests/core/test_inlined.py holds the inlined copies equal to the methods.
        if type(data) is not bytes:
            data = bytes(data)
        pool.puts += 1
        g.puts += 1
        table = self._table
        objects = pool.objects
        obj = objects.get(oid)
        old = None
        if obj is not None:  # PageTable.take, inlined
            old = obj.pop(index, None)
            if old is not None:
                if old >= 0 and self._replace(g, pool, pool_id, obj, oid, index, old, data):
                    return STATUS_DONE  # the short way (broker.core.replace)
                if not obj:
                    del objects[oid]
                table.drop(pool, oid, index, old)
        persistent = pool.persistent
        if g.frozen:
            pool.declined_frozen += 1
            g.declined_frozen += 1
            status = STATUS_FROZEN
        elif persistent and g.limit is not None and g.persistent_pages >= g.limit:
            pool.declined_quota += 1
            g.declined_quota += 1
            status = STATUS_QUOTA
        elif (
            not persistent
            and self._adm.settings is not None
            and not self._adm.admit(
                g, pool, oid, index, data, table.counted_bytes > self._ev.low_bytes
            )
        ):
            pool.declined_policy += 1
            g.declined_policy += 1
            status = STATUS_POLICY
        else:
            ev = self._ev
            contents = self._contents
            # PageTable.counted_bytes, inlined
            level = table.charged_bytes - table.trusted_charged + contents.trusted_used
            if level > ev.reclaim_above:
                ev.reclaim_step()
                level = table.charged_bytes - table.trusted_charged + contents.trusted_used
            domain = pool.domain
            if data == ZERO_PAGE:
                stored = data
                charge = need = 0
            else:
                stored = data
                pack = g.pack
                if pack and (pack == PACK_ALWAYS or level > ev.compress_above):
                    stored, poor = contents.pack(data, True)
                    if poor:
                        pool.compress_poor += 1
                        g.compress_poor += 1
                        if self._adm.too_costly(g):
                            pool.declined_policy += 1
                            g.declined_policy += 1
                            if old is not None and persistent and self._journal is not None:
                                self._journal.record_flush(g.guest_id, pool_id, oid, index)
                            return STATUS_POLICY
                need = charge = len(stored)
                if (
                    domain.trusted
                    and level <= ev.capacity  # (else making room could evict the copy found)
                    and contents.find(data, domain.bits) is not None
                ):
                    need = 0  # a trusted domain holds this content already
            if level + need <= ev.capacity or ev.make_room(need):
                if charge:
                    key = contents.hash(data) | pool.domain_bits
                    if contents.collided or contents.get(key) is not None:
                        key, hit = contents.acquire(key, data, stored, domain)
                        if hit:
                            pool.dedup_hits += 1
                            g.dedup_hits += 1
                    else:  # Contents.reference -> Contents.add, inlined: a new content
                        contents.put(key, stored)
                        if charge != PAGE_SIZE:
                            contents.sizes[key] = charge
                        contents.used_bytes += charge
                        domain.used_bytes += charge
                        if domain.trusted:
                            contents.trusted_used += charge
                        contents.unique_pages += 1
                else:
                    key = ZERO_KEY
                # PageTable.place, inlined
                obj = objects.get(oid)  # again: making room may have emptied the object
                if obj is None:
                    objects[oid] = {index: key}
                else:
                    obj[index] = key
                pool.pages += 1
                mixed = (index + (oid & M32) * MIX) & M32
                if charge == 0:
                    pool.zero_pages += 1
                else:
                    table.charge(pool, charge)
                    if charge != PAGE_SIZE:
                        pool.charges[(oid << 32) | mixed] = charge
                slot = (oid << 56) | pool.lru_tag | mixed
                if persistent:
                    g.persistent_pages += 1  # persistent pools are private: g owns it
                    g.recency[slot] = None
                    if self._journal is not None:
                        self._journal.record_put(g.guest_id, pool_id, oid, index, data)
                else:
                    account = pool.account
                    assert account is not None
                    account.eph_pages += 1
                    account.lru[slot] = None
                    if account.tinylfu is not None:  # the LRU default pays this test only
                        account.tinylfu.on_put(account.lru, account.main, slot)
                return STATUS_DONE
            pool.declined_capacity += 1
            g.declined_capacity += 1
            status = STATUS_CAPACITY
        if old is not None and persistent and self._journal is not None:
            self._journal.record_flush(g.guest_id, pool_id, oid, index)
        return status

    def get(self, guest_id: int, pool_id: int, oid: int, index: int) -> bytes | None:
        """The page at the handle or None (a miss). Exclusive (the page leaves) in private
        ephemeral pools and in persistent pools made with ``exclusive_gets``."""
        g, pool = self._reg.pool(guest_id, pool_id)
        check_handle(oid, index)
        return self._get(g, pool, pool_id, oid, index)

    def _get(self, g: Guest, pool: Pool, pool_id: int, oid: int, index: int) -> bytes | None:
        pool.gets += 1
        g.gets += 1
        obj = pool.objects.get(oid)
        key = None if obj is None else obj.get(index)
        if key is None:
            account = pool.account
            if account is not None and account.tinylfu is not None:
                # a miss is demand too: the page is worth more when it is put again
                account.tinylfu.on_get(
                    (oid << 56) | pool.lru_tag | ((index + (oid & M32) * MIX) & M32)
                )
            return None
        assert obj is not None
        pool.get_hits += 1
        g.get_hits += 1
        page = self._contents.load(key)
        if pool.persistent:
            if pool.exclusive_gets:
                del obj[index]
                if not obj:
                    del pool.objects[oid]
                self._table.drop(pool, oid, index, key)
                if self._journal is not None:
                    self._journal.record_flush(g.guest_id, pool_id, oid, index)
            else:
                # the page is the guest's most recently used now (shed candidates go last)
                recency = g.recency
                slot = (oid << 56) | pool.lru_tag | ((index + (oid & M32) * MIX) & M32)
                del recency[slot]
                recency[slot] = None
        elif pool.shared:
            g.gate.record_hit()
            account = pool.account
            assert account is not None
            # keys.lru_key, inlined: a shared get does nothing else but this
            slot = (oid << 56) | pool.lru_tag | ((index + (oid & M32) * MIX) & M32)
            if account.tinylfu is None:
                account.lru.move_to_end(slot)
            else:
                account.tinylfu.on_hit(slot)
                # the page stays in its list (window or main), as the newest there
                (account.lru if slot in account.lru else account.main).move_to_end(slot)
        else:
            g.gate.record_hit()
            account = pool.account
            assert account is not None
            if account.tinylfu is not None:
                # the page leaves (exclusive get); its count stays for when it is put again
                account.tinylfu.on_hit(
                    (oid << 56) | pool.lru_tag | ((index + (oid & M32) * MIX) & M32)
                )
            del obj[index]
            if not obj:
                del pool.objects[oid]
            self._table.drop(pool, oid, index, key)
        return page

    def flush_page(self, guest_id: int, pool_id: int, oid: int, index: int) -> bool:
        """Remove the page at the handle; True when there was one. Idempotent."""
        g, pool = self._reg.pool(guest_id, pool_id)
        check_handle(oid, index)
        return self._flush_page(g, pool, pool_id, oid, index)

    def _flush_page(self, g: Guest, pool: Pool, pool_id: int, oid: int, index: int) -> bool:
        pool.flushes += 1
        g.flushes += 1
        if self._table.take(pool, oid, index) is None:
            return False
        pool.flushes_found += 1
        g.flushes_found += 1
        if pool.persistent and self._journal is not None:
            self._journal.record_flush(g.guest_id, pool_id, oid, index)
        return True

    def flush_object(self, guest_id: int, pool_id: int, oid: int) -> int:
        """Remove every page of the object; returns how many. Idempotent. O(its pages)."""
        g, pool = self._reg.pool(guest_id, pool_id)
        check_handle(oid, 0)
        return self._flush_object(g, pool, pool_id, oid)

    def _flush_object(self, g: Guest, pool: Pool, pool_id: int, oid: int) -> int:
        pool.object_flushes += 1
        g.object_flushes += 1
        n = self._table.take_object(pool, oid)
        if n and pool.persistent and self._journal is not None:
            self._journal.record_flush_object(g.guest_id, pool_id, oid)
        return n
