"""The tmem model: guests, pools, objects, pages, page contents, eviction and accounting.

Shape (Xen's nouns)::

    Tmem
    ├── guests: guest_id -> _Guest            (Xen: client)
    │     └── pools: pool_id -> _Pool         a guest's own pool ids, 0..max_pools_per_guest-1
    ├── shared: uuid -> _Pool                 shared ephemeral pools, joined by authorised guests
    └── store: content key -> bytes           page contents (Xen: page content descriptors)

    _Pool.objects: oid -> {index: content key}   (Xen: pool -> object -> page descriptor)

Per page the core keeps only ints in dicts: the index, and a content key shared by every
handle with the same content (see :mod:`broker.core.content`). Reference counts live in a
dict holding only contents with two or more references; sizes only for compressed contents.
So a page costs no Python container of its own and the cyclic garbage collector has
nothing per page to scan. Flush object pops one object dict: O(pages of that object).

Dedup and compression
    Identical contents of one dedup domain are stored once: xxh3_128 digest, then a
    byte-for-byte compare against the stored copy before sharing (a digest collision gets its
    own key and its own copy). A content's bytes go when its last reference goes. All-zero
    pages take no storage. A guest with ``compress`` keeps the lz4 block of a page when it is
    at most ``compress_max_ratio * 4096`` bytes long, else the raw page (``compress_poor``).
    Dedup looks at raw contents; the stored copy is whatever form its first putter chose.

Privacy (no guest may learn whether another guest holds some content)
    * A put's *charge* is its own stored size: 0 for a zero page, the lz4 length when the
      guest compresses and the page shrinks enough, else 4096, whether or not the content is
      already stored elsewhere. The capacity decision uses charges, never actual bytes: a put
      fits when ``charged_bytes + charge <= capacity_bytes`` (after evicting ephemeral pages),
      where ``charged_bytes`` is the sum of every page's charge. So a put that would dedup is
      declined exactly when a fresh one would, and neither does sharing an earlier put made
      leave room for more later (a guest filling the broker would count one page more when
      its first page had been shared). Sharing saves memory, not admission.
      The old copy at the handle is removed *before* the decision because both outcomes
      remove it.
    * :meth:`Tmem.guest_stats` and :meth:`Tmem.pool_stats` report only figures that depend on
      the guest's own operations and contents: pages, zero pages, the sum of its charges
      (``charged_bytes``) and its compression ratio; never unique pages, dedup hits or actual
      bytes held. Those appear only in the admin view (:meth:`Tmem.stats`).
    * Known limit: a put or get that shares a content takes a different time than one that
      stores a new copy; Python cannot make that constant. Dedup domains bound who shares.

Quota
    ``cap_pages`` caps a guest's persistent logical pages (zero pages included). A put that
    replaces a page at the cap is allowed (its old copy is removed first); a guest above its
    cap (after a lowered cap) gets new puts declined with ``quota`` until it is back under.
    The pressure policy adds a *dynamic* quota (:meth:`Tmem.set_quota`); the effective quota
    is ``min(cap_pages, quota)``. While a shed is open the put path enforces
    ``max(effective, hold)`` instead (``hold``: the pages held when the quota was lowered, so
    the guest cannot grow but is not declined before its deadline). The put path compares
    one precomputed limit: O(1).

Pressure hooks (see :mod:`broker.core.pressure`)
    With :meth:`Tmem.configure_pressure`, a put that finds storage above the high watermark
    evicts at most ``RECLAIM_PER_PUT`` ephemeral pages, and keeps doing so on later puts until
    storage is under the low watermark (hysteresis). While storage is above the low
    watermark, ephemeral non-zero puts pass each guest's :class:`AdmissionGate` (hit-rate
    feedback) and are declined with ``policy`` when it says no (``policy_declines``
    counts them by sub-reason, ``low_hit_rate``).
    "Storage" here is ``charged_bytes``, as in every capacity decision, so which pages are
    evicted or admitted never depends on what other guests share.

Capacity and eviction
    ``used_bytes`` (page storage actually held) never exceeds ``capacity_bytes`` except when
    persistent pages alone exceed it after the capacity was lowered or pages were restored.
    When a put needs room, ephemeral pages are evicted first, least recently used within an
    *eviction account*, taking from the account furthest over its weighted share: the largest
    ``ephemeral_pages / weight`` (ties: the older account). Each guest is one account for its
    private ephemeral pools; each shared pool is an account of its own whose weight is the
    largest weight of its members, so a shared pool is as hard to evict from as its
    best-weighted member's private pages. Persistent pages are never evicted: a put that cannot
    fit is declined with ``capacity``. Each eviction is O(1) in pages (a loop over accounts).

Shared pools
    Ephemeral, named by a UUID, joined only by guests authorised for it; gets are never
    exclusive. A guest that destroys its shared pool id (or is removed) leaves it; the pool
    and its pages go with its last member. Pages are deduplicated in the dedup domain of the
    guest that created the pool. Their pages count in the pool's own figures and in the
    global ones, not in any member's.

Counters
    Operation counters (puts, declines by reason, gets, hits, flushes, object flushes,
    evictions, compress_poor, dedup hits) are kept as they happen per pool and per guest;
    page gauges per pool and, where a decision needs them, per guest and globally. Figures
    of a guest or of the whole broker are sums over pools and guests, never over pages.
"""

from __future__ import annotations

import time
import uuid as uuid_module
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence

from broker.core import figures
from broker.core.content import (
    COLLISION_SHIFT,
    DOMAIN_SHIFT,
    MAX_DOMAINS,
    ZERO_KEY,
    ZERO_PAGE,
    Hasher,
    compress,
    decompress,
    xxh3_128,
)
from broker.core.errors import (
    BadHandle,
    BadPageSize,
    BadRequest,
    Conflict,
    GuestExists,
    NotAuthorised,
    TooManyPools,
    UnknownGuest,
    UnknownPool,
)
from broker.core.figures import BrokerFigures, GuestFigures, PoolFigures
from broker.core.journal import PersistentJournal
from broker.core.model import EPHEMERAL, KINDS, PERSISTENT, UNSET, CoreConfig, PoolView, Unset
from broker.core.pressure import AdmissionGate, PressureSettings
from broker.core.store import MemoryPageStore, PageStore
from schemas.batch import (
    MAX_INDEX,
    MAX_OID,
    OP_FLUSH_OBJECT,
    OP_FLUSH_PAGE,
    OP_GET,
    OP_PUT,
    PAGE_SIZE,
    STATUS_CAPACITY,
    STATUS_DONE,
    STATUS_FROZEN,
    STATUS_MISS,
    STATUS_POLICY,
    STATUS_QUOTA,
)

