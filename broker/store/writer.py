"""The journal's writer process: a write-ahead log in front of LMDB.

Started by :class:`broker.store.durable.LmdbJournal` as ``python writer.py FD PATH MAP_SIZE
SHM_FD SLOT_BYTES WAL_BYTES``; ``FD`` is its end of a socketpair, ``SHM_FD`` a memfd of two slots
of ``SLOT_BYTES`` shared with the broker. Why a process and not a thread: py-lmdb releases
and retakes the GIL around every put, so a writer *thread* queues behind the busy event loop for
the GIL once per page (a convoy measured at 3-5x slower commits under load). A process has its
own GIL; the broker's side only copies the round into a shared-memory slot and sends its
number.

Why shared memory rather than the socket for the records: sending a 1 MiB round through a unix
socket cost the broker ~5 us per page in ``sendmsg`` (the kernel allocates fresh socket buffers
and copies into them) and this process as much again to receive it into a fresh buffer; that was
28 % of the broker's time under durable batches. A slot is written with one user-space copy
into memory that stays mapped and faulted in, and read here in place. The broker reuses a slot
only after this process answered the round that used it (at most two rounds in flight, round
``r`` in slot ``r % 2``), so a slot is never written while it is read.

Why a write-ahead log (``WAL_BYTES`` > 0, the default): a round is acknowledged once it is in the
log, which is one ``pwritev`` and one ``fdatasync`` into a file written full of zeros when it was
made, so the sync moves only data blocks (1.3 ms for 1 MiB here, against 2.3 ms for the same
bytes appended: an append also commits the file system's journal). Committing the round to LMDB
instead costs applying 256 puts (1.25 ms), LMDB's write of the new pages into a growing file and
two fsyncs, all before the answer. With the log, a second thread (:class:`Checkpointer`) applies
acknowledged rounds to LMDB from the log's pages and commits LMDB once the broker has been quiet
for 50 ms or half the log waits for it (why half: a commit's burst of writes, 16 MiB or more,
queues ahead of the log's next sync on the same disk; deferred to a quiet moment it costs an
answer nothing, and half the log is left to absorb rounds while a forced one runs); once that commit is on disk it records in the log's head where replay
must start, and only then may the log reuse the space. At start (:func:`recover`) the rounds the
log holds past that point are applied to LMDB again and committed; applying a round twice is
harmless, since a put, a flush and a range delete each set the state they name.
``WAL_BYTES`` 0 commits every round to LMDB before answering (the older mode; also what a round
too large for the log gets).

The log (big-endian)::

    head     two copies, at 0 and 512, the one with the higher generation wins:
             magic 8 | generation u64 | replay-from offset u64 | replay-from round seq u64 |
             xxh3 of the fields before it u64
    frames   from byte 4096 on, as a ring: magic u32 | seq u64 | length u32 |
             xxh3(records, seed=seq) u64 | records
             A frame that would cross the end of the file goes to byte 4096 instead; replay
             tries the next offset, then 4096, and stops at the first frame whose magic, seq
             (exactly the next one) or hash does not match, so a frame torn by a crash and stale
             frames of earlier laps end it. A torn frame was never answered.

Frames on the socket (big-endian)::

    request  round u64 | length u32 | where u8 | [records]
             where 0 or 1: the records are in that shared-memory slot; 255: they follow inline
             (a round larger than a slot); 254: no records, answer once LMDB holds every round
             answered so far (a checkpoint: what the broker does before reading LMDB)
    record   kind u8 | key_len u8 | key | [data_len u32 | data]   (data only for a put)
    reply    round u64 | status u8 | records u32 | micros u64 | msg_len u16 | msg
             status 0: durable; 1: it is not, msg says why. Round 0 is sent once, unasked,
             when the log has been replayed and the process is ready (records: frames replayed).

Kinds: 0 put, 1 delete the page at a handle key, 2 delete every key starting with ``key``
(object flush, pool destroy, guest removal). Records apply in order. After a round failed, no
later round is applied: the disk always holds a prefix of the broker's rounds. The process
exits when the socket closes (the broker stopped or died), after committing the log to LMDB.

How a page is stored: LMDB puts a value that does not fit a leaf into overflow pages with a
16-byte header, so a 4096-byte value takes *two* 4 KiB pages. The last 16 bytes of each page
therefore ride at the end of the key (``handle key | tail``) and the value is the first 4080
bytes: one overflow page per page, half the bytes written and fsync'ed. An all-zero page is the
handle key with a zero tail and an empty value. A handle has at most one key; a put deletes the
old one first (one cursor seek).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import mmap
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lmdb
import xxhash

REQUEST = struct.Struct(">QIB")
INLINE = 255
CHECKPOINT = 254
REPLY = struct.Struct(">QBIQH")
DATA_LEN = struct.Struct(">I")
PUT, FLUSH, RANGE = 0, 1, 2
ZERO_PAGE = bytes(4096)
TAIL = 16  # page bytes kept in the key
SPLIT = 4096 - TAIL
ZERO_TAIL = bytes(TAIL)

WAL_NAME = "wal"
WAL_BYTES = 64 << 20
HEAD_BYTES = 4096  # the heads' block; frames start here
_HEAD = struct.Struct(">8sQQQQ")
_HEAD_MAGIC = b"tmemwal1"
_HEAD_AT = (0, 512)
_FRAME = struct.Struct(">IQIQ")
_FRAME_MAGIC = 0x544D5746  # "TMWF"
IDLE_COMMIT_S = 0.05  # the checkpointer commits LMDB once no round came for this long


def recv_exact(sock: socket.socket, n: int) -> bytearray | None:
    """``n`` bytes, or None if the peer closed first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        r = sock.recv_into(view[got:])
        if r == 0:
            return None
        got += r
    return buf


