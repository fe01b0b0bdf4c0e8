"""The durable journal of persistent pages (``--durability sync``), on LMDB.

Usage::

    journal = LmdbJournal(data_dir / "journal")
    journal.record_put(guest_id, pool_id, oid, index, page)   # the core calls these, in order
    if journal.pending:
        await journal.barrier()        # returns once every record made before it is on disk
    for guest_id, pool_id, oid, index, page in journal.load():   # at start
        ...
    await journal.aclose()             # or close() outside an event loop

Why LMDB: measured on this machine (``bench/journal_engines.py``, rounds of 256 random pages,
one fsync'ed transaction per round) LMDB committed 109k-144k pages/s against 50k for SQLite in WAL
mode with ``synchronous=FULL``, and scanned 1.0M pages/s against 0.5M; LMDB with ``writemap`` was
slower to commit (34k-39k). LMDB is copy-on-write with no log to replay, so a SIGKILL or power
loss leaves the last committed transaction intact and a restart reads it at once.

Key layout (big-endian, so LMDB's byte order is handle order)::

    guest_id u64 | pool_id u16 | oid 24 bytes | index u32 | page[4080:]  ->  page[:4080]

(an all-zero page: zero tail, empty value), so a guest, a pool, an object and a handle are key
prefixes and removing one is a range delete. Why the page's last 16 bytes live in the key: a
4096-byte LMDB value takes two overflow pages, a 4080-byte one takes one (half the bytes
written per commit; see :mod:`broker.store.writer`).

Group commit: ``record_*`` only appends the encoded record to an in-memory list (O(1), on the
event loop). A single committer task copies everything recorded so far into a shared-memory slot
and sends its number to the writer process (:mod:`broker.store.writer`; a round larger than a
slot is sent through the socket instead). The writer appends the round to its write-ahead log
(one write, one ``fdatasync``) and answers; the event loop keeps accepting requests meanwhile,
and the answer wakes every barrier waiting for a record at or before that point. Records made
while a round commits form the next round, so N concurrent writers share one fsync. Records
apply in the order they were made, so a put then a flush of the same handle in one round ends
flushed. The writer applies logged rounds to LMDB in the background and commits LMDB when the
broker goes quiet or half the log (``wal_bytes``, 64 MiB) waits for it; a start replays what
the log holds beyond LMDB's last commit. ``wal_bytes=0`` commits each round to LMDB before
answering instead (why the log is faster: :mod:`broker.store.writer`).

Why a writer process rather than a thread: py-lmdb drops and retakes the GIL around every put,
so a writer thread waits for the busy event loop once per page. Measured with a CPU-bound
thread beside it, a writer thread committed 12.5k pages/s instead of 56k (``bench/`` notes).
Reads (:meth:`LmdbJournal.load`, :meth:`~LmdbJournal.load_pool`, ...) happen in the broker
process: LMDB readers and a writer in another process see the same committed snapshots. Each
reader first asks the writer for a checkpoint (:meth:`LmdbJournal.checkpoint`), so it sees every
acknowledged record.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import mmap
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import lmdb

from broker.store import writer as _writer
from broker.store.errors import JournalClosed, JournalFailed

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
ZERO_PAGE = bytes(PAGE_SIZE)
DEFAULT_MAP_SIZE = 1 << 40  # address space only: the file grows with the data it holds

_KEY = struct.Struct(">QH24sI")
_POOL = struct.Struct(">QH")
_GUEST = struct.Struct(">Q")
_OBJECT = struct.Struct(">QH24s")

# Record heads of the writer's frame format (kind, key length, key[, data length]).
_FLUSH_HEAD = bytes((_writer.FLUSH, _KEY.size))
_OBJECT_HEAD = bytes((_writer.RANGE, _OBJECT.size))
_POOL_HEAD = bytes((_writer.RANGE, _POOL.size))
_GUEST_HEAD = bytes((_writer.RANGE, _GUEST.size))
# A put's whole record head in one pack: kind, key length, key (38 bytes), data length.
_PUT_REC = struct.Struct(">BBQH24sII")
_PUT_REC_BYTES = _PUT_REC.size + PAGE_SIZE
_IOV_MAX = 1024  # iovecs per sendmsg (Linux's IOV_MAX)
# Shared memory between the broker and the writer: two slots, round r in slot r % 2 (at most two
# rounds are in flight). 16 MiB holds ~4000 pages, more than 8 clients' 256-page batches; only
# the part of a slot that rounds actually used is ever faulted in.
SLOT_BYTES = 16 << 20


def page_key(guest_id: int, pool_id: int, oid: int, index: int) -> bytes:
    """The LMDB key of a handle."""
    return _KEY.pack(guest_id, pool_id, oid.to_bytes(24, "big"), index)


def _next_prefix(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with ``prefix`` (None: there is none)."""
    b = bytearray(prefix)
    while b:
        if b[-1] != 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return None


