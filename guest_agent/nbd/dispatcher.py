"""Turns NBD requests in flight into batched whole-block operations on a :class:`BlockBackend`.

One dispatcher serves an export (every connection of it). Requests are queued as they arrive;
a single loop takes everything pending (up to ``max_round_blocks``), and runs one *round*:

1. walk the round's requests in arrival order and note which blocks need their content from
   before the round (reads, and partial writes that need read-modify-write) — a block an
   earlier request of the same round wrote is served from that request instead;
2. one ``read_blocks`` for those blocks; reads are answered right away;
3. replay the requests on the fetched contents, keeping only the last state of each block,
   then one ``write_blocks`` (blocks whose last state is data) and one ``discard_blocks``
   (blocks trimmed or zeroed whole), concurrently since they touch distinct blocks;
4. writes are acknowledged as soon as the round has computed them (write-back, which NBD
   allows: only FLUSH and FUA promise durability) — unless the round holds a FLUSH or a FUA
   request: then it stores, calls ``flush``, and only then acknowledges.

So queue depth becomes batch size, and per-block ordering holds: a read sees every write
queued before it (same round: forwarded; earlier round: already stored), and never a write
queued after it (the round reads before it writes).

Rounds are pipelined: up to ``max_inflight`` rounds run at once, as long as no two of them touch
the same block (a round that overlaps one in flight waits for it, so a read never overtakes the
storing of an acknowledged write). The broker acknowledges a durable put after a group commit,
so overlapping round trips multiply throughput. A round with FLUSH or FUA first waits for every
round in flight, whose writes may already be acknowledged, so the flush covers them. A store
that fails after its writes were acknowledged makes reads of those blocks fail (until they are
rewritten) and the next FLUSH report the error. Work that must see the export quiet (a shed
moving blocks between places) goes through :meth:`Dispatcher.exclusive`.

Queue depth 1 skips the rounds where the backend allows it: with nothing queued or in flight,
:meth:`Dispatcher.read_now` and :meth:`Dispatcher.write_now` serve a one-block request at once
from a backend with ``read_block_now`` / ``write_block_now`` (the broker's own exports, whose
block store is the core in the same process); ordering holds because nothing else is pending.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from guest_agent.nbd.backend import BLOCK_SIZE, ZERO_BLOCK, BlockBackend
from guest_agent.nbd.errors import BackendError

log = logging.getLogger(__name__)

READ = 0
WRITE = 1
ZERO = 2
TRIM = 3
FLUSH = 4
EXCLUSIVE = 5

_T = TypeVar("_T")
_NO_BLOCKS = range(0)

NOT_NOW = object()
"""What a backend's ``read_block_now(block)`` answers when it cannot read the block without
waiting (the dispatcher then queues the read); otherwise it answers the block's bytes, or
``None`` for a block that holds nothing."""


Completion = Callable[["BlockRequest", "bytes | None", "BaseException | None"], None]
"""Called once when a request completes: (request, read data or None, error or None)."""


class BlockRequest:
    """One NBD request as the dispatcher sees it.

    Completion goes to ``on_done`` when given — called synchronously by the round, which saves
    an event-loop iteration per request over a future's callback — else to :attr:`future`
    (read data or ``None``). ``blocks`` (the 4 KiB blocks it touches) is computed once here:
    the dispatcher looks at it several times per request.
    """

    __slots__ = (
        "_future",
        "action",
        "blocks",
        "data",
        "finished",
        "fua",
        "kind",
        "length",
        "offset",
        "on_done",
        "tag",
    )

    def __init__(
        self,
        kind: int,
        offset: int,
        length: int,
        data: bytes | memoryview | None = None,
        fua: bool = False,
        on_done: Completion | None = None,
        tag: int = 0,  # the caller's own reference (the server keeps the NBD handle here)
        action: Callable[[], Awaitable[None]] | None = None,  # EXCLUSIVE only
    ) -> None:
        self.kind = kind
        self.offset = offset
        self.length = length
        self.data = data
        self.fua = fua
        self.on_done = on_done
        self.tag = tag
        self.action = action
        self.finished = False
        self._future: asyncio.Future[bytes | None] | None = None
        self.blocks: range = (
            _NO_BLOCKS
            if length == 0 or kind >= FLUSH  # FLUSH, EXCLUSIVE
            else range(offset // BLOCK_SIZE, (offset + length - 1) // BLOCK_SIZE + 1)
        )

    def __repr__(self) -> str:
        return f"BlockRequest(kind={self.kind}, offset={self.offset}, length={self.length})"

    @property
    def future(self) -> asyncio.Future[bytes | None]:
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        return self._future

    def resolve(self, value: bytes | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        if self.on_done is not None:
            self.on_done(self, value, None)
        else:
            self.future.set_result(value)

    def fail(self, exc: BaseException) -> None:
        if self.finished:
            return
        self.finished = True
        if self.on_done is not None:
            self.on_done(self, None, exc)
        else:
            self.future.set_exception(exc)


class Dispatcher:
    """Batches block work of concurrent requests; see the module docstring for the rounds.

    Use: ``d = Dispatcher(backend); d.start()``; then ``await d.read(offset, length)``,
    ``await d.write(offset, data, fua=...)``, ``zero``, ``trim``, ``flush`` (or :meth:`submit`
    a :class:`BlockRequest` and watch its future); ``await d.stop()`` drains and stops.
    Backend failures surface as the exception on the affected requests' futures.
    """

    def __init__(
        self,
        backend: BlockBackend,
        *,
        max_round_blocks: int = 4096,
        max_inflight: int = 4,
        min_overlap_blocks: int = 4,
    ) -> None:
        self.backend = backend
        self.max_round_blocks = max_round_blocks
        self.max_inflight = max_inflight
        # a round with reads starts beside N rounds in flight only with at least N times this
        # many blocks queued, a write-only round with N - 1 times: a second read round starts
        # early (the agent and the broker then work side by side), a second write round at
        # once (writes are acknowledged before they are stored: at QD 1 the next write comes
        # while the one before is stored, and would wait for it), further ones only once the
        # queue is deep enough to be worth an extra round trip. Measured in bench/perf-history.md
        # ("What we changed"): reads only beside a fixed 16 left a quiet machine's cores a
        # quarter idle at QD 32, and write rounds that always started carried half as many
        # requests for more CPU per I/O.
        self.min_overlap_blocks = min_overlap_blocks
        self._pending_blocks = 0
        self._pending_reads = 0
        # write-back failures: blocks whose acknowledged writes were lost, and the error the
        # next FLUSH reports
        self._lost: set[int] = set()
        # called after a round completed requests: the server sends the replies it gathered
        self.reply_hooks: list[Callable[[], None]] = []
        self._deferred_error: Exception | None = None
        self._inflight: dict[asyncio.Task[None], set[int]] = {}
        self._pending: deque[BlockRequest] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # figures for tests and the bench: how many rounds ran and how big they were
        self.rounds = 0
        self.requests = 0
        self.largest_round = 0
        self.most_inflight = 0
        self.reads_now = 0  # reads answered by read_now, outside any round
        self.writes_now = 0  # writes stored by write_now
        self._exclusive_running = False
        # a backend that can answer a block read synchronously (the broker's own exports)
        self._read_block_now: Callable[[int], object] | None = getattr(
            backend, "read_block_now", None
        )
        self._write_block_now: Callable[[int, bytes], bool] | None = getattr(
            backend, "write_block_now", None
        )

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="nbd-dispatch")

    async def stop(self) -> None:
        """Finish every queued request, then stop the loop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None

    def submit(self, request: BlockRequest) -> asyncio.Future[bytes | None]:
        """Queue a request; its :attr:`~BlockRequest.future` completes with it."""
        future = request.future
        self.enqueue(request)
        return future

    def enqueue(self, request: BlockRequest) -> None:
        """Queue a request that completes through its ``on_done`` (no future is made);
        raises :class:`RuntimeError` once :meth:`stop` was called."""
        if self._stopping:
            raise RuntimeError("dispatcher is stopping")
        self._pending.append(request)
        self._pending_blocks += len(request.blocks)
        self._pending_reads += request.kind == READ
        self._wake.set()

    def read_now(self, offset: int, length: int) -> bytes | None:
        """Answer a one-block read at once, without a round, when nothing is queued or in
        flight (so every acknowledged write is stored and no block is moving) and the backend
        can read a block synchronously (``read_block_now``: the broker's own exports, whose
        core calls do not wait). ``None``: queue the request as usual.

        Why: at queue depth 1 a read is what a swapping guest waits for; a round costs a
        dispatcher wake-up, a task and the round's bookkeeping for one block (the broker's
        export: ~84 µs of CPU per read at QD 1 through rounds on this machine)."""
        fn = self._read_block_now
        if (
            fn is None
            or length != BLOCK_SIZE
            or offset % BLOCK_SIZE
            or self._pending
            or self._exclusive_running
            or self._stopping
        ):
            return None
        if self._inflight:
            self._reap()
            if self._inflight:
                return None
        block = offset // BLOCK_SIZE
        if block in self._lost:
            return None  # the round reports the lost write
        content = fn(block)
        if content is NOT_NOW:
            return None
        self.reads_now += 1
        self.requests += 1
        return content if isinstance(content, bytes) else ZERO_BLOCK

    def write_now(self, offset: int, data: bytes) -> bool:
        """Store a one-block write (no FUA) at once, outside any round, under the same
        conditions as :meth:`read_now`, when the backend can (``write_block_now``: the broker's
        own exports without a journal to wait for). ``False``: queue the request as usual.
        An all-zero block goes through a round (which stores it as nothing)."""
        fn = self._write_block_now
        if (
            fn is None
            or len(data) != BLOCK_SIZE
            or offset % BLOCK_SIZE
            or self._pending
            or self._exclusive_running
            or self._stopping
        ):
            return False
        if self._inflight:
            self._reap()
            if self._inflight:
                return False
        block = offset // BLOCK_SIZE
        if block in self._lost or data == ZERO_BLOCK or not fn(block, data):
            return False
        self.writes_now += 1
        self.requests += 1
        return True

    async def read(self, offset: int, length: int) -> bytes:
        data = await self.submit(BlockRequest(READ, offset, length))
        assert data is not None
        return data

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool = False) -> None:
        await self.submit(BlockRequest(WRITE, offset, len(data), data, fua))

    async def zero(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.submit(BlockRequest(ZERO, offset, length, None, fua))

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.submit(BlockRequest(TRIM, offset, length, None, fua))

    async def flush(self) -> None:
        await self.submit(BlockRequest(FLUSH, 0, 0))

    async def exclusive(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``fn`` with no round in flight, in queue order (requests queued before it
        complete first, requests queued after it wait for it); returns its result."""
        box: list[_T] = []

        async def action() -> None:
            box.append(await fn())

        await self.submit(BlockRequest(EXCLUSIVE, 0, 0, action=action))
        return box[0]

    # --- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        inflight = self._inflight
        while True:
            if not self._pending:
                if self._stopping:
                    if inflight:
                        await asyncio.wait(set(inflight))
                        self._reap()
                        continue
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            # rounds that ended since the last look: at QD 1 the previous round has always
            # ended, and waiting on it cost two event-loop passes per request
            self._reap()
            beside = len(inflight) if self._pending_reads else len(inflight) - 1
            if inflight and self._pending_blocks < self.min_overlap_blocks * beside:
                await asyncio.wait(set(inflight), return_when=asyncio.FIRST_COMPLETED)
                self._reap()
                continue
            if self._pending[0].kind == EXCLUSIVE:
                request = self._pending.popleft()
                await self._drain()
                assert request.action is not None
                self._exclusive_running = True  # no read_now while blocks may move
                try:
                    await request.action()
                except Exception as exc:
                    request.fail(exc)
                else:
                    request.resolve(None)
                finally:
                    self._exclusive_running = False
                self._replied()
                continue
            batch: list[BlockRequest] = []
            blocks = 0
            touched: set[int] = set()
            barrier = False
            while self._pending and (not batch or blocks < self.max_round_blocks):
                if self._pending[0].kind == EXCLUSIVE:
                    break
                request = self._pending.popleft()
                batch.append(request)
                span = request.blocks
                blocks += len(span)
                self._pending_blocks -= len(span)
                self._pending_reads -= request.kind == READ
                touched.update(span)
                barrier = barrier or request.kind == FLUSH or request.fua
            # wait until the round touches no block of a round in flight, and there is room;
            # a FLUSH/FUA round waits for every round in flight: their writes may already be
            # acknowledged, so the flush must cover them
            while inflight and (
                barrier
                or len(inflight) >= self.max_inflight
                or any(not touched.isdisjoint(other) for other in inflight.values())
            ):
                await asyncio.wait(set(inflight), return_when=asyncio.FIRST_COMPLETED)
                self._reap()
            task = asyncio.get_running_loop().create_task(self._guarded_round(batch))
            inflight[task] = touched
            self.most_inflight = max(self.most_inflight, len(inflight))

    def _replied(self) -> None:
        for hook in self.reply_hooks:
            hook()

    def _reap(self) -> None:
        for task in [t for t in self._inflight if t.done()]:
            del self._inflight[task]

    async def _drain(self) -> None:
        if self._inflight:
            await asyncio.wait(set(self._inflight))
            self._reap()

    async def _guarded_round(self, batch: list[BlockRequest]) -> None:
        try:
            await self._round(batch)
        except Exception as exc:  # a bug or a backend failure: fail the round, keep serving
            log.exception("nbd round failed")
            for request in batch:
                request.fail(exc)
            self._replied()

    async def _round(self, batch: list[BlockRequest]) -> None:
        self.rounds += 1
        self.requests += len(batch)
        self.largest_round = max(self.largest_round, len(batch))

        # pass 1: which blocks need their pre-round content
        touched: set[int] = set()
        needed: dict[int, None] = {}  # insertion-ordered set
        do_flush = False
        for request in batch:
            kind = request.kind
            if kind == FLUSH:
                do_flush = True
                continue
            do_flush = do_flush or request.fua
            if kind == READ:
                for block in request.blocks:
                    if block not in touched:
                        needed[block] = None
                continue
            start, end = request.offset, request.offset + request.length
            for block in request.blocks:
                whole = start <= block * BLOCK_SIZE and (block + 1) * BLOCK_SIZE <= end
                if kind == TRIM and not whole:
                    continue  # a trim may leave partial blocks alone
                if not whole and block not in touched:
                    needed[block] = None
                touched.add(block)

        base: dict[int, bytes | None] = {}
        if needed:
            wanted = list(needed)
            contents = await self.backend.read_blocks(wanted)
            base = dict(zip(wanted, contents, strict=True))

        # pass 2: replay in order; `latest` holds the round's last state of each block
        latest: dict[int, bytes | None] = {}

        def current(block: int) -> bytes | None:
            if block in latest:
                return latest[block]
            return base[block]

        for request in batch:
            kind = request.kind
            if kind == FLUSH:
                continue
            start, end = request.offset, request.offset + request.length
            if kind == READ:
                if self._lost and any(b in self._lost and b not in latest for b in request.blocks):
                    request.fail(
                        BackendError("an acknowledged write to this range could not be stored")
                    )
                    continue
                if end - start == BLOCK_SIZE and not start % BLOCK_SIZE:
                    # one whole block: the common case (a 4 KiB read), no slicing or joining
                    block = start // BLOCK_SIZE
                    content = latest[block] if block in latest else base[block]
                    request.resolve(content or ZERO_BLOCK)
                    continue
                parts: list[bytes | memoryview] = []
                for block in request.blocks:
                    content = current(block) or ZERO_BLOCK
                    lo = max(start - block * BLOCK_SIZE, 0)
                    hi = min(end - block * BLOCK_SIZE, BLOCK_SIZE)
                    parts.append(content if lo == 0 and hi == BLOCK_SIZE else content[lo:hi])
                request.resolve(b"".join(parts) if len(parts) != 1 else bytes(parts[0]))
                continue
            data = request.data
            for block in request.blocks:
                block_start = block * BLOCK_SIZE
                lo = max(start - block_start, 0)
                hi = min(end - block_start, BLOCK_SIZE)
                whole = lo == 0 and hi == BLOCK_SIZE
                if kind == TRIM:
                    if whole:
                        latest[block] = None
                    continue
                if kind == ZERO:
                    if whole:
                        latest[block] = None
                        continue
                    old = current(block)
                    if old is None:
                        latest[block] = None  # zeroing part of nothing leaves nothing
                        continue
                    piece: bytes | memoryview = ZERO_BLOCK[: hi - lo]
                else:
                    assert data is not None
                    piece = data[block_start + lo - start : block_start + hi - start]
                    if whole:
                        new = bytes(piece)
                        # an all-zero block is stored as nothing: it reads back the same
                        latest[block] = None if new == ZERO_BLOCK else new
                        continue
                    old = current(block)
                old_bytes = old if old is not None else ZERO_BLOCK
                merged = b"".join((old_bytes[:lo], piece, old_bytes[hi:]))
                latest[block] = None if merged == ZERO_BLOCK else merged

        writes = [(block, content) for block, content in latest.items() if content is not None]
        discards = [block for block, content in latest.items() if content is None]
        # write-back: without FLUSH/FUA in the round, writes are acknowledged now, before they
        # are stored (NBD allows it: only FLUSH and FUA promise durability). The round's blocks
        # stay busy until stored, so nothing reads or rewrites them meanwhile, and a FLUSH
        # round waits for every round in flight.
        early = not do_flush
        if early:
            for request in batch:
                if request.kind != READ:
                    request.resolve(None)
        self._replied()  # the reads, and the early acknowledgements
        try:
            if writes and discards:
                await asyncio.gather(
                    self.backend.write_blocks(writes), self.backend.discard_blocks(discards)
                )
            elif writes:
                await self.backend.write_blocks(writes)
            elif discards:
                await self.backend.discard_blocks(discards)
            if do_flush:
                await self.backend.flush()
        except Exception as exc:
            if early:
                # acknowledged data is lost: reads of it fail until rewritten, and the next
                # FLUSH reports the error (as a kernel reports a writeback error on fsync)
                log.error("nbd: %d acknowledged blocks could not be stored: %s", len(latest), exc)
                self._lost.update(latest)
                self._deferred_error = exc
            for request in batch:
                request.fail(exc)
            self._replied()
            return
        if self._lost:
            self._lost.difference_update(latest)
        deferred, self._deferred_error = self._deferred_error, None
        for request in batch:
            if request.kind == FLUSH and deferred is not None:
                request.fail(deferred)
            else:
                request.resolve(None)
        self._replied()
        if deferred is not None and not any(r.kind == FLUSH for r in batch):
            self._deferred_error = deferred  # not reported yet: keep it for the next FLUSH
