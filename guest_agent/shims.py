"""Guest shims: Linux's frontswap and cleancache interfaces on top of a :class:`TmemClient`.

Frontswap
---------
::

    fs = Frontswap(client, fallback="/var/lib/tmem/swap.fallback")
    fs.init(0)                                # swap type 0 (one per swap device)
    in_broker = fs.store(0, offset, page)     # True: the broker holds it; False: the fallback does
    page = fs.load(0, offset)                 # always the bytes last stored
    fs.invalidate_page(0, offset); fs.invalidate_area(0)

Every page stored and not invalidated can be loaded: a page the broker declines (quota,
capacity, frozen, policy) or cannot take (unreachable) goes to the local
:class:`~guest_agent.fallback.FallbackStore`, and an in-memory map records where each
``(type, offset)`` lives. ``load`` of a page the map says is in the broker retries
(:class:`RetryPolicy`) and raises :class:`~guest_agent.errors.PageUnavailable` only when the
broker stays unreachable; it never falls back to an older copy.

Handle mapping (Xen's ``drivers/xen/tmem.c``, taken as is): one persistent pool for every
swap type, created by the first ``init``; ``oid = (type << 4) | (offset & 0xF)`` and
``index = offset >> 4``. So 16 consecutive offsets spread over 16 objects (the broker's
per-object structures stay small), ``invalidate_area(type)`` is 16 object flushes in one batch,
and offsets up to 2^36 pages (256 TiB of swap) fit a 32-bit index.

Stale copies: when a page that was in the broker goes to the fallback (declined, unreachable,
shed) or is invalidated while the broker is unreachable, the map stops pointing at the broker
at once, so the old broker copy can never be returned; its handle is remembered as *stale* and
flushed at the broker as soon as it answers again (stale handles still count against the
quota until then).

Quota: the shim counts the persistent pages it holds in the broker (plus stale ones) and stops
offering puts that would exceed the guest's cap (from ``GET /v1/self`` at ``init`` and from
``quota`` notices); after a ``quota`` decline it stops offering new pages until it has freed
some, a new ``quota`` notice arrives or ``RetryPolicy.recheck_interval`` passes. A ``freeze``
notice stops puts until ``thaw`` (a ``frozen`` decline, for ``recheck_interval``).
``shed(n)`` (what a ``shed`` notice triggers, see :mod:`guest_agent.notices`) moves ``n``
broker pages back into the fallback, syncs it and flushes them from the broker: first the
ones the broker names as its coldest (``GET /v1/self/shed-candidates``, by last access), then
the oldest stored.

These rules are :class:`~guest_agent.placement.Placement`'s (written once, and followed by the
NBD export too); the shim keeps the map of where each page lives and does the I/O.

Thread safety: every public method holds one lock, so a notice handler thread may call
:meth:`Frontswap.handle_notice` while the guest stores and loads.

Cleancache
----------
::

    cc = Cleancache(client)
    pool = cc.init_fs()                       # or cc.init_shared_fs(uuid)
    cc.put_page(pool, inode_key, index, page)
    page = cc.get_page(pool, inode_key, index)   # bytes or None; private pools: exclusive
    cc.invalidate_page(pool, key, index); cc.invalidate_inode(pool, key); cc.invalidate_fs(pool)

A file key (an int below 2^192, or up to 24 bytes read big-endian) is the oid. Cleancache is a
cache: an unreachable broker makes puts no-ops and gets misses. A put or invalidation that may
not have reached the broker marks its page, object or pool *suspect*: gets there miss until the
flush goes through, so an old copy is never returned.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from guest_agent.client import TmemClient
from guest_agent.errors import (
    BrokerError,
    BrokerUnavailable,
    NotInitialised,
    PageUnavailable,
    ShimError,
    TmemClientError,
)
from guest_agent.fallback import FallbackStore
from guest_agent.placement import TRANSIENT, Placement, RetryPolicy, retry
from schemas.batch import MAX_OID, OP_FLUSH_OBJECT, PAGE_SIZE
from schemas.wire import Notice

__all__ = ["Cleancache", "Frontswap", "RetryPolicy", "frontswap_handle"]

Key = tuple[int, int]  # (swap type, offset)
# a shed asks the broker for at most this many of its coldest pages (the endpoint's limit)
SHED_CANDIDATES_MAX = 4096
Handle = tuple[int, int]  # (oid, index) in the frontswap pool


def frontswap_handle(type: int, offset: int) -> Handle:
    """Xen's mapping of a swap ``(type, offset)`` to ``(oid, index)``."""
    return (type << 4) | (offset & 0xF), offset >> 4