BatchOp = tuple[int, int, int, "bytes | memoryview | None"]

# Per-page keys of LRUs and charges. An LRU key is ``oid << 56 | ref << 32 | mixed`` where
# ``ref`` (24 bits: up to 16M live ephemeral pools) names the pool and ``mixed = (index +
# (oid & M32) * _MIX) & M32`` (invertible given the oid). The index sits in the low bits,
# mixed with the oid, because an int hashes to itself: with constant low bits (the pool ref,
# as a first version had) a million-entry dict degenerates into long probe chains.
_REF_MASK = (1 << 24) - 1
_M32 = MAX_INDEX
_MIX = 0x9E3779B1
_OPS = (OP_PUT, OP_GET, OP_FLUSH_PAGE, OP_FLUSH_OBJECT)
# A put above the high watermark evicts at most this many pages: bounded work per put, and
# more than the one page a put adds, so puts alone bring storage down to the low watermark.
RECLAIM_PER_PUT = 2

_OP_COUNTERS = (
    "puts",
    "declined_quota",
    "declined_capacity",
    "declined_frozen",
    "declined_policy",
    "gets",
    "get_hits",
    "flushes",
    "flushes_found",
    "object_flushes",
    "evictions",
    "compress_poor",
    "dedup_hits",
)


class _Ops:
    """Operation counters, kept per pool, per guest and for removed guests."""

    __slots__ = _OP_COUNTERS

    def __init__(self) -> None:
        self.puts = 0
        self.declined_quota = 0
        self.declined_capacity = 0
        self.declined_frozen = 0
        self.declined_policy = 0
        self.gets = 0
        self.get_hits = 0
        self.flushes = 0
        self.flushes_found = 0
        self.object_flushes = 0
        self.evictions = 0
        self.compress_poor = 0
        self.dedup_hits = 0

    def add(self, other: _Ops) -> None:
        for name in _OP_COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class _Account:
    """An eviction account: ephemeral pages in LRU order (oldest first) and a weight."""

    __slots__ = ("eph_pages", "lru", "serial", "weight")

    def __init__(self, serial: int, weight: int) -> None:
        self.serial = serial
        self.weight = weight
        self.eph_pages = 0
        # LRU keys: see _MIX. OrderedDict: O(1) pop of the oldest (a plain dict re-scans the
        # deleted slots at its front on every pop).
        self.lru: OrderedDict[int, None] = OrderedDict()


class _Pool(_Ops):
    """A pool: objects of pages, page gauges and (ephemeral) its eviction account."""

    __slots__ = (
        "account",
        "charged_bytes",
        "charges",
        "domain_bits",
        "exclusive_gets",
        "lru_tag",
        "members",
        "objects",
        "owner",
        "pages",
        "persistent",
        "ref",
        "shared",
        "uuid",
        "zero_pages",
    )

    def __init__(
        self,
        *,
        persistent: bool,
        shared: bool,
        uuid: str | None,
        exclusive_gets: bool,
        owner: _Guest | None,
        account: _Account | None,
        ref: int,
        domain_bits: int,
    ) -> None:
        super().__init__()
        self.persistent = persistent
        self.shared = shared
        self.uuid = uuid
        self.exclusive_gets = exclusive_gets
        self.owner = owner  # None for a shared pool
        self.account = account  # None for a persistent pool
        self.ref = ref  # LRU keys name the pool by this (ephemeral pools only)
        self.lru_tag = ref << 32
        self.domain_bits = domain_bits
        self.objects: dict[int, dict[int, int]] = {}
        # members of a shared pool: guest_id -> that guest's pool id
        self.members: dict[int, int] = {}
        self.pages = 0
        self.zero_pages = 0
        self.charged_bytes = 0
        # charge of each page whose charge is neither 4096 (non-zero) nor 0 (zero page):
        # compressed pages only, keyed by oid << 32 | mixed index (see _MIX)
        self.charges: dict[int, int] = {}

    @property
    def kind(self) -> str:
        return PERSISTENT if self.persistent else EPHEMERAL


class _Guest(_Ops):
    """A guest (Xen: client): settings, pools, its eviction account, its persistent pages."""

    __slots__ = (
        "account",
        "cap_pages",
        "compress",
        "dedup_domain",
        "domain_bits",
        "evicted_unreported",
        "frozen",
        "gate",
        "guest_id",
        "hold",
        "limit",
        "name",
        "persistent_pages",
        "policy_low_hit_rate",
        "pools",
        "quota_pages",
    )

    def __init__(
        self,
        guest_id: int,
        name: str,
        *,
        cap_pages: int | None,
        dedup_domain: str,
        domain_bits: int,
        compress: bool,
        frozen: bool,
        account: _Account,
    ) -> None:
        super().__init__()
        self.guest_id = guest_id
        self.name = name
        self.cap_pages = cap_pages
        self.dedup_domain = dedup_domain
        self.domain_bits = domain_bits
        self.compress = compress
        self.frozen = frozen
        self.account = account
        self.pools: dict[int, _Pool] = {}
        self.persistent_pages = 0
        self.evicted_unreported = 0
        # dynamic quota (pressure policy), the shed grace floor, and what the put path checks
        self.quota_pages: int | None = None
        self.hold: int | None = None
        self.limit: int | None = cap_pages
        self.gate = AdmissionGate()
        self.policy_low_hit_rate = 0

    def effective_quota(self) -> int | None:
        """``min(cap_pages, quota_pages)`` (None: unbounded)."""
        cap, quota = self.cap_pages, self.quota_pages
        if cap is None:
            return quota
        return cap if quota is None else min(cap, quota)

    def relimit(self) -> None:
        limit = self.effective_quota()
        if limit is not None and self.hold is not None:
            hold = self.hold if self.cap_pages is None else min(self.cap_pages, self.hold)
            limit = max(limit, hold)
        self.limit = limit

    @property
    def weight(self) -> int:
        return self.account.weight


def _check_weight(weight: int) -> None:
    if type(weight) is not int or weight < 1:
        raise BadRequest(f"weight must be an integer >= 1, not {weight!r}")


def _check_cap(cap_pages: int | None) -> None:
    if cap_pages is not None and (type(cap_pages) is not int or cap_pages < 0):
        raise BadRequest(f"cap_pages must be null or an integer >= 0, not {cap_pages!r}")


def _normalise_uuid(value: str) -> str:
    try:
        return str(uuid_module.UUID(value))
    except (ValueError, TypeError, AttributeError) as exc:
        raise BadRequest(f"not a UUID: {value!r}") from exc


