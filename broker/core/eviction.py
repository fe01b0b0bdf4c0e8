"""Capacity and eviction: accounts, their LRUs, the capacity decision and the watermarks.

Capacity
    A put fits when ``counted_bytes + need <= capacity_bytes`` after evicting ephemeral
    pages (:meth:`Eviction.make_room`), where ``need`` is the put's charge. In an untrusted
    dedup domain (the default) capacity decisions count charges (:mod:`broker.core.pages`),
    never bytes actually held, so a put that would dedup is declined exactly when a fresh one
    would, and sharing an earlier put made never leaves room for more later: sharing saves
    memory, not admission, and no decision depends on another guest's contents. In a trusted
    domain the bytes actually held count instead, and a put that shares a content already
    stored there needs nothing. Persistent pages are never evicted: a put that cannot fit is
    declined with ``capacity``.

Eviction accounts
    Ephemeral pages are evicted within an *eviction account*, taking from the account
    furthest over its weighted share: the largest ``ephemeral_pages / (weight * bias)``
    (ties: the older account). Each guest is one account for its private ephemeral pools;
    each shared pool is an account of its own whose weight is the largest weight of its
    members. ``bias`` is the guest's pressure multiplier (:func:`broker.core.pressure.
    pressure_multiplier`, 1 without a fresh report, always 1 for shared pools): a guest with
    free memory gives up its ephemeral pages first, one close to OOM last. Which page of the
    account goes is the ephemeral policy's choice (:mod:`broker.core.policy`: LRU or
    TinyLFU). Each eviction is O(1) in pages (a loop over accounts).

Watermarks (pressure hooks; the settings are :class:`broker.core.pressure.PressureSettings`)
    Once configured, a put that finds storage above the high watermark evicts at most
    :data:`RECLAIM_PER_PUT` ephemeral pages, and keeps doing so on later puts until storage is
    under the low watermark (hysteresis). "Storage" is ``counted_bytes``, as in every
    capacity decision, so which pages are evicted never depends on what other guests of
    untrusted domains share. While persistent pages alone are above the low watermark,
    ephemeral pages could never bring storage under it: the target is then the high
    watermark, so ephemeral puts use the room below it instead of each evicting two pages.
    ``compress_above`` (the low watermark, or 85 % of capacity when the watermarks are off)
    is where guests in the ``pressure`` compression mode start compressing new puts.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING

from broker.core.content import ZERO_KEY
from broker.core.errors import TooManyPools
from broker.core.keys import M32, REF_MASK, lru_handle, lru_ref
from broker.core.pages import PageTable
from broker.core.policy import LRU, TINYLFU, TinyLfu, check_policy
from broker.core.pressure import PressureSettings
from schemas.batch import PAGE_SIZE

if TYPE_CHECKING:
    from broker.core.registry import Pool

# A put above the high watermark evicts at most this many pages: bounded work per put, and
# more than the one page a put adds, so puts alone bring storage down to the low watermark.
RECLAIM_PER_PUT = 2
# "never": a reclaim threshold no storage reaches
_NEVER = 1 << 62
_DEFAULT_LOW = PressureSettings.low_watermark


class Account:
    """An eviction account: ephemeral pages in LRU order (oldest first), a weight and a
    pressure bias.

    Under the ``lru`` policy every page is in ``lru``; under ``tinylfu`` (``tinylfu`` set)
    ``lru`` is the policy's window and ``main`` its main list (:mod:`broker.core.policy`).
    A page is in exactly one of the two."""

    __slots__ = ("_bias", "_weight", "eph_pages", "lru", "main", "serial", "share", "tinylfu")

    def __init__(self, serial: int, weight: int) -> None:
        self.serial = serial
        self._weight = weight
        self._bias = 1.0
        # what the victim choice divides by: weight * bias
        self.share: float = float(weight)
        self.eph_pages = 0
        # LRU keys: keys.lru_key. OrderedDict: O(1) pop of the oldest (a plain dict re-scans
        # the deleted slots at its front on every pop).
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.main: OrderedDict[int, None] = OrderedDict()
        self.tinylfu: TinyLfu | None = None

    @property
    def weight(self) -> int:
        """The admin's weight (a shared pool's: its best-weighted member's)."""
        return self._weight

    @weight.setter
    def weight(self, weight: int) -> None:
        self._weight = weight
        self.share = weight * self._bias

    @property
    def bias(self) -> float:
        """The pressure multiplier of the weight in the victim choice (> 0, 1: neutral)."""
        return self._bias

    @bias.setter
    def bias(self, bias: float) -> None:
        self._bias = bias
        self.share = self._weight * bias

    def coldest(self) -> Iterator[int]:
        """LRU keys of the account's pages, the first to go first (main list, then window);
        listed lazily from a copy taken per list."""
        yield from list(self.main)
        yield from list(self.lru)

    def use_policy(self, name: str, salt: int) -> None:
        """Switch this account to the ephemeral policy ``name`` (O(its pages), once)."""
        if name == TINYLFU and self.tinylfu is None:
            # every page held so far enters the main list in its LRU order; the window
            # fills with the next puts
            self.main = self.lru
            self.lru = OrderedDict()
            self.tinylfu = TinyLfu(salt, self.eph_pages)
        elif name == LRU and self.tinylfu is not None:
            merged = self.main
            merged.update(self.lru)  # the window's pages are the newer
            self.lru = merged
            self.main = OrderedDict()
            self.tinylfu = None