def count_records(body: bytes | bytearray | memoryview) -> int:
    """The number of records in a round; ValueError if it is not a well-formed round (so that
    nothing LMDB could not apply is ever acknowledged from the log)."""
    view = memoryview(body)
    size = len(view)
    pos = n = 0
    unpack_len = DATA_LEN.unpack_from
    while pos < size:
        if pos + 2 > size:
            raise ValueError("truncated record")
        kind = view[pos]
        end = pos + 2 + view[pos + 1]
        if kind == PUT:
            if end + 4 > size:
                raise ValueError("truncated record")
            (dlen,) = unpack_len(view, end)
            if dlen != 4096:
                raise ValueError(f"a put carries {dlen} bytes, not a page")
            end += 4 + dlen
        elif kind != FLUSH and kind != RANGE:
            raise ValueError(f"unknown record kind {kind}")
        if end > size:
            raise ValueError("truncated record")
        pos = end
        n += 1
    return n


def apply_into(txn: lmdb.Transaction, body: bytes | bytearray | memoryview) -> int:
    """Apply one round's records in ``txn`` (not committed); returns the number of records."""
    view = memoryview(body)
    size = len(body)
    pos = 0
    n = 0
    zero = ZERO_PAGE
    zero_tail = ZERO_TAIL
    unpack_len = DATA_LEN.unpack_from
    cur = txn.cursor()
    put = txn.put
    seek = cur.set_range
    found: Callable[[], bytes] = cur.key  # type: ignore[assignment]  # bytes: buffers off
    delete = cur.delete
    while pos < size:
        kind = view[pos]
        klen = view[pos + 1]
        end = pos + 2 + klen
        key = view[pos + 2 : end].tobytes()
        if kind == PUT:
            (dlen,) = unpack_len(view, end)
            pos = end + 4 + dlen
            data = view[end + 4 : pos]
            if seek(key) and found().startswith(key):
                delete()
            # Why the tail first: comparing a memoryview with bytes goes byte by byte
            # (~4 us for a page of leading zeros); a page whose tail is not zero is not a
            # zero page, and only the rest are compared as bytes.
            tail = data[SPLIT:].tobytes()
            if tail == zero_tail and data.tobytes() == zero:
                put(key + zero_tail, b"")
            else:
                put(key + tail, data[:SPLIT])
        else:
            pos = end
            if kind == FLUSH:
                if seek(key) and found().startswith(key):
                    delete()
            elif kind == RANGE:
                if seek(key):
                    while found().startswith(key) and delete():
                        pass
            else:
                raise ValueError(f"unknown record kind {kind}")
        n += 1
    return n


