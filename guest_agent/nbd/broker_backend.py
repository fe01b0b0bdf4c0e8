"""The export's real block store: one persistent broker pool, and a local fallback file.

Every 4 KiB block lives in exactly one place, kept in an in-memory location map (one byte per
block):

- ``NOWHERE`` — never written, trimmed or zeroed: reads as zeros, costs nothing anywhere;
- ``BROKER`` — a persistent page in the export's pool;
- ``FALLBACK`` — at ``block * 4096`` in the fallback file, because the broker declined the put
  (quota, capacity, frozen, policy), the broker was unreachable, or a shed notice moved it.

Block → handle mapping (documented in docs/nbd.md)::

    oid   = block >> 8          # one object per 1 MiB chunk (256 blocks)
    index = block               # the block number itself (so exports up to 16 TiB)

An object per 1 MiB chunk keeps the broker's per-object structures small (Xen kept an object
as a radix tree of its pages) and groups neighbouring blocks, which swap writes together; the
index alone names the block, so a page is easy to recognise in broker stats and exports.
Discards flush page by page (in batches), never whole objects: a round running beside the
discarding one may be putting another block of the same object.

Placement: which of the two places a block goes to, and what a failure leaves behind, follows
:class:`guest_agent.placement.Placement` — the rules the Frontswap shim follows too — with
:func:`export_policy`: reads wait out a restarting broker for ``read_retry_s`` (backoff 50 ms
doubling to 1 s), and every write is offered to the broker (no pause after an outage or a
decline: the export hears no thaw or quota notices, and a decline costs a round trip, never a
block). A broker copy the map stopped pointing at (a put that failed and may have landed, a
flush that failed) is *stale*: never read; flushed when its block is next written or
discarded, or by the next :meth:`BrokerBackend.shed`, which counts it as returned.

As a persistent overlay (another export on top, e.g. a copy-on-write image): ``read_blocks``
answers ``None`` for a block the overlay does not hold (``location[block] == NOWHERE``),
``write_blocks`` / ``discard_blocks`` / ``flush`` put, forget and make durable, with the
fallback file behind the broker; the same calling rules as for the dispatcher hold (calls on
disjoint blocks may run side by side; ``shed`` alone).

Durability: the broker acknowledges a persistent put only once it is durable (durability
``sync``), so :meth:`BrokerBackend.flush` only has to ``fsync`` the fallback file when it was
written since the last flush. A shed writes the pages to the fallback file and fsyncs it
*before* flushing them at the broker, so no acknowledged block is ever only in flight.

Lifetime: the pool is created by :meth:`BrokerBackend.open` and destroyed by :meth:`close`; the
location map lives in the agent's memory, so the export's contents last as long as the agent
process — the same lifetime a swap device's contents have. The broker's own exports
(``broker.api.nbd_exports``) outlive their process instead: ``close(keep_pool=True)`` leaves
the pool and the fallback file, and :meth:`BrokerBackend.reopen` rebuilds the map from them.
That works because the two places never disagree about a block's latest content:

- a block at the broker has no other copy that could win: a put stored over a block in the
  fallback file punches it out of the file (zeros written where holes cannot be punched);
- a block in the fallback file has no broker copy but an equal one (a declined put leaves
  nothing at the handle, journaled; a shed fsyncs the file before it flushes the pages; a
  failed put's stale copy holds the same bytes until the block's next put replaces it);
- a block discarded or zeroed is in neither (flushed at the broker, punched in the file).

So on reopen: a block the pool holds is ``BROKER``, else a block with data in the file is
``FALLBACK``, else ``NOWHERE`` (the file's holes are found with ``SEEK_DATA``; where that is
missing every other block is ``FALLBACK``, which still reads back right: a hole reads zeros).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Literal, Protocol, TypeVar

from guest_agent.errors import TmemClientError
from guest_agent.nbd.backend import BLOCK_SIZE
from guest_agent.nbd.dispatcher import NOT_NOW
from guest_agent.nbd.errors import BackendError
from guest_agent.placement import TRANSIENT, Placement, RetryPolicy, aretry

log = logging.getLogger(__name__)

NOWHERE = 0
BROKER = 1
FALLBACK = 2

BLOCKS_PER_OBJECT = 256
_T = TypeVar("_T")
_OBJECT_SHIFT = 8
# a shed asks the broker for at most this many of its coldest pages (the endpoint's limit)
SHED_CANDIDATES_MAX = 4096


def export_policy(read_retry_s: float = 30.0) -> RetryPolicy:
    """The export's :class:`~guest_agent.placement.RetryPolicy`: reads retry for
    ``read_retry_s`` seconds however many tries that takes (pages survive a broker restart, and
    a swap device's read error is a crashed process), and puts are always offered."""
    return RetryPolicy(
        attempts=None, deadline=read_retry_s, down_interval=0.0, recheck_interval=0.0
    )


def block_handle(block: int) -> tuple[int, int]:
    """The broker handle ``(oid, index)`` of a block (see the module docstring)."""
    return block >> _OBJECT_SHIFT, block


class PageClient(Protocol):
    """The calls of :class:`guest_agent.client.AsyncTmemClient` the backend uses."""

    async def create_pool(self, kind: Literal["persistent"]) -> int: ...  # pragma: no cover

    async def destroy_pool(self, pool_id: int) -> None: ...  # pragma: no cover

    async def put_many(
        self, pool_id: int, pages: Sequence[tuple[int, int, bytes | memoryview]]
    ) -> Sequence[object]: ...  # pragma: no cover - results are truthy when stored

    async def get_many(
        self, pool_id: int, handles: Sequence[tuple[int, int]]
    ) -> list[bytes | None]: ...  # pragma: no cover

    async def flush_many(
        self, pool_id: int, handles: Sequence[tuple[int, int]]
    ) -> None: ...  # pragma: no cover

    async def shed_candidates(
        self, limit: int = 256
    ) -> list[tuple[int, int, int]]: ...  # pragma: no cover


class BrokerBackend:
    """A :class:`~guest_agent.nbd.backend.BlockBackend` on a broker pool plus a fallback file.

    Use ``backend = await BrokerBackend.open(client, size=..., fallback_path=...)``; hand it to
    a :class:`~guest_agent.nbd.dispatcher.Dispatcher`, which only runs calls on disjoint blocks
    side by side; run :meth:`shed` through ``dispatcher.exclusive`` (it moves blocks while no
    round is in flight) and :meth:`close` at the end. Counters in :attr:`stats` say where
    blocks went.
    """

    def __init__(
        self,
        client: PageClient,
        pool_id: int,
        *,
        size: int,
        fallback_path: str,
        destroy_pool_on_close: bool = True,
        read_retry_s: float = 30.0,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.client = client
        self.pool_id = pool_id
        self.size = size
        self.block_count = (size + BLOCK_SIZE - 1) // BLOCK_SIZE
        self.location = bytearray(self.block_count)
        self.fallback_path = fallback_path
        self._fd = os.open(fallback_path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self._fd, self.block_count * BLOCK_SIZE)
        self._fallback_dirty = False
        self._destroy_pool_on_close = destroy_pool_on_close
        # a read of a block only the broker holds waits read_retry_s for a broker that
        # restarts (pages survive a restart) before the request fails with EIO; ``policy``
        # replaces the whole policy
        self.placement: Placement[int] = Placement(policy or export_policy(read_retry_s))
        self.stats: dict[str, int] = defaultdict(int)

    @classmethod
    async def open(
        cls, client: PageClient, *, size: int, fallback_path: str, read_retry_s: float = 30.0
    ) -> BrokerBackend:
        """Create the export's persistent pool and open (create, size) the fallback file."""
        pool_id = await client.create_pool("persistent")
        return cls(
            client, pool_id, size=size, fallback_path=fallback_path, read_retry_s=read_retry_s
        )

    @classmethod
    def reopen(
        cls,
        client: PageClient,
        pool_id: int,
        *,
        size: int,
        fallback_path: str,
        broker_blocks: Iterable[int],
        read_retry_s: float = 30.0,
    ) -> BrokerBackend:
        """The export over an existing pool and fallback file (after a restart):
        ``broker_blocks`` are the blocks the pool holds; the map is rebuilt as the module
        docstring says. Blocks outside ``size`` are left alone (logged)."""
        backend = cls(
            client, pool_id, size=size, fallback_path=fallback_path, read_retry_s=read_retry_s
        )
        location = backend.location
        for start, end in _data_ranges(backend._fd, backend.block_count * BLOCK_SIZE):
            first, last = start // BLOCK_SIZE, (end + BLOCK_SIZE - 1) // BLOCK_SIZE
            location[first:last] = bytes([FALLBACK]) * (last - first)
        outside = 0
        for block in broker_blocks:
            if block < backend.block_count:
                location[block] = BROKER
            else:
                outside += 1
        if outside:
            log.warning("nbd: pool %d holds %d blocks beyond the export's end", pool_id, outside)
        return backend

    # --- counts ---------------------------------------------------------------------------

    def count(self, where: int) -> int:
        """How many blocks are at ``where`` (NOWHERE, BROKER, FALLBACK); a scan, for tests."""
        return self.location.count(where)

    # --- BlockBackend ---------------------------------------------------------------------

    async def read_blocks(self, blocks: Sequence[int]) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(blocks)
        at_broker: list[int] = []
        location = self.location
        for i, block in enumerate(blocks):
            where = location[block]
            if where == BROKER:
                at_broker.append(i)
            elif where == FALLBACK:
                out[i] = self._read_fallback(block)
        if at_broker:
            handles = [block_handle(blocks[i]) for i in at_broker]
            pages = await self._get_many_patiently(handles)
            for i, page in zip(at_broker, pages, strict=True):
                if page is None:
                    # the broker never drops an acknowledged persistent page; zeros here
                    # would be silent corruption, so the read fails instead
                    raise BackendError(f"block {blocks[i]} missing at the broker")
                out[i] = page
            self.stats["broker_reads"] += len(at_broker)
        return out

    def read_block_now(self, block: int) -> object:
        """One block's content without waiting, or :data:`~guest_agent.nbd.dispatcher.NOT_NOW`
        (the dispatcher's ``read_now``): only when the client can answer a get synchronously
        (``get_now``: the broker's own exports, whose client is the core in-process). Anything
        unusual (the broker not ready, an error, a missing page) is left to the normal path,
        which retries or fails the read as it does."""
        where = self.location[block]
        if where == NOWHERE:
            return None
        if where == FALLBACK:
            try:
                return self._read_fallback(block)
            except (OSError, BackendError):
                return NOT_NOW
        get_now = getattr(self.client, "get_now", None)
        if get_now is None:
            return NOT_NOW
        try:
            page = get_now(self.pool_id, *block_handle(block))
        except Exception:
            return NOT_NOW
        if page is None or page is NOT_NOW:
            return NOT_NOW
        self.stats["broker_reads"] += 1
        return page

    def write_block_now(self, block: int, data: bytes) -> bool:
        """Store one block without waiting (the dispatcher's ``write_now``), when the client
        can put synchronously (``put_now``: the broker's own exports, only while their broker
        has no journal to wait for) and no stale copy or paused offer needs the normal path.
        ``False``: nothing was done; the caller queues the write."""
        put_now = getattr(self.client, "put_now", None)
        placement = self.placement
        if put_now is None or placement.stale or not placement.may_offer():
            return False
        try:
            stored = put_now(self.pool_id, *block_handle(block), data)
        except Exception:
            return False  # the round's write offers it again (a put replaces)
        if stored is NOT_NOW:
            return False
        if stored:
            if self.location[block] == FALLBACK:
                self._punch([block])  # the file's older copy must not outlive this one
            self.location[block] = BROKER
            self.stats["broker_puts"] += 1
            return True
        # declined: nothing is left at the handle (contract); the file holds the only copy
        try:
            self._write_fallback(block, data)
        except BackendError:
            return False  # queued now, the round's write reports the failure
        self.location[block] = FALLBACK
        placement.note_declines([False])
        self.stats["fallback_writes"] += 1
        return True

    async def write_blocks(self, writes: Sequence[tuple[int, bytes]]) -> None:
        placement = self.placement
        location = self.location
        stale = placement.stale
        results: Sequence[object]
        if placement.may_offer():
            pages = [(*block_handle(block), data) for block, data in writes]
            try:
                results = await self.client.put_many(self.pool_id, pages)
            except Exception as exc:
                # the broker is unreachable or failed: keep the data locally rather than fail
                # the write (for a swap device a failed write is lost memory)
                log.warning("nbd: broker put failed (%s); %d blocks to fallback", exc, len(writes))
                self.stats["broker_errors"] += 1
                landed = placement.put_failed(exc)
                stale.update(b for b, _ in writes if landed or location[b] == BROKER)
                results = [False] * len(writes)
            else:
                if stale:  # stored or declined, each handle now holds this write or nothing
                    stale.difference_update([b for b, _ in writes])
        else:
            stale.update(b for b, _ in writes if location[b] == BROKER)
            results = [False] * len(writes)
        declined = 0
        left_file: list[int] = []
        for (block, data), result in zip(writes, results, strict=True):
            if result:
                if location[block] == FALLBACK:
                    left_file.append(block)
                location[block] = BROKER
            else:
                # a declined put left nothing at the handle (contract), so the fallback
                # copy is the only one
                self._write_fallback(block, data)
                location[block] = FALLBACK
                declined += 1
        if left_file:  # stored at the broker now: the file's older copies must go
            self._punch(left_file)
        if declined:
            placement.note_declines(results)
        self.stats["broker_puts"] += len(writes) - declined
        self.stats["fallback_writes"] += declined

    async def discard_blocks(self, blocks: Sequence[int]) -> None:
        location = self.location
        at_broker = [b for b in blocks if location[b] == BROKER]
        in_file = [b for b in blocks if location[b] == FALLBACK]
        for block in blocks:
            location[block] = NOWHERE
        if in_file:
            self._punch(in_file)
        stale = self.placement.stale
        if stale:  # this call owns these blocks: their stale copies go in the same batch
            gone = [b for b in blocks if b in stale]
            stale.difference_update(gone)
            at_broker.extend(gone)
        if at_broker:
            # page by page (batched), never flush_object: a round running beside this one may
            # be putting another block of the same object
            try:
                await self.client.flush_many(self.pool_id, [block_handle(b) for b in at_broker])
            except TmemClientError as exc:
                # the map already says nowhere, so reads are right; the copies are stale,
                # flushed by a later write or discard of their block or the next shed
                log.warning("nbd: flush of %d discarded blocks failed: %s", len(at_broker), exc)
                self.stats["broker_flush_errors"] += 1
                self.placement.call_failed(exc)
                stale.update(at_broker)
            else:
                self.stats["broker_flushes"] += len(at_broker)

    async def flush(self) -> None:
        barrier = getattr(self.client, "barrier", None)
        if barrier is not None:  # writes stored at once (write_block_now) wait here
            await barrier()
        if self._fallback_dirty:
            self._fallback_dirty = False
            try:
                await asyncio.to_thread(os.fsync, self._fd)
            except OSError as exc:
                self._fallback_dirty = True
                raise BackendError(f"fsync of {self.fallback_path} failed: {exc}") from exc
            self.stats["fallback_fsyncs"] += 1

    async def close(self, *, keep_pool: bool = False) -> None:
        """Close the fallback file; destroy the pool unless ``keep_pool`` (or the backend was
        built with ``destroy_pool_on_close=False``)."""
        try:
            if self._destroy_pool_on_close and not keep_pool:
                await self.client.destroy_pool(self.pool_id)
        finally:
            os.close(self._fd)

    # --- shed -----------------------------------------------------------------------------

    async def shed(self, pages: int) -> int:
        """Move up to ``pages`` broker blocks to the fallback file; returns how many moved.

        Not safe beside other calls (it picks any broker block): run it through
        :meth:`Dispatcher.exclusive <guest_agent.nbd.dispatcher.Dispatcher.exclusive>`.

        Stale broker copies are flushed first and count. The pages are fetched, written to
        the fallback file, fsynced, and only then flushed at the broker, so a crash in between
        leaves a copy in at least one durable place; if that flush fails they stay stale.
        """
        if pages <= 0:
            return 0
        returned = await self._flush_stale()
        pages -= returned
        location = self.location
        # the blocks the broker names as its coldest (by last access) first
        chosen = await self._named_blocks(pages)
        named = set(chosen)
        # then the highest blocks: swap allocates from the start, so the tail is colder
        block = self.block_count - 1
        while block >= 0 and len(chosen) < pages:
            block = location.rfind(BROKER, 0, block + 1)
            if block < 0:
                break
            if block not in named:
                chosen.append(block)
            block -= 1
        if not chosen:
            return returned
        handles = [block_handle(b) for b in chosen]
        contents = await self._call(self.client.get_many(self.pool_id, handles))
        moved: list[int] = []
        for block, page in zip(chosen, contents, strict=True):
            if page is None:
                continue
            self._write_fallback(block, page)
            moved.append(block)
        await asyncio.to_thread(os.fsync, self._fd)
        for block in moved:
            location[block] = FALLBACK
        try:
            await self.client.flush_many(self.pool_id, [block_handle(b) for b in moved])
        except TmemClientError as exc:
            self.placement.call_failed(exc)
            self.placement.stale.update(moved)  # in the file now; flushed by a later shed
            raise BackendError(f"broker: {exc}") from exc
        self.stats["shed_blocks"] += len(moved)
        return returned + len(moved)

    async def _named_blocks(self, pages: int) -> list[int]:
        """Up to ``pages`` blocks the broker holds for this export, its coldest first
        (``GET /v1/self/shed-candidates``); none when it cannot say (then the tail goes)."""
        try:
            named = await self.client.shed_candidates(min(pages, SHED_CANDIDATES_MAX))
        except TmemClientError as exc:
            log.info("nbd: no shed candidates from the broker (%s): the tail goes first", exc)
            return []
        location = self.location
        out: list[int] = []
        seen: set[int] = set()
        for pool_id, oid, block in named:
            if (
                pool_id == self.pool_id
                and 0 <= block < self.block_count
                and block_handle(block)[0] == oid
                and location[block] == BROKER
                and block not in seen
            ):
                seen.add(block)
                out.append(block)
        return out[:pages]

    async def _flush_stale(self) -> int:
        """Flush every stale broker copy (only beside no other call); how many went."""
        stale = self.placement.take_stale()
        if not stale:
            return 0
        try:
            await self.client.flush_many(self.pool_id, [block_handle(b) for b in stale])
        except TmemClientError as exc:
            self.placement.call_failed(exc)
            self.placement.stale.update(stale)
            raise BackendError(f"broker: {exc}") from exc
        self.stats["stale_flushed"] += len(stale)
        return len(stale)

    # --- helpers --------------------------------------------------------------------------

    async def _get_many_patiently(self, handles: list[tuple[int, int]]) -> list[bytes | None]:
        """``get_many``, retried along the placement's policy while the broker is
        unreachable, restarting or rate limiting; then :class:`BackendError`."""
        pool_id = self.pool_id
        started = asyncio.get_running_loop().time()
        try:
            # the first try inline: a broker that answers costs no retry wrapper
            return await self.client.get_many(pool_id, handles)
        except TRANSIENT as exc:
            failed: Exception = exc
        except TmemClientError as exc:
            raise BackendError(f"broker: {exc}") from exc
        try:
            return await aretry(
                lambda: self.client.get_many(pool_id, handles),
                self.placement.policy,
                on_retry=self._read_retried,
                failed=failed,
                started=started,
            )
        except TmemClientError as exc:
            raise BackendError(f"broker: {exc}") from exc

    def _read_retried(self, exc: Exception) -> None:
        self.stats["broker_read_retries"] += 1
        log.warning("nbd: broker read failed (%s); retrying", exc)

    @staticmethod
    async def _call(aw: Awaitable[_T]) -> _T:
        try:
            return await aw
        except TmemClientError as exc:
            raise BackendError(f"broker: {exc}") from exc

    def _punch(self, blocks: Sequence[int]) -> None:
        """Take blocks out of the fallback file: punch holes (their space comes back), or
        write zeros where the filesystem cannot. Not best effort: a reopen after a restart
        reads the file's data as blocks (module docstring), so old bytes must not stay."""
        for start, count in _runs(sorted(blocks)):
            rc = -1
            if _fallocate is not None:
                rc = _fallocate(
                    self._fd,
                    _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE,
                    ctypes.c_long(start * BLOCK_SIZE),
                    ctypes.c_long(count * BLOCK_SIZE),
                )
            if rc != 0:
                zeros = bytes(BLOCK_SIZE)
                for block in range(start, start + count):
                    self._write_fallback(block, zeros)
        self._fallback_dirty = True  # the next FLUSH makes the change durable
        self.stats["fallback_punched"] += len(blocks)

    def _read_fallback(self, block: int) -> bytes:
        data = os.pread(self._fd, BLOCK_SIZE, block * BLOCK_SIZE)
        if len(data) != BLOCK_SIZE:
            raise BackendError(f"short read of block {block} from {self.fallback_path}")
        self.stats["fallback_reads"] += 1
        return data

    def _write_fallback(self, block: int, data: bytes) -> None:
        try:
            written = os.pwrite(self._fd, data, block * BLOCK_SIZE)
        except OSError as exc:
            raise BackendError(f"write to {self.fallback_path} failed: {exc}") from exc
        if written != BLOCK_SIZE:
            raise BackendError(f"short write of block {block} to {self.fallback_path}")
        self._fallback_dirty = True


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _load_fallocate() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn: Callable[..., int] = libc.fallocate
    except (OSError, AttributeError):
        return None
    return fn


_fallocate = _load_fallocate()


def _data_ranges(fd: int, end: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` byte ranges of the file holding data (``SEEK_DATA`` /
    ``SEEK_HOLE``); the whole file where the filesystem cannot say."""
    ranges: list[tuple[int, int]] = []
    offset = 0
    try:
        while offset < end:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after offset
                    break
                raise
            if start >= end:
                break
            stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
            ranges.append((start, stop))
            offset = stop
    except (OSError, AttributeError):
        return [(0, end)] if end else []
    return ranges


def _runs(blocks: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted block numbers as (first, count) runs of consecutive blocks."""
    runs: list[tuple[int, int]] = []
    for block in blocks:
        if runs and runs[-1][0] + runs[-1][1] == block:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block, 1))
    return runs