class Frontswap:
    """The frontswap interface backed by the broker with a local fallback (see module doc).

    ``fallback`` is a path (a file the shim owns and truncates), a :class:`FallbackStore`, or
    ``None`` for an anonymous temporary file. ``pool_id`` adopts an existing persistent pool
    (e.g. one left by an agent that crashed) instead of creating one at the first ``init``;
    its old pages are never read (the map starts empty) and are replaced as offsets are stored.
    """

    def __init__(
        self,
        client: TmemClient,
        fallback: str | os.PathLike[str] | FallbackStore | None = None,
        *,
        retry: RetryPolicy | None = None,
        pool_id: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.fallback = fallback if isinstance(fallback, FallbackStore) else FallbackStore(fallback)
        self.pool_id = pool_id
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.RLock()
        self._types: set[int] = set()
        self._broker: dict[Key, None] = {}  # keys the broker holds, oldest first (shed order)
        # where pages go, the pauses, the cap and the stale broker handles (flushed, never read)
        self.placement: Placement[Handle] = Placement(retry, clock=clock)
        self._stale = self.placement.stale
        self.stats = {"broker_stores": 0, "fallback_stores": 0, "declined": 0, "shed_pages": 0}

    # --- bookkeeping
    @property
    def broker_pages(self) -> int:
        """Persistent pages this shim holds in the broker, stale ones included."""
        return len(self._broker) + len(self._stale)

    @property
    def fallback_pages(self) -> int:
        return len(self.fallback)

    def where(self, type: int, offset: int) -> str | None:
        """``"broker"``, ``"fallback"`` or ``None``: where the page lives (for tests and tools)."""
        key = (type, offset)
        if key in self._broker:
            return "broker"
        return "fallback" if key in self.fallback else None

    @property
    def retry(self) -> RetryPolicy:
        """The retry/backoff policy (see :class:`~guest_agent.placement.RetryPolicy`)."""
        return self.placement.policy

    @property
    def cap_pages(self) -> int | None:
        """The guest's persistent cap as last heard (``GET /v1/self``, quota notices)."""
        return self.placement.cap_pages

    @cap_pages.setter
    def cap_pages(self, value: int | None) -> None:
        self.placement.cap_pages = value

    def _ensure_pool(self) -> bool:
        if self.pool_id is not None:
            return True
        if self.placement.broker_down():
            return False
        try:
            self.pool_id = self.client.create_pool("persistent")
            info = self.client.self_info()
        except BrokerUnavailable:
            self.placement.mark_down()
            return False
        cap = info.quota_pages if info.quota_pages is not None else info.cap_pages
        if cap is not None and self.cap_pages is None:
            self.cap_pages = cap
        return True

    def _room_for(self, new_pages: int) -> int:
        """How many new broker pages may be offered now."""
        return self.placement.room_for(new_pages, self.broker_pages)

    def _can_offer(self) -> bool:
        return self.placement.may_offer() and self._ensure_pool()

    def _flush_stale(self) -> None:
        if not self._stale or self.pool_id is None or self.placement.broker_down():
            return
        handles = list(self._stale)
        try:
            self.client.flush_many(self.pool_id, handles)
        except BrokerError:
            return
        except BrokerUnavailable as exc:
            self.placement.call_failed(exc)
            return
        self._stale.difference_update(handles)
        self.placement.freed()

    def _forget_broker_copy(self, key: Key) -> None:
        """The map stops pointing at the broker for ``key``; flush the copy or mark it stale."""
        if key not in self._broker:
            return
        del self._broker[key]
        handle = frontswap_handle(*key)
        if self.pool_id is not None and not self.placement.broker_down():
            try:
                self.client.flush_page(self.pool_id, *handle)
                self.placement.freed()
                return
            except (BrokerUnavailable, BrokerError) as exc:
                self.placement.call_failed(exc)
        self._stale.add(handle)

    def _check_type(self, type: int) -> None:
        if type not in self._types:
            raise NotInitialised(f"swap type {type} was not initialised")

    # --- frontswap interface
    def init(self, type: int) -> None:
        """Initialise swap ``type`` (creates the shared persistent pool on first use)."""
        if type < 0:
            raise ValueError("swap type must be >= 0")
        with self._lock:
            self._types.add(type)
            self._ensure_pool()

    def store(self, type: int, offset: int, page: bytes | memoryview) -> bool:
        """Store a page; True when the broker took it, False when it went to the fallback.

        Raises :class:`~guest_agent.errors.FallbackFull` when neither could take it (any older
        copy is invalidated first, so a later load never returns it)."""
        if len(page) != PAGE_SIZE:
            raise ValueError(f"a page is exactly {PAGE_SIZE} bytes, got {len(page)}")
        if not 0 <= offset < 1 << 36:
            raise ValueError("offset out of range 0..2^36-1")
        key = (type, offset)
        with self._lock:
            self._check_type(type)
            self._flush_stale()
            if self._can_offer() and (key in self._broker or self._room_for(1)):
                assert self.pool_id is not None
                oid, index = frontswap_handle(type, offset)
                try:
                    result = self.client.put(self.pool_id, oid, index, page)
                except TmemClientError as exc:
                    # landed or not, the map no longer points at the broker (rule 4)
                    if self.placement.put_failed(exc) or key in self._broker:
                        self._stale.add((oid, index))
                    self._broker.pop(key, None)
                else:
                    self._stale.discard((oid, index))
                    if result:
                        self._broker.pop(key, None)
                        self._broker[key] = None
                        self.fallback.discard(key)
                        self.stats["broker_stores"] += 1
                        return True
                    # Declined: the broker removed any older copy itself.
                    self._broker.pop(key, None)
                    self.stats["declined"] += 1
                    self.placement.note_decline(result.reason)
            else:
                self._forget_broker_copy(key)
            self.fallback.discard(key)
            self.fallback.write(key, page)
            self.stats["fallback_stores"] += 1
            return False

    def load(self, type: int, offset: int) -> bytes:
        """The page last stored at ``(type, offset)``.

        Raises :class:`KeyError` when nothing is stored there, and
        :class:`~guest_agent.errors.PageUnavailable` when only the broker holds it and it stayed
        unreachable through the retries (or, against the contract, lost it)."""
        key = (type, offset)
        with self._lock:
            page = self.fallback.read(key)
            if page is not None:
                return page
            if key not in self._broker:
                raise KeyError(key)
            return self._load_from_broker([key])[0]

    def _load_from_broker(self, keys: Sequence[Key]) -> list[bytes]:
        pool_id = self.pool_id
        assert pool_id is not None
        handles = [frontswap_handle(*k) for k in keys]

        def get() -> list[bytes | None]:
            if len(handles) == 1:
                return [self.client.get(pool_id, *handles[0])]
            return self.client.get_many(pool_id, handles)

        try:
            pages = retry(get, self.retry, sleep=self._sleep, clock=self._clock)
        except TRANSIENT as exc:
            self.placement.mark_down()
            raise PageUnavailable(
                f"{len(keys)} page(s) held only by the broker, which stayed unreachable "
                f"after {self.retry.attempts} attempts: {exc}"
            ) from exc
        except BrokerError as exc:
            raise PageUnavailable(f"the broker refused to return a page: {exc}") from exc
        self.placement.mark_up()
        out: list[bytes] = []
        for key, page in zip(keys, pages, strict=True):
            if page is None:
                raise PageUnavailable(f"the broker lost persistent page {key} (a broker bug)")
            out.append(page)
        return out

    def invalidate_page(self, type: int, offset: int) -> None:
        """Forget the page at ``(type, offset)`` (idempotent)."""
        key = (type, offset)
        with self._lock:
            self.fallback.discard(key)
            if key in self._broker:
                self._broker.pop(key)
                handle = frontswap_handle(type, offset)
                self._stale.add(handle)
                self._flush_stale()

    def invalidate_many(self, type: int, offsets: Sequence[int]) -> None:
        """Forget the pages at these offsets (idempotent): the bookkeeping of
        :meth:`invalidate_page`, with the broker copies flushed in one batch."""
        with self._lock:
            for offset in offsets:
                key = (type, offset)
                self.fallback.discard(key)
                if key in self._broker:
                    del self._broker[key]
                    self._stale.add(frontswap_handle(type, offset))
            self._flush_stale()

    def invalidate_area(self, type: int) -> None:
        """Forget every page of swap ``type`` (swapoff); ``init`` it again to reuse it."""
        with self._lock:
            for key in self.fallback:
                if isinstance(key, tuple) and key[0] == type:
                    self.fallback.discard(key)
            gone = [k for k in self._broker if k[0] == type]
            for key in gone:
                del self._broker[key]
            self._types.discard(type)
            if self.pool_id is None:
                return
            oids = [(type << 4) | low for low in range(16)]
            try:
                if self.placement.broker_down():
                    raise BrokerUnavailable("broker marked down")
                self.client.batch(self.pool_id, [(OP_FLUSH_OBJECT, oid, 0, None) for oid in oids])
                self._stale.difference_update([h for h in self._stale if h[0] >> 4 == type])
                self.placement.freed()
            except TmemClientError as exc:
                self.placement.call_failed(exc)
                self._stale.update(frontswap_handle(*k) for k in gone)

    # --- batches
    def store_many(self, type: int, pages: Sequence[tuple[int, bytes | memoryview]]) -> list[bool]:
        """Store ``(offset, page)`` pairs in batches; per page, True when the broker took it.

        Later pairs win when an offset repeats, as with sequential stores."""
        for offset, page in pages:
            if len(page) != PAGE_SIZE:
                raise ValueError(f"a page is exactly {PAGE_SIZE} bytes, got {len(page)}")
            if not 0 <= offset < 1 << 36:
                raise ValueError("offset out of range 0..2^36-1")
        out: list[bool] = []
        with self._lock:
            self._check_type(type)
            self._flush_stale()
            step = self.client.max_batch_ops
            for start in range(0, len(pages), step):
                out.extend(self._store_chunk(type, pages[start : start + step]))
        return out

    def _store_chunk(
        self, type: int, pages: Sequence[tuple[int, bytes | memoryview]]
    ) -> list[bool]:
        # A repeated offset inside one chunk would make the batch's later put win at the
        # broker but confuse the map; keep the last of each (as sequential stores would).
        last: dict[int, int] = {}
        for i, (offset, _) in enumerate(pages):
            last[offset] = i
        out = [False] * len(pages)
        offered: list[int] = []
        if self._can_offer():
            new = sum(1 for i in last.values() if (type, pages[i][0]) not in self._broker)
            room = self._room_for(new)
            for i in last.values():
                key = (type, pages[i][0])
                if key in self._broker:
                    offered.append(i)
                elif room > 0:
                    offered.append(i)
                    room -= 1
        offered_set = set(offered)
        to_fallback = [i for i in last.values() if i not in offered_set]
        if offered:
            assert self.pool_id is not None
            triples = [(*frontswap_handle(type, pages[i][0]), pages[i][1]) for i in offered]
            try:
                results = self.client.put_many(self.pool_id, triples)
            except TmemClientError as exc:
                landed = self.placement.put_failed(exc)  # rule 4
                for i in offered:
                    key = (type, pages[i][0])
                    if landed or key in self._broker:
                        self._stale.add(frontswap_handle(*key))
                    self._broker.pop(key, None)
                to_fallback.extend(offered)
            else:
                for i, result in zip(offered, results, strict=True):
                    key = (type, pages[i][0])
                    self._stale.discard(frontswap_handle(*key))
                    self._broker.pop(key, None)
                    if result:
                        self._broker[key] = None
                        self.fallback.discard(key)
                        out[i] = True
                        self.stats["broker_stores"] += 1
                    else:
                        self.stats["declined"] += 1
                        self.placement.note_decline(result.reason)
                        to_fallback.append(i)
        moved_out = [
            (type, pages[i][0]) for i in to_fallback if (type, pages[i][0]) in self._broker
        ]
        if moved_out:
            for key in moved_out:
                del self._broker[key]
            self._stale.update(frontswap_handle(*k) for k in moved_out)
            self._flush_stale()
        for i in to_fallback:
            key = (type, pages[i][0])
            self.fallback.write(key, pages[i][1])
            self.stats["fallback_stores"] += 1
        # Earlier duplicates of an offset report what happened to the winning copy.
        if len(last) != len(pages):
            for j, (offset, _) in enumerate(pages):
                out[j] = out[last[offset]]
        return out

    def load_many(self, type: int, offsets: Sequence[int]) -> list[bytes | None]:
        """Load pages in batches; ``None`` for an offset that holds nothing.

        Raises :class:`~guest_agent.errors.PageUnavailable` as :meth:`load` does."""
        out: list[bytes | None] = [None] * len(offsets)
        with self._lock:
            remote: list[int] = []
            for i, offset in enumerate(offsets):
                key = (type, offset)
                page = self.fallback.read(key)
                if page is not None:
                    out[i] = page
                elif key in self._broker:
                    remote.append(i)
            step = self.client.max_batch_ops
            for start in range(0, len(remote), step):
                chunk = remote[start : start + step]
                pages = self._load_from_broker([(type, offsets[i]) for i in chunk])
                for i, page in zip(chunk, pages, strict=True):
                    out[i] = page
        return out

    # --- notices
    def shed(self, pages: int) -> int:
        """Move up to ``pages`` of the oldest broker pages into the fallback and flush them at
        the broker; returns how many the broker no longer holds."""
        returned = 0
        with self._lock:
            if self.pool_id is None:
                return 0
            # Stale copies are the cheapest pages to give back.
            before = len(self._stale)
            self._flush_stale()
            returned += before - len(self._stale)
            order = self._shed_order(pages - returned)
            while returned < pages and self._broker:
                want = min(pages - returned, self.client.max_batch_ops)
                keys = list(_take_present(order, self._broker, want))
                if not keys:
                    break
                try:
                    data = self._load_from_broker(keys)
                except PageUnavailable:
                    break
                moved: list[Key] = []
                for key, page in zip(keys, data, strict=True):
                    try:
                        self.fallback.write(key, page)
                    except ShimError:
                        break
                    moved.append(key)
                for key in moved:
                    del self._broker[key]
                handles = [frontswap_handle(*k) for k in moved]
                try:
                    # the fallback copies are on disk before the broker's go (rule 6)
                    self.fallback.sync()
                    self.client.flush_many(self.pool_id, handles)
                except (TmemClientError, OSError) as exc:
                    self.placement.call_failed(exc)
                    self._stale.update(handles)  # in the fallback now; flushed later
                    break
                returned += len(moved)
                if len(moved) < len(keys):
                    break  # the fallback is full
            self.stats["shed_pages"] += returned
            if returned:
                self.placement.freed()
        return returned

    def _shed_order(self, pages: int) -> Iterator[Key]:
        """Which pages a shed moves, first to last: the broker's coldest (by last access,
        ``GET /v1/self/shed-candidates``) that this shim holds there, then the rest oldest
        stored first (also when the broker cannot name them)."""
        named: list[Key] = []
        try:
            candidates = self.client.shed_candidates(min(max(pages, 0), SHED_CANDIDATES_MAX))
        except TmemClientError:
            candidates = []
        for pool_id, oid, index in candidates:
            key = (oid >> 4, (index << 4) | (oid & 0xF))  # frontswap_handle, inverted
            if pool_id == self.pool_id and key in self._broker:
                named.append(key)
        yield from named
        yield from list(self._broker)

    def handle_notice(self, notice: Notice) -> int | None:
        """React to a broker notice; for a ``shed``, the pages returned (to ack)."""
        with self._lock:
            if notice.type == "shed":
                return self.shed(notice.pages or 0)
            self.placement.handle_notice(notice)
            return None

    def close(self, *, destroy_pool: bool = True) -> None:
        """Close the fallback file and (by default) destroy the broker pool, best effort.

        Swap contents do not outlive the shim: the map that locates every page is in memory
        and the fallback file is truncated when opened, so the pool's pages would only hold
        the guest's quota (and one of its 16 pools). The client is the caller's to close."""
        with self._lock:
            if destroy_pool and self.pool_id is not None:
                try:
                    self.client.destroy_pool(self.pool_id)
                except TmemClientError:
                    pass  # unreachable: the pool stays until the guest or an admin removes it
                else:
                    self.pool_id = None
                    self._broker.clear()
                    self._stale.clear()
            self.fallback.close()


def _take_present(order: Iterator[Key], held: dict[Key, None], n: int) -> Iterator[Key]:
    """Up to ``n`` keys of ``order`` still in ``held``, each once (a named key comes again
    in the oldest-first tail)."""
    taken: set[Key] = set()
    for key in order:
        if key in held and key not in taken:
            taken.add(key)
            yield key
            if len(taken) >= n:
                return


def _file_key(key: int | bytes) -> int:
    if isinstance(key, bytes | bytearray):
        if len(key) > 24:
            raise ValueError("a cleancache file key is at most 192 bits (24 bytes)")
        key = int.from_bytes(key, "big")
    if not 0 <= key <= MAX_OID:
        raise ValueError("a cleancache file key is 0 <= key < 2^192")
    return key


class Cleancache:
    """The cleancache interface: ephemeral pools, a miss is always a safe answer.

    Not thread-safe beyond what the client is (one client per thread)."""

    def __init__(self, client: TmemClient) -> None:
        self.client = client
        self._suspect_pages: set[tuple[int, int, int]] = set()
        self._suspect_objects: set[tuple[int, int]] = set()
        self._suspect_pools: set[int] = set()

    def init_fs(self) -> int:
        """A private ephemeral pool for one filesystem; gets are exclusive."""
        return self.client.create_pool("ephemeral")

    def init_shared_fs(self, uuid: str) -> int:
        """Join (or create) the shared ephemeral pool of a clustered filesystem's ``uuid``."""
        return self.client.create_pool("ephemeral", shared=True, uuid=str(uuid))

    def _settle(self, pool: int, oid: int, index: int) -> bool:
        """Flush pending invalidations touching the handle; True when it may be read."""
        try:
            if pool in self._suspect_pools:
                self.client.destroy_pool(pool)
                self._suspect_pools.discard(pool)
                return False  # the pool is gone: nothing to read
            if (pool, oid) in self._suspect_objects:
                self.client.flush_object(pool, oid)
                self._suspect_objects.discard((pool, oid))
            if (pool, oid, index) in self._suspect_pages:
                self.client.flush_page(pool, oid, index)
                self._suspect_pages.discard((pool, oid, index))
        except BrokerUnavailable:
            return False
        return True

    def put_page(self, pool: int, key: int | bytes, index: int, page: bytes | memoryview) -> bool:
        """Offer a clean page; True when the broker kept it."""
        oid = _file_key(key)
        if pool in self._suspect_pools:
            self._settle(pool, oid, index)
            return False  # the filesystem's pool is being destroyed
        try:
            stored = bool(self.client.put(pool, oid, index, page))
            # Stored or declined, the handle no longer holds an older copy.
            self._suspect_pages.discard((pool, oid, index))
            return stored
        except BrokerUnavailable:
            self._suspect_pages.add((pool, oid, index))
            return False
        except BrokerError:
            # A refused put changed nothing: an older copy may still sit at the handle.
            self._suspect_pages.add((pool, oid, index))
            raise

    def get_page(self, pool: int, key: int | bytes, index: int) -> bytes | None:
        """The page, or ``None`` (a miss); in a private pool a hit removes the page."""
        oid = _file_key(key)
        if self._pending() and not self._settle(pool, oid, index):
            return None
        try:
            return self.client.get(pool, oid, index)
        except BrokerUnavailable:
            return None

    def _pending(self) -> bool:
        return bool(self._suspect_pages or self._suspect_objects or self._suspect_pools)

    def put_many(self, pool: int, items: Sequence[tuple[int, int, bytes]]) -> list[str | None]:
        """Offer ``(file_key, index, page)`` clean pages in batches; per page ``None`` when
        stored, else the decline reason (``"unreachable"`` when the broker is down). The
        guarantees of :meth:`put_page`: a handle whose fate is unknown reads as a miss."""
        if self._pending():
            return [
                None if self.put_page(pool, key, index, page) else "unreachable"
                for key, index, page in items
            ]
        handles = [(_file_key(key), index, page) for key, index, page in items]
        try:
            results = self.client.put_many(pool, handles)
        except BrokerUnavailable:
            # Some chunks may have landed: gets of these handles miss until flushed.
            self._suspect_pages.update((pool, oid, index) for oid, index, _ in handles)
            return ["unreachable"] * len(items)
        except BrokerError:
            # A refused batch changed nothing: older copies may still sit at the handles.
            self._suspect_pages.update((pool, oid, index) for oid, index, _ in handles)
            raise
        return [None if r else (r.reason or "declined") for r in results]

    def get_many(self, pool: int, keys: Sequence[tuple[int, int]]) -> list[bytes | None]:
        """Ask for ``(file_key, index)`` pages in batches; per page the bytes or ``None``
        (in a private pool, hits are exclusive)."""
        if self._pending():
            return [self.get_page(pool, key, index) for key, index in keys]
        try:
            return self.client.get_many(pool, [(_file_key(key), index) for key, index in keys])
        except BrokerUnavailable:
            return [None] * len(keys)

    def invalidate_page(self, pool: int, key: int | bytes, index: int) -> None:
        """Drop one page (the file's page changed or went away)."""
        oid = _file_key(key)
        try:
            self.client.flush_page(pool, oid, index)
            self._suspect_pages.discard((pool, oid, index))
        except BrokerUnavailable:
            self._suspect_pages.add((pool, oid, index))

    def invalidate_inode(self, pool: int, key: int | bytes) -> None:
        """Drop every page of a file."""
        oid = _file_key(key)
        try:
            self.client.flush_object(pool, oid)
            self._suspect_objects.discard((pool, oid))
            self._suspect_pages = {h for h in self._suspect_pages if h[:2] != (pool, oid)}
        except BrokerUnavailable:
            self._suspect_objects.add((pool, oid))

    def invalidate_fs(self, pool: int) -> None:
        """Drop the filesystem's pool (unmount)."""
        try:
            self.client.destroy_pool(pool)
            self._suspect_pools.discard(pool)
        except BrokerUnavailable:
            self._suspect_pools.add(pool)