class LmdbJournal:
    """``PersistentJournal`` on LMDB with group commit; see the module docstring.

    ``record_*`` must be called from one thread (the event loop's); ``barrier`` from the same loop.
    Outside an event loop call :meth:`sync` to commit what was recorded.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        map_size: int = DEFAULT_MAP_SIZE,
        wal_bytes: int = _writer.WAL_BYTES,
    ) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        # This process only reads; the writer process commits, with sync/metasync: fsync every
        # commit, which is the durability promise.
        self._env = lmdb.open(
            str(self.path), map_size=map_size, subdir=True, sync=True, metasync=True, max_dbs=0
        )
        self._env.reader_check()  # reader slots left by a killed broker
        ours, theirs = socket.socketpair()
        shm_fd = os.memfd_create("tmem-journal-rounds", os.MFD_CLOEXEC)
        try:
            os.ftruncate(shm_fd, 2 * SLOT_BYTES)
            self._shm = mmap.mmap(shm_fd, 2 * SLOT_BYTES)
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    _writer.__file__,
                    str(theirs.fileno()),
                    str(self.path),
                    str(map_size),
                    str(shm_fd),
                    str(SLOT_BYTES),
                    str(wal_bytes),
                ],
                pass_fds=(theirs.fileno(), shm_fd),
                stdin=subprocess.DEVNULL,
            )
        finally:
            os.close(shm_fd)  # both mappings stay valid without it
        theirs.close()
        self._slots = memoryview(self._shm)
        self._sock = ours
        # The writer first replays its log into LMDB (what a crash left there); reads of LMDB
        # must wait for that, and a log it cannot replay must stop the broker, not be skipped.
        reply = _writer.recv_exact(ours, _writer.REPLY.size)
        _, status, replayed, micros, msg_len = (
            _writer.REPLY.unpack(reply) if reply is not None else (0, 1, 0, 0, 0)
        )
        if status != 0:
            msg = (_writer.recv_exact(ours, msg_len) or b"") if msg_len else b""
            self._close_process()
            self._slots.release()
            self._shm.close()
            self._env.close()
            raise JournalFailed(
                f"journal at {self.path} could not be opened: "
                f"{msg.decode(errors='replace') or 'the writer process exited'}"
            )
        if replayed:
            log.warning(
                "journal: replayed %d rounds from the log into LMDB in %.1f ms (the last run "
                "stopped without committing them)",
                replayed,
                micros / 1000,
            )
        ours.setblocking(False)
        self._parts: list[bytes | memoryview] = [b""]  # [0]: the frame head, set per round
        self._bytes = 0
        self._round = 0
        self._recorded = 0  # records made so far
        self._durable = 0  # records known to be on disk
        self._checkpointed = 0  # records known to be in LMDB (readable by load() and friends)
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        # Rounds sent and not yet answered, (round id, records up to): at most two.
        self._in_flight: collections.deque[tuple[int, int]] = collections.deque()
        self._unsent = b""  # the tail of a request frame the socket did not take (rare)
        self._sending = False  # the committer task is sending an inline round
        self._task: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None
        self._closed = False
        self.commits = 0  # rounds committed: counters for metrics, tests and the closing log line
        self.committed_records = 0
        self.commit_seconds = 0.0  # time the writer spent in write transactions, fsync included

    # -- PersistentJournal -------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """True when something recorded is not yet durable (or the journal failed)."""
        return self._recorded > self._durable or self._failed is not None

    def record_put(self, guest_id: int, pool_id: int, oid: int, index: int, data: bytes) -> None:
        # The hot path (once per persistent page): one pack, two appends, no copy of the page.
        if len(data) != PAGE_SIZE:
            raise ValueError(f"a page is {PAGE_SIZE} bytes")
        if self._closed:
            raise JournalClosed("journal is closed")
        parts = self._parts
        parts.append(
            _PUT_REC.pack(
                _writer.PUT,
                _KEY.size,
                guest_id,
                pool_id,
                oid.to_bytes(24, "big"),
                index,
                PAGE_SIZE,
            )
        )
        parts.append(data)
        self._bytes += _PUT_REC_BYTES
        self._recorded += 1
        if self._task is None:
            self._start_round()

    def put_ahead(
        self,
        guest_id: int,
        pool_id: int,
        pages: Sequence[tuple[int, int, int, bytes | memoryview | None]],
    ) -> bool:
        """Record the puts of a batch *before* the core applies them and send them to the
        writer at once, so that the log's write and ``fdatasync`` run while the core works
        (:meth:`broker.core.restore.PageMoves.batch` calls it; it records a flush for every
        put the core then declines). ``pages`` are ``(op, oid, index, page)`` of puts.
        Returns False, recording nothing, when the round cannot go now (no event loop, two
        rounds in flight, larger than a slot): the core then records as it applies.

        Why: with one client a durable batch was a chain, core (256 puts, ~1.2-2 ms here),
        then the writer (~0.5 ms of its own work, then an ``fdatasync`` of 0.6-10 ms on this
        shared disk), then the answer; nothing overlapped. Measured (two brokers, main's code
        and this, one Redis, 8 interleaved turns of 40 batches each): 15.9k -> 20.0k and
        16.5k -> 20.2k pages/s at load 8-11, 24.3k -> 24.9k at load 5; per-batch median
        latency, batches alternating between the two brokers: 1.01x-1.26x faster (median
        1.10x, 8 runs). ``bench/perf-history.md``, #21 c.
        """
        if (
            self._closed
            or self._failed is not None
            or self._sending
            or self._unsent
            or len(self._in_flight) >= 2
            or self._bytes + len(pages) * _PUT_REC_BYTES > SLOT_BYTES
        ):
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        for _op, _oid, _index, data in pages:
            if data is None or len(data) != PAGE_SIZE:
                raise ValueError(f"a page is {PAGE_SIZE} bytes")  # (and nothing is recorded)
        parts = self._parts
        pack = _PUT_REC.pack
        kind, klen = _writer.PUT, _KEY.size
        for _op, oid, index, data in pages:
            parts.append(pack(kind, klen, guest_id, pool_id, oid.to_bytes(24, "big"), index,
                              PAGE_SIZE))  # fmt: skip
            parts.append(data)  # type: ignore[arg-type]  # a page: checked above
        self._bytes += len(pages) * _PUT_REC_BYTES
        self._recorded += len(pages)
        self._push()  # copies the pages into the slot: the caller's buffers are free after it
        if self._task is None:
            self._task = loop.create_task(self._commit_rounds())
        return True

    def record_flush(self, guest_id: int, pool_id: int, oid: int, index: int) -> None:
        self._append(_FLUSH_HEAD + _KEY.pack(guest_id, pool_id, oid.to_bytes(24, "big"), index))

    def record_flush_object(self, guest_id: int, pool_id: int, oid: int) -> None:
        self._append(_OBJECT_HEAD + _OBJECT.pack(guest_id, pool_id, oid.to_bytes(24, "big")))

    def record_destroy_pool(self, guest_id: int, pool_id: int) -> None:
        self._append(_POOL_HEAD + _POOL.pack(guest_id, pool_id))

    def record_remove_guest(self, guest_id: int) -> None:
        self._append(_GUEST_HEAD + _GUEST.pack(guest_id))

    def _append(self, head: bytes) -> None:
        if self._closed:
            raise JournalClosed("journal is closed")
        self._parts.append(head)
        self._bytes += len(head)
        self._recorded += 1
        if self._task is None:
            self._start_round()

    def _start_round(self) -> None:
        # Start a round even when nobody awaits a barrier (an exclusive get's flush): what is
        # recorded reaches the disk soon either way. Outside a loop, sync() commits.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._task = loop.create_task(self._commit_rounds())

    # -- group commit ------------------------------------------------------------------------

    async def barrier(self) -> None:
        """Return once everything recorded before this call is durable.

        Raises :class:`JournalFailed` if a commit failed, :class:`JournalClosed` after close.
        """
        if self._failed is not None:
            raise JournalFailed("an earlier journal commit failed") from self._failed
        target = self._recorded
        if target <= self._durable:
            return
        if self._closed:
            raise JournalClosed("journal is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append((target, fut))
        if self._task is None:
            self._task = loop.create_task(self._commit_rounds())
        await fut

    def _take_round(self) -> tuple[int, list[bytes | memoryview], int]:
        """Everything recorded so far as one request frame: (round id, buffers to send, records
        up to). The records go into the round's shared-memory slot, which the writer no longer
        reads (its round was answered: at most two rounds are in flight); a round too large for
        a slot is sent inline, scatter-gather."""
        self._round += 1
        round_id = self._round
        parts = self._parts
        size = self._bytes
        self._parts = [b""]
        self._bytes = 0
        if size > SLOT_BYTES:
            parts[0] = _writer.REQUEST.pack(round_id, size, _writer.INLINE)
            return round_id, parts, self._recorded
        slot = round_id & 1
        pos = slot * SLOT_BYTES
        view = self._slots
        for part in parts:
            end = pos + len(part)
            view[pos:end] = part
            pos = end
        return round_id, [_writer.REQUEST.pack(round_id, size, slot)], self._recorded

    def _check_reply(
        self,
        round_id: int,
        reply: bytes | bytearray | None,
        msg: bytes | bytearray,
        *,
        counts: bool = True,
    ) -> None:
        if reply is None:
            raise JournalFailed("the journal writer process went away")
        got, status, records, micros, _ = _writer.REPLY.unpack(reply)
        if got != round_id:
            raise JournalFailed(f"journal writer answered round {got}, expected {round_id}")
        if status != 0:
            raise JournalFailed(f"journal commit failed: {msg.decode(errors='replace')}")
        if not counts:
            return
        self.commits += 1
        self.committed_records += records
        self.commit_seconds += micros / 1e6

    def _push(self) -> None:
        """Send what is recorded as one round now, without awaiting: the records go into
        the round's slot and the 13-byte request into the socket (what the socket does not
        take, the committer task sends first). Only with fewer than two rounds in flight,
        nothing half-sent, and a round that fits a slot."""
        round_id, frame, upto = self._take_round()
        self._in_flight.append((round_id, upto))
        head = bytes(frame[0])
        try:
            sent = self._sock.send(head)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # the committer task's own send fails the same way and fails the journal
        self._unsent = head[sent:]

    async def _commit_rounds(self) -> None:
        """Feed rounds to the writer, at most two in flight: the next round is already in the
        writer's socket when it answers the current one, so it never waits for this loop."""
        loop = asyncio.get_running_loop()
        sock = self._sock
        in_flight = self._in_flight
        try:
            while (self._bytes or in_flight) and self._failed is None and not self._closed:
                try:
                    if self._unsent:
                        self._sending = True
                        try:
                            await _send_parts(loop, sock, [self._unsent])
                        finally:
                            self._sending = False
                        self._unsent = b""
                        continue
                    if self._bytes and len(in_flight) < 2:
                        if self._bytes <= SLOT_BYTES:
                            self._push()
                        else:  # larger than a slot: inline, scatter-gather
                            round_id, frame, upto = self._take_round()
                            in_flight.append((round_id, upto))
                            self._sending = True
                            try:
                                await _send_parts(loop, sock, frame)
                            finally:
                                self._sending = False
                        continue
                    reply = await _recv_exact_async(loop, sock, _writer.REPLY.size)
                    msg = b""
                    if reply is not None:
                        msg_len = _writer.REPLY.unpack(reply)[4]
                        if msg_len:
                            msg = await _recv_exact_async(loop, sock, msg_len) or b""
                    round_id, upto = in_flight.popleft()
                    self._check_reply(round_id, reply, msg)
                except (OSError, JournalFailed) as exc:
                    log.critical("journal commit failed, persistent puts now refused: %s", exc)
                    self._failed = exc
                    break
                self._durable = upto
                self._wake(upto)
        finally:
            self._task = None
            if self._failed is not None:
                self._fail_waiters()

    def _wake(self, upto: int) -> None:
        waiters = self._waiters
        while waiters and waiters[0][0] <= upto:
            fut = waiters.popleft()[1]
            if not fut.done():
                fut.set_result(None)

    def _fail_waiters(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()[1]
            if not fut.done():
                exc = JournalFailed(str(self._failed))
                exc.__cause__ = self._failed
                fut.set_exception(exc)

    def sync(self) -> None:
        """Commit everything recorded, synchronously (outside an event loop, or at close)."""
        if self._failed is not None:
            raise JournalFailed("an earlier journal commit failed") from self._failed
        if self._task is not None:
            raise RuntimeError("sync() while a commit round runs: await barrier() instead")
        if not self._bytes:
            return
        round_id, frame, upto = self._take_round()
        self._ask(round_id, frame, "commit")
        self._durable = upto

    def _ask(self, round_id: int, frame: list[bytes | memoryview], what: str) -> None:
        """Send one request and wait for its answer, blocking (no round may be running); a
        failed answer, or none, fails the journal."""
        sock = self._sock
        try:
            sock.setblocking(True)
            _send_parts_blocking(sock, frame)
            reply = _writer.recv_exact(sock, _writer.REPLY.size)
            msg_len = _writer.REPLY.unpack(reply)[4] if reply is not None else 0
            msg = (_writer.recv_exact(sock, msg_len) or b"") if msg_len else b""
            self._check_reply(round_id, reply, msg, counts=what == "commit")
        except (OSError, JournalFailed) as exc:
            self._failed = exc
            raise JournalFailed(f"journal {what} failed: {exc}") from exc
        finally:
            sock.setblocking(False)

    def checkpoint(self) -> None:
        """Make every durable record readable from LMDB: the writer applies what its log holds
        and commits. The readers below call it; outside an event loop, or with no round
        running."""
        if self._checkpointed >= self._durable or self._failed is not None or self._closed:
            return
        if self._task is not None:
            return  # a round is on the socket: read what LMDB holds (its last checkpoint)
        self._round += 1
        upto = self._durable
        self._ask(self._round, [_writer.REQUEST.pack(self._round, 0, _writer.CHECKPOINT)],
                  "checkpoint")  # fmt: skip
        self._checkpointed = upto

    # -- reading -----------------------------------------------------------------------------

    def load(self) -> Iterator[tuple[int, int, int, int, bytes]]:
        """Every stored page as ``(guest_id, pool_id, oid, index, page)``, in handle order.

        Reads one consistent snapshot; records not yet committed are not included.
        """
        self.checkpoint()
        unpack = _KEY.unpack_from
        from_bytes = int.from_bytes
        join = b"".join
        split = _KEY.size
        # buffers=True: key and value are views of the map, so the page is copied once (into
        # the bytes the core keeps), not twice.
        with self._env.begin(buffers=True) as txn:
            for key, value in txn.cursor():
                guest_id, pool_id, oid, index = unpack(key)
                page = join((value, key[split:])) if len(value) else ZERO_PAGE
                yield guest_id, pool_id, from_bytes(oid, "big"), index, page

    def load_chunks(
        self, chunk: int = 4096
    ) -> Iterator[tuple[int, int, list[tuple[int, int, bytes]]]]:
        """Every stored page as ``(guest_id, pool_id, [(oid, index, page), ...])``: lists of at
        most ``chunk`` pages of one pool, in handle order (for ``Tmem.restore_pages``).

        Reads one consistent snapshot, as :meth:`load`.
        """
        self.checkpoint()
        unpack = _KEY.unpack_from
        from_bytes = int.from_bytes
        join = b"".join
        split = _KEY.size
        zero = ZERO_PAGE
        with self._env.begin(buffers=True) as txn:
            cur = txn.cursor()
            if not cur.first():
                return
            pages: list[tuple[int, int, bytes]] = []
            append = pages.append
            at_guest = at_pool = -1
            left = chunk
            last_oid_bytes = b""
            oid = 0
            # Why this shape: per page, one key unpack, one join (the only copy of the page)
            # and one tuple; an object's pages sit side by side, so its oid converts once.
            for key, value in cur:
                guest_id, pool_id, oid_bytes, index = unpack(key)
                if pool_id != at_pool or guest_id != at_guest or not left:
                    if pages:
                        yield at_guest, at_pool, pages
                        pages = []
                        append = pages.append
                    at_guest, at_pool, left = guest_id, pool_id, chunk
                if oid_bytes != last_oid_bytes:
                    oid = from_bytes(oid_bytes, "big")
                    last_oid_bytes = oid_bytes
                append((oid, index, join((value, key[split:])) if len(value) else zero))
                left -= 1
            if pages:
                yield at_guest, at_pool, pages

    def load_pool(self, guest_id: int, pool_id: int) -> Iterator[tuple[int, int, bytes]]:
        """The pages of one pool as ``(oid, index, page)``, in handle order."""
        self.checkpoint()
        prefix = _POOL.pack(guest_id, pool_id)
        n = len(prefix)
        with self._env.begin(buffers=True) as txn:
            cur = txn.cursor()
            if not cur.set_range(prefix):
                return
            for key, value in cur:
                if key[:n] != prefix:
                    break
                _g, _p, oid, index = _KEY.unpack_from(key)
                page = b"".join((value, key[_KEY.size :])) if len(value) else ZERO_PAGE
                yield int.from_bytes(oid, "big"), index, page

    def pools(self) -> list[tuple[int, int]]:
        """The ``(guest_id, pool_id)`` pairs holding at least one page; skips over the pages."""
        self.checkpoint()
        out: list[tuple[int, int]] = []
        with self._env.begin() as txn:
            cur = txn.cursor()
            found = cur.first()
            while found:
                guest_id, pool_id = _POOL.unpack_from(cur.key())
                out.append((guest_id, pool_id))
                nxt = _next_prefix(_POOL.pack(guest_id, pool_id))
                found = nxt is not None and cur.set_range(nxt)
        return out

    def count(self) -> int:
        """How many pages the journal holds on disk."""
        self.checkpoint()
        return int(self._env.stat()["entries"])

    # -- closing -----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Commit what is recorded, then close."""
        if self._failed is None and self.pending:
            await self.barrier()
        self.close()

    def close(self) -> None:
        """Commit what is recorded (if no round is running), stop the writer, close."""
        if self._closed:
            return
        if self._task is None and self._failed is None and self._bytes:
            try:
                self.sync()
            except JournalFailed:
                log.exception("journal: the last records could not be committed at close")
        self._closed = True
        self._close_process()
        self._slots.release()
        self._shm.close()
        self._env.close()
        if self.commits:
            log.info(
                "journal closed: %d records in %d commits (%.1f per commit, %.2f ms per commit)",
                self.committed_records,
                self.commits,
                self.committed_records / self.commits,
                1000 * self.commit_seconds / self.commits,
            )

    def _close_process(self) -> None:
        # the writer finishes its round, sees EOF, commits its log to LMDB and exits
        self._sock.close()
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


async def _recv_exact_async(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int
) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        r = await loop.sock_recv_into(sock, view[got:])
        if r == 0:
            return None
        got += r
    return bytes(buf)


def _advance(parts: list[bytes | memoryview], i: int, sent: int) -> int:
    """Skip ``sent`` bytes of ``parts`` from ``parts[i]`` on; returns the new first index."""
    while sent:
        size = len(parts[i])
        if sent >= size:
            sent -= size
            i += 1
        else:
            parts[i] = memoryview(parts[i])[sent:]
            sent = 0
    while i < len(parts) and not len(parts[i]):
        i += 1
    return i


async def _send_parts(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, parts: list[bytes | memoryview]
) -> None:
    """Send every buffer of ``parts`` on the non-blocking ``sock`` (sendmsg, no join)."""
    i = _advance(parts, 0, 0)
    while i < len(parts):
        try:
            sent = sock.sendmsg(parts[i : i + _IOV_MAX])
        except (BlockingIOError, InterruptedError):
            fut: asyncio.Future[None] = loop.create_future()

            def ready(f: asyncio.Future[None] = fut) -> None:
                if not f.done():
                    f.set_result(None)

            loop.add_writer(sock.fileno(), ready)
            try:
                await fut
            finally:
                loop.remove_writer(sock.fileno())
            continue
        i = _advance(parts, i, sent)


def _send_parts_blocking(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    i = _advance(parts, 0, 0)
    while i < len(parts):
        i = _advance(parts, i, sock.sendmsg(parts[i : i + _IOV_MAX]))