def _check_handle(oid: int, index: int) -> None:
    if not (0 <= oid <= MAX_OID and 0 <= index <= MAX_INDEX):
        raise BadHandle(f"handle out of range: oid={oid} index={index}")


class _PressureState:
    """The core's pressure hook state off the hot path (watermarks in bytes, counters)."""

    __slots__ = (
        "high_bytes",
        "low_bytes",
        "low_hit_rate",
        "reclaim_above",
        "reclaimed_on_put",
        "reclaiming",
        "settings",
    )

    def __init__(self) -> None:
        self.settings: PressureSettings | None = None  # None: the hooks are off
        self.reclaim_above = 1 << 62  # a put evicts when storage is above this (high or low)
        self.high_bytes = 0
        self.low_bytes = 0
        self.reclaiming = False
        self.low_hit_rate = 0  # ephemeral puts declined by the admission gate
        self.reclaimed_on_put = 0


class Tmem:
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
    ) -> None:
        if config.capacity_bytes < 0:
            raise BadRequest("capacity_bytes must be >= 0")
        if config.max_pools_per_guest < 1:
            raise BadRequest("max_pools_per_guest must be >= 1")
        self.config = config
        self.clock = clock
        self.store: PageStore = store if store is not None else MemoryPageStore()
        self._journal = journal
        self._hash = hasher
        self._capacity = config.capacity_bytes
        self._max_pools = config.max_pools_per_guest
        self._compress_max = int(config.compress_max_ratio * PAGE_SIZE)
        self._store_get = self.store.get
        self._store_put = self.store.put
        self._store_delete = self.store.delete
        # contents: reference counts of contents with >= 2 references (absent: 1), sizes
        # of contents stored compressed (absent: 4096), digest collisions (base -> highest k)
        self._refs: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self._collided: dict[int, int] = {}
        self.used_bytes = 0
        # The sum of every page's charge (what used_bytes would be without sharing). Capacity
        # decisions use it, not used_bytes, so how much sharing saved never shows in whether a
        # put fits (see "Privacy" above).
        self.charged_bytes = 0
        self.unique_pages = 0
        self._guests: dict[int, _Guest] = {}
        self._shared: dict[str, _Pool] = {}
        self._auth: dict[str, set[int]] = {}
        self._domains: dict[str, int] = {}
        # eviction accounts in creation order: dict order breaks ratio ties (older first)
        self._accounts: dict[int, _Account] = {}
        self._next_serial = 0
        self._eph_pools: dict[int, _Pool] = {}  # ref -> pool
        self._free_refs: list[int] = []
        self._next_ref = 1
        self._retired = _Ops()  # counters of removed guests
        self._evictions = 0
        # pressure hooks (configure_pressure); unconfigured: no reclaim step, no admission
        # One attribute only: CPython 3.11 keeps an instance's attributes in a shared-key
        # table, with fast specialised loads on every hot path, only up to 29 of them (30
        # measured 12-18 % slower on every operation, gets included); Tmem is at that limit.
        self._pz = _PressureState()

    # ------------------------------------------------------------------ capacity

    @property
    def capacity_bytes(self) -> int:
        """Bytes of page storage the broker may hold; settable at run time (evicts at once)."""
        return self._capacity

    @capacity_bytes.setter
    def capacity_bytes(self, value: int) -> None:
        if type(value) is not int or value < 0:
            raise BadRequest(f"capacity_bytes must be an integer >= 0, not {value!r}")
        self._capacity = value
        self._make_room(0)
        self._set_watermarks()

    # ------------------------------------------------------------------ pressure hooks

    def configure_pressure(self, settings: PressureSettings | None) -> None:
        """Turn on (or, with None, off) the put path's watermark step and admission gate."""
        self._pz.settings = settings
        self._set_watermarks()

    def _set_watermarks(self) -> None:
        pz = self._pz
        s = pz.settings
        if s is None:
            pz.high_bytes = pz.low_bytes = self._capacity
            pz.reclaim_above = 1 << 62
            pz.reclaiming = False
            return
        pz.high_bytes = int(s.high_watermark * self._capacity)
        pz.low_bytes = int(s.low_watermark * self._capacity)
        pz.reclaim_above = pz.low_bytes if pz.reclaiming else pz.high_bytes

    @property
    def reclaiming(self) -> bool:
        """Whether puts are evicting toward the low watermark (above the high one lately)."""
        return self._pz.reclaiming

    def _reclaim_step(self) -> None:
        """Evict up to RECLAIM_PER_PUT pages toward the low watermark (called by a put that
        found storage above ``reclaim_above``)."""
        pz = self._pz
        for _ in range(RECLAIM_PER_PUT):
            if self.charged_bytes <= pz.low_bytes:
                break
            account = self._victim()
            if account is None:
                break  # only persistent pages left: nothing to reclaim here
            self._evict_one(account)
            pz.reclaimed_on_put += 1
        # hysteresis: keep stepping on later puts until under the low watermark (or nothing
        # is evictable); then wait for the high watermark again
        pz.reclaiming = self.charged_bytes > pz.low_bytes and self._victim() is not None
        pz.reclaim_above = pz.low_bytes if pz.reclaiming else pz.high_bytes

    def _admit(self, g: _Guest, data: bytes) -> bool:
        """The admission gate of an ephemeral put (only while storage is above the low
        watermark; zero pages always pass)."""
        s = self._pz.settings
        assert s is not None
        gate = g.gate
        # AdmissionGate.record_put, inlined: this runs on every ephemeral put
        puts = gate.puts + 1.0
        if puts > s.admission_window:
            gate.puts = puts * 0.5
            gate.hits *= 0.5
        else:
            gate.puts = puts
        if self.charged_bytes <= self._pz.low_bytes or data == ZERO_PAGE or gate.admit(s):
            return True
        g.policy_low_hit_rate += 1
        self._pz.low_hit_rate += 1
        return False

    def set_quota(self, guest_id: int, quota_pages: int | None, *, hold: int | None = None) -> None:
        """Set the guest's dynamic quota (None: none); ``hold`` lets it keep (not grow past)
        that many pages until the quota is set again without one (the shed's deadline)."""
        g = self._guest(guest_id)
        _check_cap(quota_pages)
        _check_cap(hold)
        g.quota_pages = quota_pages
        g.hold = hold
        g.relimit()

    def quota_of(self, guest_id: int) -> int | None:
        """The guest's effective quota, ``min(cap_pages, dynamic quota)``."""
        return self._guest(guest_id).effective_quota()

    def persistent_pages_of(self) -> dict[int, tuple[int, int, int | None]]:
        """``guest_id -> (persistent pages, weight, cap_pages)`` for every guest: O(guests)."""
        return {gid: (g.persistent_pages, g.weight, g.cap_pages) for gid, g in self._guests.items()}

    # ------------------------------------------------------------------ guests

    def _guest(self, guest_id: int) -> _Guest:
        g = self._guests.get(guest_id)
        if g is None:
            raise UnknownGuest(f"no guest {guest_id}")
        return g

    def _domain_bits(self, name: str) -> int:
        if not isinstance(name, str) or not name:
            raise BadRequest("dedup_domain must be a non-empty string")
        domain_id = self._domains.get(name)
        if domain_id is None:
            domain_id = len(self._domains)
            if domain_id >= MAX_DOMAINS:
                raise Conflict("too many dedup domains")
            self._domains[name] = domain_id
        return domain_id << DOMAIN_SHIFT

    def _new_account(self, weight: int) -> _Account:
        account = _Account(self._next_serial, weight)
        self._next_serial += 1
        self._accounts[account.serial] = account
        return account

    def add_guest(
        self,
        guest_id: int,
        *,
        name: str,
        weight: int = 100,
        cap_pages: int | None = None,
        dedup_domain: str = "default",
        compress: bool = False,
        frozen: bool = False,
    ) -> None:
        """Make a guest known. ``guest_id`` is the caller's (the service's database id)."""
        if guest_id in self._guests:
            raise GuestExists(f"guest {guest_id} exists")
        _check_weight(weight)
        _check_cap(cap_pages)
        bits = self._domain_bits(dedup_domain)
        self._guests[guest_id] = _Guest(
            guest_id,
            name,
            cap_pages=cap_pages,
            dedup_domain=dedup_domain,
            domain_bits=bits,
            compress=bool(compress),
            frozen=bool(frozen),
            account=self._new_account(weight),
        )

    def update_guest(
        self,
        guest_id: int,
        *,
        weight: int | None = None,
        cap_pages: int | Unset | None = UNSET,
        compress: bool | None = None,
        dedup_domain: str | None = None,
    ) -> None:
        """Change a guest's settings; arguments left out stay. A lower ``cap_pages`` drops
        nothing (the guest's new puts are declined until it is under). A new
        ``dedup_domain`` moves the guest's private pages to that domain (O(its pages))."""
        g = self._guest(guest_id)
        if weight is not None:
            _check_weight(weight)
        if not isinstance(cap_pages, Unset):
            _check_cap(cap_pages)
        bits = self._domain_bits(dedup_domain) if dedup_domain is not None else g.domain_bits
        if weight is not None:
            g.account.weight = weight
            for pool in g.pools.values():
                if pool.shared:
                    self._reweigh(pool)
        if not isinstance(cap_pages, Unset):
            g.cap_pages = cap_pages
            g.relimit()
        if compress is not None:
            g.compress = bool(compress)
        if dedup_domain is not None and bits != g.domain_bits:
            self._move_domain(g, bits)
        if dedup_domain is not None:
            g.dedup_domain = dedup_domain

    def remove_guest(self, guest_id: int) -> None:
        """Every page of the guest goes; it leaves its shared pools (which live on while
        other members use them)."""
        g = self._guest(guest_id)
        had_persistent = any(p.persistent for p in g.pools.values())
        for pool_id in list(g.pools):
            self._destroy(g, pool_id, journal=False)
        del self._guests[guest_id]
        del self._accounts[g.account.serial]
        for allowed in self._auth.values():
            allowed.discard(guest_id)
        self._retired.add(g)
        if had_persistent and self._journal is not None:
            self._journal.record_remove_guest(guest_id)

    def has_guest(self, guest_id: int) -> bool:
        """Whether the guest is known."""
        return guest_id in self._guests

    def freeze(self, guest_id: int) -> None:
        """Decline the guest's puts with ``frozen`` until :meth:`thaw` (gets still work)."""
        self._guest(guest_id).frozen = True

    def thaw(self, guest_id: int) -> None:
        """Undo :meth:`freeze`."""
        self._guest(guest_id).frozen = False

    def is_frozen(self, guest_id: int) -> bool:
        """Whether the guest is frozen."""
        return self._guest(guest_id).frozen

    def flush_guest(self, guest_id: int) -> int:
        """Flush every page of the guest's own pools (shared pools are not its own); the
        pools stay. Returns the pages flushed."""
        g = self._guest(guest_id)
        flushed = 0
        persistent = False
        for pool in g.pools.values():
            if not pool.shared:
                persistent = persistent or (pool.persistent and pool.pages > 0)
                flushed += self._clear(pool)
        if persistent and self._journal is not None:
            self._journal.record_remove_guest(guest_id)
        return flushed

    def drain_evicted(self, guest_id: int) -> int:
        """Pages of the guest's private pools evicted since the last call (for the
        ``evicted`` notice)."""
        g = self._guest(guest_id)
        n, g.evicted_unreported = g.evicted_unreported, 0
        return n

    def authorise_shared(self, uuid: str, guest_id: int, allow: bool) -> None:
        """Allow (or stop allowing) the guest to create or join the shared pool ``uuid``.
        Revoking does not throw out a guest that has joined already."""
        key = _normalise_uuid(uuid)
        self._guest(guest_id)
        if allow:
            self._auth.setdefault(key, set()).add(guest_id)
        else:
            allowed = self._auth.get(key)
            if allowed is not None:
                allowed.discard(guest_id)
                if not allowed:
                    del self._auth[key]

    def is_authorised(self, uuid: str, guest_id: int) -> bool:
        """Whether the guest may create or join the shared pool ``uuid``."""
        return guest_id in self._auth.get(_normalise_uuid(uuid), ())

    # ------------------------------------------------------------------ pools

    def _pool(self, guest_id: int, pool_id: int) -> tuple[_Guest, _Pool]:
        g = self._guests.get(guest_id)
        if g is None:
            raise UnknownGuest(f"no guest {guest_id}")
        pool = g.pools.get(pool_id)
        if pool is None:
            raise UnknownPool(f"guest {guest_id} has no pool {pool_id}")
        return g, pool

    def _pick_pool_id(self, g: _Guest, pool_id: int | None) -> int:
        if pool_id is None:
            for candidate in range(self._max_pools):
                if candidate not in g.pools:
                    return candidate
            raise TooManyPools(f"guest {g.guest_id} uses all {self._max_pools} pool ids")
        if type(pool_id) is not int or not 0 <= pool_id < self._max_pools:
            raise BadRequest(f"pool_id must be in 0..{self._max_pools - 1}")
        if pool_id in g.pools:
            raise Conflict(f"guest {g.guest_id} has a pool {pool_id} already")
        return pool_id

    def _take_ref(self) -> int:
        if self._free_refs:
            return self._free_refs.pop()
        ref = self._next_ref
        if ref > _REF_MASK:
            raise TooManyPools("too many ephemeral pools in the broker")
        self._next_ref += 1
        return ref

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
        g = self._guest(guest_id)
        if kind not in KINDS:
            raise BadRequest(f"kind must be 'persistent' or 'ephemeral', not {kind!r}")
        if not shared:
            if uuid is not None:
                raise BadRequest("uuid is for shared pools only")
            pid = self._pick_pool_id(g, pool_id)
            persistent = kind == PERSISTENT
            pool = _Pool(
                persistent=persistent,
                shared=False,
                uuid=None,
                exclusive_gets=bool(exclusive_gets),
                owner=g,
                account=None if persistent else g.account,
                ref=0 if persistent else self._take_ref(),
                domain_bits=g.domain_bits,
            )
            if not persistent:
                self._eph_pools[pool.ref] = pool
            g.pools[pid] = pool
            return pid
        if kind != EPHEMERAL:
            raise BadRequest("shared pools are ephemeral")
        if exclusive_gets:
            raise BadRequest("gets from shared pools are never exclusive")
        if uuid is None:
            raise BadRequest("a shared pool needs a uuid")
        key = _normalise_uuid(uuid)
        if guest_id not in self._auth.get(key, ()):
            raise NotAuthorised(f"guest {guest_id} is not authorised for shared pool {key}")
        pool_or_none = self._shared.get(key)
        if pool_or_none is not None and guest_id in pool_or_none.members:
            have = pool_or_none.members[guest_id]
            if pool_id is not None and pool_id != have:
                raise Conflict(f"guest {guest_id} has joined {key} as pool {have}")
            return have
        pid = self._pick_pool_id(g, pool_id)
        if pool_or_none is None:
            account = self._new_account(g.weight)
            pool = _Pool(
                persistent=False,
                shared=True,
                uuid=key,
                exclusive_gets=False,
                owner=None,
                account=account,
                ref=self._take_ref(),
                domain_bits=g.domain_bits,
            )
            self._eph_pools[pool.ref] = pool
            self._shared[key] = pool
        else:
            pool = pool_or_none
        pool.members[guest_id] = pid
        g.pools[pid] = pool
        self._reweigh(pool)
        return pid

    def _reweigh(self, pool: _Pool) -> None:
        assert pool.account is not None
        if pool.members:
            pool.account.weight = max(self._guests[m].weight for m in pool.members)

    def destroy_pool(self, guest_id: int, pool_id: int) -> None:
        """Destroy the guest's pool and its pages; for a shared pool, leave it (its pages go
        with its last member). Idempotent for a free pool id."""
        self._destroy(self._guest(guest_id), pool_id, journal=True)

    def _destroy(self, g: _Guest, pool_id: int, *, journal: bool) -> None:
        pool = g.pools.pop(pool_id, None)
        if pool is None:
            return
        if pool.shared:
            del pool.members[g.guest_id]
            if pool.members:
                self._reweigh(pool)
                return
            assert pool.uuid is not None and pool.account is not None
            del self._shared[pool.uuid]
            del self._accounts[pool.account.serial]
        self._clear(pool)
        if not pool.persistent:
            del self._eph_pools[pool.ref]
            self._free_refs.append(pool.ref)
        elif journal and self._journal is not None:
            self._journal.record_destroy_pool(g.guest_id, pool_id)

    def pools(self, guest_id: int) -> list[PoolView]:
        """The guest's pools, by pool id."""
        g = self._guest(guest_id)
        return [
            PoolView(pid, p.kind, p.shared, p.uuid, p.exclusive_gets, p.pages)
            for pid, p in sorted(g.pools.items())
        ]

    def pool_pages(self, guest_id: int, pool_id: int) -> Iterator[tuple[int, int, bytes]]:
        """Every page of a pool as ``(oid, index, page)``, read without side effects: no get
        is counted, nothing leaves an exclusive-get pool, no LRU moves (for export). The
        handles are listed when this is called; pages flushed before they are reached are
        skipped."""
        _g, pool = self._pool(guest_id, pool_id)
        handles = [(oid, list(obj)) for oid, obj in pool.objects.items()]
        return self._read_handles(pool, handles)

    def _read_handles(
        self, pool: _Pool, handles: list[tuple[int, list[int]]]
    ) -> Iterator[tuple[int, int, bytes]]:
        for oid, indexes in handles:
            for index in indexes:
                obj = pool.objects.get(oid)
                key = None if obj is None else obj.get(index)
                if key is not None:
                    yield oid, index, self._load(key)

    # ------------------------------------------------------------------ contents

    def _load(self, key: int) -> bytes:
        if key == ZERO_KEY:
            return ZERO_PAGE
        stored = self._store_get(key)
        assert stored is not None, "content key without stored bytes"
        return stored if len(stored) == PAGE_SIZE else decompress(stored)

    def _same(self, stored: bytes, page: bytes) -> bool:
        return (stored if len(stored) == PAGE_SIZE else decompress(stored)) == page

    def _acquire(self, base: int, page: bytes, stored: bytes) -> tuple[int, bool]:
        """A reference to the content ``page`` (digest plus domain bits ``base``), stored as
        ``stored`` if it is new. Returns (key, shared an existing copy)."""
        existing = self._store_get(base)
        if existing is not None and self._same(existing, page):
            refs = self._refs
            refs[base] = refs.get(base, 1) + 1
            return base, True
        if existing is None and base not in self._collided:
            key = base
        else:
            # a digest collision (or its chain): compare every content of this digest
            top = self._collided.get(base, 0)
            key = -1
            for k in range(1, top + 1):
                candidate = base | (k << COLLISION_SHIFT)
                other = self._store_get(candidate)
                if other is None:
                    if key < 0:
                        key = candidate
                elif self._same(other, page):
                    self._refs[candidate] = self._refs.get(candidate, 1) + 1
                    return candidate, True
            if key < 0:
                if existing is None:
                    key = base
                else:
                    top += 1
                    self._collided[base] = top
                    key = base | (top << COLLISION_SHIFT)
        self._store_put(key, stored)
        size = len(stored)
        if size != PAGE_SIZE:
            self._sizes[key] = size
        self.used_bytes += size
        self.unique_pages += 1
        return key, False

    def _unref(self, key: int) -> None:
        refs = self._refs
        count = refs.get(key)
        if count is None:
            self._store_delete(key)
            size = self._sizes.pop(key, PAGE_SIZE) if self._sizes else PAGE_SIZE
            self.used_bytes -= size
            self.unique_pages -= 1
        elif count == 2:
            del refs[key]
        else:
            refs[key] = count - 1

    def _drop(self, pool: _Pool, oid: int, index: int, key: int, in_lru: bool = True) -> None:
        """Forget the page ``key`` that was at (oid, index) (already gone from its object):
        gauges, LRU, charge and content reference."""
        pool.pages -= 1
        if key == ZERO_KEY:
            pool.zero_pages -= 1
        else:
            charges = pool.charges
            if charges:
                charge = charges.pop(
                    (oid << 32) | ((index + (oid & _M32) * _MIX) & _M32), PAGE_SIZE
                )
            else:
                charge = PAGE_SIZE
            pool.charged_bytes -= charge
            self.charged_bytes -= charge
            self._unref(key)
        if pool.persistent:
            owner = pool.owner
            assert owner is not None
            owner.persistent_pages -= 1
        else:
            account = pool.account
            assert account is not None
            account.eph_pages -= 1
            if in_lru:
                del account.lru[(oid << 56) | pool.lru_tag | ((index + (oid & _M32) * _MIX) & _M32)]

    def _clear(self, pool: _Pool) -> int:
        """Drop every page of the pool; returns how many."""
        n = pool.pages
        for oid, obj in pool.objects.items():
            for index, key in obj.items():
                self._drop(pool, oid, index, key)
        pool.objects.clear()
        return n

    def _move_domain(self, g: _Guest, bits: int) -> None:
        """Re-key the guest's private pages into another dedup domain."""
        for pool in g.pools.values():
            if pool.shared:
                continue
            for obj in pool.objects.values():
                for index, key in obj.items():
                    if key == ZERO_KEY:
                        continue
                    stored = self._store_get(key)
                    assert stored is not None
                    page = stored if len(stored) == PAGE_SIZE else decompress(stored)
                    digest = self._hash(page)
                    new_key, _ = self._acquire(digest | bits, page, stored)
                    obj[index] = new_key
                    self._unref(key)
            pool.domain_bits = bits
        g.domain_bits = bits
        self._make_room(0)

    # ------------------------------------------------------------------ eviction

    def _victim(self) -> _Account | None:
        best: _Account | None = None
        for account in self._accounts.values():
            n = account.eph_pages
            # largest eph_pages / weight, by cross-multiplication; ">" keeps the older on ties
            if n and (best is None or n * best.weight > best.eph_pages * account.weight):
                best = account
        return best

    def _evict_one(self, account: _Account) -> None:
        lru_key = account.lru.popitem(last=False)[0]
        pool = self._eph_pools[(lru_key >> 32) & _REF_MASK]
        oid = lru_key >> 56
        index = ((lru_key & _M32) - (oid & _M32) * _MIX) & _M32
        obj = pool.objects[oid]
        key = obj.pop(index)
        if not obj:
            del pool.objects[oid]
        self._drop(pool, oid, index, key, in_lru=False)
        pool.evictions += 1
        owner = pool.owner
        if owner is not None:
            owner.evictions += 1
            owner.evicted_unreported += 1
        self._evictions += 1

    def _make_room(self, charge: int) -> bool:
        """Evict until ``max(charged_bytes, used_bytes) + charge <= capacity``; False when it
        cannot. (``used_bytes`` exceeds ``charged_bytes`` only when a content stored raw is now
        referenced only by compressing guests.)"""
        while max(self.charged_bytes, self.used_bytes) + charge > self._capacity:
            account = self._victim()
            if account is None:
                return False
            self._evict_one(account)
        return True

    def evict(self, bytes_to_free: int) -> int:
        """Evict ephemeral pages (weight-fair LRU) until ``charged_bytes`` fell by
        ``bytes_to_free`` or none is left; returns the pages evicted. Like every capacity
        decision this counts charges, not bytes actually held, so how many pages go never
        depends on what other guests share."""
        target = self.charged_bytes - bytes_to_free
        evicted = 0
        while self.charged_bytes > target:
            account = self._victim()
            if account is None:
                break
            self._evict_one(account)
            evicted += 1
        return evicted

    # ------------------------------------------------------------------ pages

    def put(
        self, guest_id: int, pool_id: int, oid: int, index: int, data: bytes | memoryview
    ) -> int:
        """Store a page at (pool, oid, index), replacing what was there. Returns
        ``Status.DONE`` or the reason it was declined (then nothing is at the handle)."""
        g = self._guests.get(guest_id)
        if g is None:
            raise UnknownGuest(f"no guest {guest_id}")
        pool = g.pools.get(pool_id)
        if pool is None:
            raise UnknownPool(f"guest {guest_id} has no pool {pool_id}")
        if len(data) != PAGE_SIZE:
            raise BadPageSize(f"a page is {PAGE_SIZE} bytes, not {len(data)}")
        if not (0 <= oid <= MAX_OID and 0 <= index <= MAX_INDEX):
            raise BadHandle(f"handle out of range: oid={oid} index={index}")
        return self._put(g, pool, pool_id, oid, index, data)

    def _put(
        self, g: _Guest, pool: _Pool, pool_id: int, oid: int, index: int, data: bytes | memoryview
    ) -> int:
        if type(data) is not bytes:
            data = bytes(data)
        pool.puts += 1
        g.puts += 1
        objects = pool.objects
        obj = objects.get(oid)
        old = None
        if obj is not None:
            old = obj.pop(index, None)
            if old is not None:
                if not obj:
                    del objects[oid]
                self._drop(pool, oid, index, old)
        persistent = pool.persistent
        if g.frozen:
            pool.declined_frozen += 1
            g.declined_frozen += 1
            status = STATUS_FROZEN
        elif persistent and g.limit is not None and g.persistent_pages >= g.limit:
            pool.declined_quota += 1
            g.declined_quota += 1
            status = STATUS_QUOTA
        elif not persistent and self._pz.settings is not None and not self._admit(g, data):
            pool.declined_policy += 1
            g.declined_policy += 1
            status = STATUS_POLICY
        else:
            if self.charged_bytes > self._pz.reclaim_above:
                self._reclaim_step()
            if data == ZERO_PAGE:
                key = ZERO_KEY
                charge = 0
                stored = data
            else:
                stored = data
                if g.compress:
                    packed = compress(data)
                    if len(packed) <= self._compress_max:
                        stored = packed
                    else:
                        pool.compress_poor += 1
                        g.compress_poor += 1
                charge = len(stored)
            level = self.charged_bytes
            if self.used_bytes > level:  # (rare: see _make_room) a compare, not a max() call
                level = self.used_bytes
            fits = level + charge <= self._capacity
            if fits or self._make_room(charge):
                if charge:
                    digest = self._hash(data)
                    bits = pool.domain_bits
                    key = digest | bits if bits else digest
                    if self._collided or self._store_get(key) is not None:
                        key, hit = self._acquire(key, data, stored)
                        if hit:
                            pool.dedup_hits += 1
                            g.dedup_hits += 1
                    else:  # a new content: the common case, inlined
                        self._store_put(key, stored)
                        if charge != PAGE_SIZE:
                            self._sizes[key] = charge
                        self.used_bytes += charge
                        self.unique_pages += 1
                # place the page (as _place does, inlined for the hot path)
                obj = objects.get(oid)  # again: making room may have emptied the object
                if obj is None:
                    objects[oid] = {index: key}
                else:
                    obj[index] = key
                pool.pages += 1
                if charge == 0:
                    pool.zero_pages += 1
                else:
                    pool.charged_bytes += charge
                    self.charged_bytes += charge
                    if charge != PAGE_SIZE:
                        pool.charges[(oid << 32) | ((index + (oid & _M32) * _MIX) & _M32)] = charge
                if persistent:
                    g.persistent_pages += 1  # persistent pools are private: g owns it
                    if self._journal is not None:
                        self._journal.record_put(g.guest_id, pool_id, oid, index, data)
                else:
                    account = pool.account
                    assert account is not None
                    account.eph_pages += 1
                    account.lru[
                        (oid << 56) | pool.lru_tag | ((index + (oid & _M32) * _MIX) & _M32)
                    ] = None
                return STATUS_DONE
            pool.declined_capacity += 1
            g.declined_capacity += 1
            status = STATUS_CAPACITY
        if old is not None and persistent and self._journal is not None:
            self._journal.record_flush(g.guest_id, pool_id, oid, index)
        return status

    def _place(self, pool: _Pool, oid: int, index: int, key: int, charge: int) -> None:
        objects = pool.objects
        obj = objects.get(oid)  # fetched again: making room may have emptied the object
        if obj is None:
            objects[oid] = {index: key}
        else:
            obj[index] = key
        pool.pages += 1
        if charge == 0:
            pool.zero_pages += 1
        else:
            pool.charged_bytes += charge
            self.charged_bytes += charge
            if charge != PAGE_SIZE:
                pool.charges[(oid << 32) | ((index + (oid & _M32) * _MIX) & _M32)] = charge
        if pool.persistent:
            owner = pool.owner
            assert owner is not None
            owner.persistent_pages += 1
        else:
            account = pool.account
            assert account is not None
            account.eph_pages += 1
            account.lru[(oid << 56) | pool.lru_tag | ((index + (oid & _M32) * _MIX) & _M32)] = None

    def get(self, guest_id: int, pool_id: int, oid: int, index: int) -> bytes | None:
        """The page at the handle or None (a miss). Exclusive (the page leaves) in private
        ephemeral pools and in persistent pools made with ``exclusive_gets``."""
        g, pool = self._pool(guest_id, pool_id)
        _check_handle(oid, index)
        return self._get(g, pool, pool_id, oid, index)

    def _get(self, g: _Guest, pool: _Pool, pool_id: int, oid: int, index: int) -> bytes | None:
        pool.gets += 1
        g.gets += 1
        obj = pool.objects.get(oid)
        if obj is None:
            return None
        key = obj.get(index)
        if key is None:
            return None
        pool.get_hits += 1
        g.get_hits += 1
        page = self._load(key)
        if pool.persistent:
            if pool.exclusive_gets:
                del obj[index]
                if not obj:
                    del pool.objects[oid]
                self._drop(pool, oid, index, key)
                if self._journal is not None:
                    self._journal.record_flush(g.guest_id, pool_id, oid, index)
        elif pool.shared:
            g.gate.hits += 1.0
            assert pool.account is not None
            pool.account.lru.move_to_end(
                (oid << 56) | pool.lru_tag | ((index + (oid & _M32) * _MIX) & _M32)
            )
        else:
            g.gate.hits += 1.0
            del obj[index]
            if not obj:
                del pool.objects[oid]
            self._drop(pool, oid, index, key)
        return page

    def flush_page(self, guest_id: int, pool_id: int, oid: int, index: int) -> bool:
        """Remove the page at the handle; True when there was one. Idempotent."""
        g, pool = self._pool(guest_id, pool_id)
        _check_handle(oid, index)
        return self._flush_page(g, pool, pool_id, oid, index)

    def _flush_page(self, g: _Guest, pool: _Pool, pool_id: int, oid: int, index: int) -> bool:
        pool.flushes += 1
        g.flushes += 1
        obj = pool.objects.get(oid)
        if obj is None:
            return False
        key = obj.pop(index, None)
        if key is None:
            return False
        if not obj:
            del pool.objects[oid]
        self._drop(pool, oid, index, key)
        pool.flushes_found += 1
        g.flushes_found += 1
        if pool.persistent and self._journal is not None:
            self._journal.record_flush(g.guest_id, pool_id, oid, index)
        return True

    def flush_object(self, guest_id: int, pool_id: int, oid: int) -> int:
        """Remove every page of the object; returns how many. Idempotent. O(its pages)."""
        g, pool = self._pool(guest_id, pool_id)
        _check_handle(oid, 0)
        return self._flush_object(g, pool, pool_id, oid)

    def _flush_object(self, g: _Guest, pool: _Pool, pool_id: int, oid: int) -> int:
        pool.object_flushes += 1
        g.object_flushes += 1
        obj = pool.objects.pop(oid, None)
        if obj is None:
            return 0
        for index, key in obj.items():
            self._drop(pool, oid, index, key)
        if pool.persistent and self._journal is not None:
            self._journal.record_flush_object(g.guest_id, pool_id, oid)
        return len(obj)

    def batch(
        self, guest_id: int, pool_id: int, ops: Sequence[BatchOp]
    ) -> list[tuple[int, bytes | None]]:
        """Apply ``(op, oid, index, page)`` operations in order; one ``(status, page)`` per
        op: put -> its status, get -> (DONE, page) or (MISS, None), flushes -> DONE. Every op
        is validated first: a malformed one (unknown op, bad handle, bad page) raises and
        nothing is applied."""
        g, pool = self._pool(guest_id, pool_id)
        for op, oid, index, page in ops:
            if op not in _OPS:
                raise BadRequest(f"unknown op {op}")
            _check_handle(oid, index)
            if op == OP_PUT and (page is None or len(page) != PAGE_SIZE):
                raise BadPageSize(f"a page is {PAGE_SIZE} bytes")
        out: list[tuple[int, bytes | None]] = []
        append = out.append
        for op, oid, index, page in ops:
            if op == OP_PUT:
                assert page is not None
                append((self._put(g, pool, pool_id, oid, index, page), None))
            elif op == OP_GET:
                got = self._get(g, pool, pool_id, oid, index)
                append((STATUS_MISS, None) if got is None else (STATUS_DONE, got))
            elif op == OP_FLUSH_PAGE:
                self._flush_page(g, pool, pool_id, oid, index)
                append((STATUS_DONE, None))
            else:
                self._flush_object(g, pool, pool_id, oid)
                append((STATUS_DONE, None))
        return out

    def restore_page(self, guest_id: int, pool_id: int, oid: int, index: int, data: bytes) -> None:
        """Put a persistent page back at broker start: no quota, capacity or frozen check,
        not journaled, not counted as a put. Replaces what is at the handle."""
        g, pool = self._pool(guest_id, pool_id)
        if not pool.persistent:
            raise BadRequest("restore_page is for persistent pools")
        if len(data) != PAGE_SIZE:
            raise BadPageSize(f"a page is {PAGE_SIZE} bytes, not {len(data)}")
        _check_handle(oid, index)
        page = bytes(data)
        obj = pool.objects.get(oid)
        if obj is not None:
            old = obj.pop(index, None)
            if old is not None:
                if not obj:
                    del pool.objects[oid]
                self._drop(pool, oid, index, old)
        if page == ZERO_PAGE:
            self._place(pool, oid, index, ZERO_KEY, 0)
            return
        stored = page
        if g.compress:
            packed = compress(page)
            if len(packed) <= self._compress_max:
                stored = packed
        bits = pool.domain_bits
        key, _ = self._acquire(self._hash(page) | bits, page, stored)
        self._place(pool, oid, index, key, len(stored))

    def restore_pages(
        self, guest_id: int, pool_id: int, pages: Iterable[tuple[int, int, bytes]]
    ) -> int:
        """:meth:`restore_page` for many ``(oid, index, page)`` of one pool (broker start):
        the same result page by page, with the guest, pool and method lookups done once.
        Returns how many pages were restored. A malformed page raises (``BadPageSize``,
        ``BadHandle``) and the pages before it stay restored."""
        g, pool = self._pool(guest_id, pool_id)
        if not pool.persistent:
            raise BadRequest("restore_pages is for persistent pools")
        # Why a loop of its own: reload restores every persistent page at start, and
        # restore_page's per-call lookups and checks cost about as much as the page itself.
        objects = pool.objects
        charges = pool.charges
        sizes = self._sizes
        hasher = self._hash
        store_get = self._store_get
        store_put = self._store_put
        bits = pool.domain_bits
        packs = g.compress
        compress_max = self._compress_max
        n = zero = charged = used = unique = 0
        try:
            for oid, index, data in pages:
                if len(data) != PAGE_SIZE:
                    raise BadPageSize(f"a page is {PAGE_SIZE} bytes, not {len(data)}")
                if not (0 <= oid <= MAX_OID and 0 <= index <= MAX_INDEX):
                    raise BadHandle(f"handle out of range: oid={oid} index={index}")
                if type(data) is not bytes:
                    data = bytes(data)
                obj = objects.get(oid)
                if obj is not None:
                    old = obj.pop(index, None)
                    if old is not None:
                        if not obj:
                            del objects[oid]
                            obj = None
                        self._drop(pool, oid, index, old)
                if data == ZERO_PAGE:
                    key = ZERO_KEY
                    zero += 1
                else:
                    stored = data
                    if packs:
                        packed = compress(data)
                        if len(packed) <= compress_max:
                            stored = packed
                    charge = len(stored)
                    key = hasher(data) | bits
                    if self._collided or store_get(key) is not None:
                        key, _ = self._acquire(key, data, stored)
                    else:  # a new content, as _acquire would store it
                        store_put(key, stored)
                        used += charge
                        unique += 1
                        if charge != PAGE_SIZE:
                            sizes[key] = charge
                    charged += charge
                    if charge != PAGE_SIZE:
                        charges[(oid << 32) | ((index + (oid & _M32) * _MIX) & _M32)] = charge
                if obj is None:
                    objects[oid] = {index: key}
                else:
                    obj[index] = key
                n += 1
        finally:
            # gauges summed once (the _drop and _acquire calls above update theirs as they go)
            pool.pages += n
            pool.zero_pages += zero
            pool.charged_bytes += charged
            self.charged_bytes += charged
            self.used_bytes += used
            self.unique_pages += unique
            g.persistent_pages += n
        return n

    # ------------------------------------------------------------------ stats

    def pool_stats(self, guest_id: int, pool_id: int, *, admin: bool = False) -> PoolFigures:
        """Figures of one pool (its operation counters count every member's operations).
        ``admin`` adds dedup hits, which a guest must not see."""
        _, pool = self._pool(guest_id, pool_id)
        return figures.pool_figures(pool_id, pool, admin=admin)

    def guest_stats(self, guest_id: int) -> GuestFigures:
        """The guest's own figures, safe to show it: its private pools' pages, its charges
        (``charged_bytes``: what its pages take on their own, whether or not shared) and
        its operations. Nothing here depends on other guests' contents."""
        return figures.guest_figures(self._guest(guest_id), admin=False)

    def stats(self) -> BrokerFigures:
        """Global figures (the admin's ``GET /v1/stats``), with one admin entry per guest
        (``guests``) and per shared pool (``shared_pools``)."""
        ops = _Ops()
        ops.add(self._retired)
        for g in self._guests.values():
            ops.add(g)
        ops.evictions = self._evictions
        return figures.broker_figures(
            ops=ops,
            guests=self._guests.values(),
            shared=self._shared.values(),
            capacity_bytes=self._capacity,
            used_bytes=self.used_bytes,
            charged_bytes=self.charged_bytes,
            unique_pages=self.unique_pages,
            low_hit_rate=self._pz.low_hit_rate,
            reclaimed_on_put=self._pz.reclaimed_on_put,
        )

    def guests(self) -> Iterable[int]:
        """Ids of the known guests, in the order they were added."""
        return list(self._guests)