class Eviction:
    """The capacity, the eviction accounts and the ephemeral pools their LRU keys name."""

    __slots__ = (
        "accounts",
        "capacity",
        "compress_above",
        "eph_pools",
        "ephemeral_policy",
        "evictions",
        "free_refs",
        "high_bytes",
        "low_bytes",
        "next_ref",
        "next_serial",
        "reclaim_above",
        "reclaimed_on_put",
        "reclaiming",
        "salt",
        "settings",
        "table",
    )

    def __init__(self, table: PageTable, capacity: int, *, salt: int | None = None) -> None:
        self.table = table
        self.capacity = capacity
        self.ephemeral_policy = LRU
        # keys each account's TinyLFU sketch (secret: a guest must not aim collisions)
        self.salt = secrets.randbits(64) if salt is None else salt
        # accounts in creation order: dict order breaks ratio ties (older first)
        self.accounts: dict[int, Account] = {}
        self.next_serial = 0
        self.eph_pools: dict[int, Pool] = {}  # ref -> pool
        self.free_refs: list[int] = []
        self.next_ref = 1
        self.evictions = 0
        # watermarks: unconfigured (settings None) there is no reclaim step
        self.settings: PressureSettings | None = None
        self.reclaim_above = _NEVER  # a put reclaims when storage is above this
        self.high_bytes = capacity
        self.low_bytes = capacity
        self.reclaiming = False
        self.reclaimed_on_put = 0
        self.compress_above = int(_DEFAULT_LOW * capacity)

    # ------------------------------------------------------------------ accounts and refs

    def new_account(self, weight: int) -> Account:
        account = Account(self.next_serial, weight)
        self.next_serial += 1
        self.accounts[account.serial] = account
        if self.ephemeral_policy != LRU:
            account.use_policy(self.ephemeral_policy, self._account_salt(account))
        return account

    def _account_salt(self, account: Account) -> int:
        return (self.salt ^ (account.serial * 0x9E3779B97F4A7C15)) & ((1 << 64) - 1)

    def set_policy(self, name: str) -> None:
        """Use the ephemeral policy ``name`` (``lru`` or ``tinylfu``) for every account from
        now on; pages held stay (O(pages) once)."""
        check_policy(name)
        self.ephemeral_policy = name
        for account in self.accounts.values():
            account.use_policy(name, self._account_salt(account))

    def close_account(self, account: Account) -> None:
        del self.accounts[account.serial]

    def take_ref(self) -> int:
        """A reference number for a new ephemeral pool (its pages' LRU keys carry it)."""
        if self.free_refs:
            return self.free_refs.pop()
        ref = self.next_ref
        if ref > REF_MASK:
            raise TooManyPools("too many ephemeral pools in the broker")
        self.next_ref += 1
        return ref

    def add_pool(self, pool: Pool) -> None:
        self.eph_pools[pool.ref] = pool

    def remove_pool(self, pool: Pool) -> None:
        """The pool was destroyed: its ref is free again (ephemeral pools leave the map)."""
        if not pool.persistent:
            del self.eph_pools[pool.ref]
        self.free_refs.append(pool.ref)

    # ------------------------------------------------------------------ evicting

    def victim(self) -> Account | None:
        """The account to evict from: the largest ``eph_pages / (weight * bias)`` (older on
        ties)."""
        best: Account | None = None
        for account in self.accounts.values():
            n = account.eph_pages
            # by cross-multiplication; ">" keeps the older on ties
            if n and (best is None or n * best.share > best.eph_pages * account.share):
                best = account
        return best

    def evict_one(self, account: Account) -> None:
        """Evict the page the account's policy gives up (LRU: its least recently used)."""
        tinylfu = account.tinylfu
        if tinylfu is None:
            lru_key = account.lru.popitem(last=False)[0]
        else:
            lru_key = tinylfu.victim(account.lru, account.main, self.charge_of)
            tinylfu.on_evicted(lru_key)
        pool = self.eph_pools[lru_ref(lru_key)]
        oid, index = lru_handle(lru_key)
        obj = pool.objects[oid]
        key = obj.pop(index)
        if not obj:
            del pool.objects[oid]
        self.table.drop(pool, oid, index, key, in_lru=False)
        pool.evictions += 1
        owner = pool.owner
        if owner is not None:
            owner.evictions += 1
            owner.evicted_unreported += 1
        self.evictions += 1

    def charge_of(self, lru_key: int) -> int:
        """The bytes the ephemeral page at ``lru_key`` is charged (0: a zero page)."""
        pool = self.eph_pools[lru_ref(lru_key)]
        oid = lru_key >> 56
        charge = pool.charges.get((oid << 32) | (lru_key & M32))
        if charge is not None:
            return charge
        return 0 if pool.objects[oid][lru_handle(lru_key)[1]] == ZERO_KEY else PAGE_SIZE

    def make_room(self, charge: int) -> bool:
        """Evict until ``counted_bytes + charge <= capacity``; False when it cannot."""
        table = self.table
        while table.counted_bytes + charge > self.capacity:
            account = self.victim()
            if account is None:
                return False
            self.evict_one(account)
        return True

    def evict(self, bytes_to_free: int) -> int:
        """Evict ephemeral pages (weight-fair LRU) until ``counted_bytes`` fell by
        ``bytes_to_free`` or none is left; returns the pages evicted."""
        table = self.table
        target = table.counted_bytes - bytes_to_free
        evicted = 0
        while table.counted_bytes > target:
            account = self.victim()
            if account is None:
                break
            self.evict_one(account)
            evicted += 1
        return evicted

    # ------------------------------------------------------------------ watermarks

    def configure(self, settings: PressureSettings | None) -> None:
        """Turn the watermarks on (or, with None, off)."""
        self.settings = settings
        self.set_watermarks()

    def set_capacity(self, capacity: int) -> None:
        """A new capacity: evicts at once down to it, and moves the watermarks."""
        self.capacity = capacity
        self.make_room(0)
        self.set_watermarks()

    def set_watermarks(self) -> None:
        s = self.settings
        if s is None:
            self.high_bytes = self.low_bytes = self.capacity
            self.compress_above = int(_DEFAULT_LOW * self.capacity)
            self.reclaim_above = _NEVER
            self.reclaiming = False
            return
        self.compress_above = int(s.low_watermark * self.capacity)
        self.high_bytes = int(s.high_watermark * self.capacity)
        self.low_bytes = int(s.low_watermark * self.capacity)
        self.reclaim_above = self.reclaim_target() if self.reclaiming else self.high_bytes

    def reclaim_step(self) -> None:
        """Evict up to RECLAIM_PER_PUT pages toward the low watermark (called by a put that
        found storage above ``reclaim_above``)."""
        table = self.table
        target = self.reclaim_target()
        for _ in range(RECLAIM_PER_PUT):
            if table.counted_bytes <= target:
                break
            account = self.victim()
            if account is None:
                break  # only persistent pages left: nothing to reclaim here
            self.evict_one(account)
            self.reclaimed_on_put += 1
        # hysteresis: keep stepping on later puts until under the low watermark (or nothing
        # is evictable); then wait for the high watermark again
        self.reclaiming = table.counted_bytes > target and self.victim() is not None
        self.reclaim_above = target if self.reclaiming else self.high_bytes

    def reclaim_target(self) -> int:
        """Where reclaiming stops: the low watermark, or the high one while persistent pages
        alone are above the low one (ephemeral pages could not get storage under it)."""
        if self.table.persistent_charged >= self.low_bytes:
            return self.high_bytes
        return self.low_bytes