def apply_records(env: lmdb.Environment, body: bytes | bytearray | memoryview) -> int:
    """Apply one round in one durable write transaction; returns the number of records."""
    with env.begin(write=True) as txn:
        return apply_into(txn, body)


# -- the log --------------------------------------------------------------------------------


@dataclass(slots=True)
class Frame:
    seq: int
    start: int  # offset of the frame head
    end: int  # offset past its records


class Log:
    """The write-ahead log file: a ring of frames after a doubled head (module docstring)."""

    def __init__(self, path: str, size: int, lock_timeout: float = 60.0) -> None:
        self.path = path
        self.size = max(size, HEAD_BYTES + (1 << 20))
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._lock(lock_timeout)
        self.generation = 0
        self.map: mmap.mmap | None = None
        self.view: memoryview | None = None

    def _lock(self, timeout: float) -> None:
        """One writer per log: the writer of a broker that was just killed may still be
        committing its log to LMDB while the next broker starts; that one waits for it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise RuntimeError(
                        f"another journal writer still holds {self.path} after {timeout:.0f} s"
                    ) from None
                time.sleep(0.02)

    def close(self) -> None:
        if self.view is not None:
            self.view.release()
        if self.map is not None:
            self.map.close()
        os.close(self.fd)

    # heads

    def read_head(self) -> tuple[int, int] | None:
        """(replay-from offset, seq) of the newest valid head, or None (a new or unfinished
        file: no frame in it was ever acknowledged)."""
        best: tuple[int, int, int] | None = None
        for at in _HEAD_AT:
            raw = os.pread(self.fd, _HEAD.size, at)
            if len(raw) < _HEAD.size:
                continue
            magic, gen, pos, seq, check = _HEAD.unpack(raw)
            if magic != _HEAD_MAGIC or check != xxhash.xxh3_64_intdigest(raw[: _HEAD.size - 8]):
                continue
            if best is None or gen > best[0]:
                best = (gen, pos, seq)
        if best is None:
            return None
        self.generation = best[0]
        return best[1], best[2]

    def write_head(self, pos: int, seq: int) -> None:
        """Record where replay starts, durably (the copy not holding the newest head)."""
        self.generation += 1
        fields = _HEAD.pack(_HEAD_MAGIC, self.generation, pos, seq, 0)[: _HEAD.size - 8]
        raw = fields + struct.pack(">Q", xxhash.xxh3_64_intdigest(fields))
        if os.pwrite(self.fd, raw, _HEAD_AT[self.generation & 1]) != len(raw):
            raise OSError("short write of the journal log's head")
        os.fdatasync(self.fd)

    def create(self, seq: int) -> None:
        """Write the file full of zeros (so later syncs move only data blocks), then a head."""
        os.ftruncate(self.fd, 0)
        zeros = bytes(1 << 20)
        pos = 0
        while pos < self.size:
            pos += os.pwrite(self.fd, zeros[: min(len(zeros), self.size - pos)], pos)
        os.fsync(self.fd)
        dir_fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.write_head(HEAD_BYTES, seq)

    def open_map(self) -> memoryview:
        self.map = mmap.mmap(self.fd, self.size, prot=mmap.PROT_READ)
        self.view = memoryview(self.map)
        return self.view

    # frames

    def frame_at(self, pos: int, seq: int, end: int) -> Frame | None:
        if pos + _FRAME.size > end:
            return None
        magic, got_seq, length, check = _FRAME.unpack(os.pread(self.fd, _FRAME.size, pos))
        body_at = pos + _FRAME.size
        if magic != _FRAME_MAGIC or got_seq != seq or length > end - body_at:
            return None
        if xxhash.xxh3_64_intdigest(os.pread(self.fd, length, body_at), seed=seq) != check:
            return None
        return Frame(seq, pos, body_at + length)

    def replay(self, pos: int, seq: int) -> list[Frame]:
        """The frames from (pos, seq) on, in order, as far as they are whole and chained."""
        end = os.fstat(self.fd).st_size
        frames: list[Frame] = []
        while True:
            frame = self.frame_at(pos, seq, end)
            if frame is None and pos != HEAD_BYTES:
                frame = self.frame_at(HEAD_BYTES, seq, end)
            if frame is None:
                return frames
            frames.append(frame)
            pos, seq = frame.end, seq + 1

    def write_frame(self, pos: int, seq: int, body: bytes | bytearray | memoryview) -> None:
        head = _FRAME.pack(_FRAME_MAGIC, seq, len(body), xxhash.xxh3_64_intdigest(body, seed=seq))
        wrote = (
            os.pwritev(self.fd, [head, body], pos) if len(body) else os.pwrite(self.fd, head, pos)
        )
        if wrote != len(head) + len(body):
            raise OSError(f"short write to the journal log ({wrote} of {len(head) + len(body)})")
        os.fdatasync(self.fd)


def recover(env: lmdb.Environment, log: Log) -> tuple[int, int]:
    """Apply what the log holds past its replay point to LMDB, commit, and start the log afresh.
    Returns (frames replayed, the next round seq)."""
    head = log.read_head()
    seq = 1
    replayed = 0
    if head is not None:
        pos, seq = head
        frames = log.replay(pos, seq)
        if frames:
            with env.begin(write=True) as txn:
                for f in frames:
                    apply_into(txn, os.pread(log.fd, f.end - f.start - _FRAME.size,
                                             f.start + _FRAME.size))  # fmt: skip
            seq = frames[-1].seq + 1
            replayed = len(frames)
    if head is None or os.fstat(log.fd).st_size != log.size:
        log.create(seq)  # new, unfinished, or made with another size: everything is in LMDB
    else:
        log.write_head(HEAD_BYTES, seq)
    return replayed, seq


class Checkpointer(threading.Thread):
    """Applies answered rounds from the log to LMDB, commits, then frees their log space."""

    def __init__(self, env: lmdb.Environment, log: Log, seq: int) -> None:
        super().__init__(name="checkpointer", daemon=True)
        self.env = env
        self.log = log
        self.view = log.open_map()
        self.cond = threading.Condition()
        self.live: collections.deque[Frame] = collections.deque()  # in the log, not yet freed
        self.todo: collections.deque[Frame | threading.Event] = collections.deque()
        self.write_pos = HEAD_BYTES
        self.next_seq = seq
        self.commit_bytes = max(1 << 20, log.size // 2)
        self.failed: bytes | None = None
        self.stopping = False

    # -- the serving thread's side

    def place(self, length: int) -> tuple[int, int] | None:
        """Where the next frame of ``length`` record bytes goes, as (offset, seq); waits for
        space; None when it can never fit (larger than the log) or the checkpointer failed."""
        need = _FRAME.size + length
        if need > self.log.size - HEAD_BYTES:
            return None
        with self.cond:
            while self.failed is None:
                pos = self._fit(need)
                if pos is not None:
                    frame = Frame(self.next_seq, pos, pos + need)
                    self.next_seq += 1
                    self.write_pos = frame.end
                    self.live.append(frame)
                    return frame.start, frame.seq
                self.todo.append(threading.Event())  # free space: commit what is applied
                self.cond.notify_all()
                self.cond.wait()
            return None

    def _fit(self, need: int) -> int | None:
        size = self.log.size
        pos = self.write_pos
        if not self.live:
            return pos if pos + need <= size else HEAD_BYTES
        oldest = self.live[0].start
        if self.live[-1].start >= oldest:  # the live frames do not wrap: free after and before
            if pos + need <= size:
                return pos
            return HEAD_BYTES if HEAD_BYTES + need <= oldest else None
        return pos if pos + need <= oldest else None

    def written(self, seq: int) -> None:
        """The frame ``seq`` is on disk and answered: apply it."""
        with self.cond:
            for frame in reversed(self.live):
                if frame.seq == seq:
                    self.todo.append(frame)
                    break
            self.cond.notify_all()

    def forget(self, seq: int) -> None:
        """The frame placed as ``seq`` could not be written: nothing follows it on this run."""
        with self.cond:
            if self.failed is None:
                self.failed = b"journal log write failed"
            self.cond.notify_all()

    def checkpoint(self) -> bytes | None:
        """Wait until LMDB holds every frame written so far; the failure, if any."""
        done = threading.Event()
        with self.cond:
            self.todo.append(done)
            self.cond.notify_all()
        done.wait()
        return self.failed

    def stop(self) -> None:
        self.checkpoint()
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.join()

    # -- the thread

    def run(self) -> None:
        # A lower CPU priority for this thread alone (Linux: a thread's nice value is its own):
        # its work is off every answer's path, and at normal priority it took CPU from the
        # broker and the client on this 2-core machine. One client, 256-page durable batches,
        # interleaved A/B: nice 0 -> 10 -> 19 gave 21.5k -> 24.7k -> 25.4k and 23.2k -> 25.0k ->
        # 25.4k pages/s; four clients: within the noise. 10, not 19: on a host whose CPUs are
        # saturated a nice-19 thread gets ~1.5% of a core, and a log that fills waits for it.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        txn: lmdb.Transaction | None = None
        applied: list[Frame] = []
        applied_bytes = 0
        view = self.view
        assert view is not None
        while True:
            with self.cond:
                while not self.todo and not self.stopping:
                    if txn is not None and not self.cond.wait(IDLE_COMMIT_S):
                        break  # quiet: commit what is applied
                    if txn is None:
                        self.cond.wait()
                item = self.todo.popleft() if self.todo else None
                if item is None and self.stopping and txn is None:
                    return
            try:
                if isinstance(item, Frame):
                    if self.failed is None:
                        if txn is None:
                            txn = self.env.begin(write=True)
                        body = view[item.start + _FRAME.size : item.end]
                        try:
                            apply_into(txn, body)
                        finally:
                            body.release()
                    applied.append(item)
                    applied_bytes += item.end - item.start
                    if applied_bytes < self.commit_bytes:
                        continue
                if txn is not None:
                    txn.commit()
                    txn = None
                if applied and self.failed is None:
                    self._free(applied[-1].seq)
                applied = []
                applied_bytes = 0
            except Exception as exc:  # LMDB refused (full map or disk): nothing after applies
                if txn is not None:
                    txn.abort()
                    txn = None
                with self.cond:
                    self.failed = self.failed or repr(exc).encode()[:1000]
                    self.cond.notify_all()
                applied = []
            if isinstance(item, threading.Event):
                item.set()

    def _free(self, upto: int) -> None:
        """LMDB holds every frame up to ``upto``: move the replay point past them, then let the
        log reuse their space."""
        with self.cond:
            rest = [f for f in self.live if f.seq > upto]
            pos, seq = (rest[0].start, rest[0].seq) if rest else (self.write_pos, self.next_seq)
        self.log.write_head(pos, seq)
        with self.cond:
            while self.live and self.live[0].seq <= upto:
                self.live.popleft()
            self.cond.notify_all()


# -- serving ----------------------------------------------------------------------------------


def _fail(sock: socket.socket, round_id: int, msg: bytes) -> None:
    sock.sendall(REPLY.pack(round_id, 1, 0, 0, len(msg)) + msg)


def serve(
    sock: socket.socket,
    env: lmdb.Environment,
    shm: memoryview | None = None,
    slot_bytes: int = 0,
    checkpointer: Checkpointer | None = None,
) -> None:
    """Answer rounds until the broker closes the socket: through the log when ``checkpointer``
    is given, else one LMDB commit per round."""
    failed: bytes | None = None
    log = checkpointer.log if checkpointer is not None else None
    while True:
        head = recv_exact(sock, REQUEST.size)
        if head is None:
            return
        round_id, length, where = REQUEST.unpack(head)
        body: Any
        if where == INLINE:
            body = recv_exact(sock, length) if length else bytearray()
            if body is None:
                return  # the broker died mid-round: nothing of this round is acknowledged
        elif where == CHECKPOINT:
            if checkpointer is not None:
                failed = failed or checkpointer.checkpoint()
            if failed is not None:
                _fail(sock, round_id, failed)
            else:
                sock.sendall(REPLY.pack(round_id, 0, 0, 0, 0))
            continue
        elif shm is not None and where < 2 and length <= slot_bytes:
            start = where * slot_bytes
            body = shm[start : start + length]
        else:
            failed = failed or b"bad request frame: no such shared-memory slot"
            body = b""
        started = time.perf_counter()
        if failed is None and checkpointer is not None:
            failed = checkpointer.failed
        if failed is not None:
            # After a failed round no later one is applied: the disk always holds a prefix of
            # the broker's rounds.
            _fail(sock, round_id, failed)
            continue
        spot: tuple[int, int] | None = None
        try:
            n = count_records(body)
            spot = checkpointer.place(length) if checkpointer is not None else None
            if spot is None:
                if checkpointer is not None:  # larger than the log: straight into LMDB
                    failed = checkpointer.checkpoint()
                    if failed is not None:
                        _fail(sock, round_id, failed)
                        continue
                apply_records(env, body)
            else:
                assert log is not None and checkpointer is not None
                try:
                    log.write_frame(spot[0], spot[1], body)
                except OSError:
                    checkpointer.forget(spot[1])
                    raise
        except Exception as exc:  # reported to the broker, which refuses every later barrier
            failed = repr(exc).encode()[:1000]
            _fail(sock, round_id, failed)
            continue
        micros = int((time.perf_counter() - started) * 1e6)
        sock.sendall(REPLY.pack(round_id, 0, n, micros, 0))
        if spot is not None and checkpointer is not None:
            checkpointer.written(spot[1])  # after the answer: the checkpointer's wake-up waits


def main() -> None:
    # Ctrl-C reaches the whole process group; the broker's shutdown still needs this process
    # to commit its last round, and it exits by itself when the broker closes the socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd, path, map_size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    shm_fd, slot_bytes, wal_bytes = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    sock = socket.socket(fileno=fd)
    shm = mmap.mmap(shm_fd, 2 * slot_bytes)
    os.close(shm_fd)
    view = memoryview(shm)
    env = lmdb.open(path, map_size=map_size, subdir=True, sync=True, metasync=True, max_dbs=0)
    checkpointer: Checkpointer | None = None
    log: Log | None = None
    try:
        started = time.perf_counter()
        replayed = 0
        try:
            log_path = os.path.join(path, WAL_NAME)
            if wal_bytes or os.path.exists(log_path):
                # A log left by an earlier run is replayed even when the log is now off.
                log = Log(log_path, wal_bytes or os.path.getsize(log_path))
                replayed, seq = recover(env, log)
                if wal_bytes:
                    checkpointer = Checkpointer(env, log, seq)
                    checkpointer.start()
                else:
                    log.close()
                    log = None
                    os.unlink(log_path)
        except Exception as exc:  # the broker refuses to start rather than lose the log
            msg = repr(exc).encode()[:1000]
            sock.sendall(REPLY.pack(0, 1, 0, 0, len(msg)) + msg)
            return
        micros = int((time.perf_counter() - started) * 1e6)
        sock.sendall(REPLY.pack(0, 0, replayed, micros, 0))
        serve(sock, env, view, slot_bytes, checkpointer)
    except OSError:
        pass  # the broker died while we answered: its unanswered rounds were never acknowledged
    finally:
        if checkpointer is not None:
            checkpointer.stop()  # commit the log to LMDB, so the next start replays nothing
        if log is not None:
            log.close()
        env.close()
        sock.close()
    os._exit(0)


if __name__ == "__main__":
    main()
