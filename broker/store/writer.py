"""The journal's writer process: applies rounds of records to LMDB, one durable commit each.

Started by :class:`broker.store.durable.LmdbJournal` as ``python writer.py FD PATH MAP_SIZE
SHM_FD SLOT_BYTES``; ``FD`` is its end of a socketpair, ``SHM_FD`` a memfd of two slots of
``SLOT_BYTES`` shared with the broker. Why a process and not a thread: py-lmdb releases
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

Frames (big-endian)::

    request  round u64 | length u32 | where u8 | [records]
             where 0 or 1: the records are in that shared-memory slot; 255: they follow inline
             (a round larger than a slot)
    record   kind u8 | key_len u8 | key | [data_len u32 | data]   (data only for a put)
    reply    round u64 | status u8 | records u32 | micros u64 | msg_len u16 | msg
             status 0: committed (fsync'ed); 1: the commit failed, msg says why

Kinds: 0 put, 1 delete the page at a handle key, 2 delete every key starting with ``key``
(object flush, pool destroy, guest removal). Records apply in order in one write transaction.
The process exits when the socket closes (the broker stopped or died).

How a page is stored: LMDB puts a value that does not fit a leaf into overflow pages with a
16-byte header, so a 4096-byte value takes *two* 4 KiB pages. The last 16 bytes of each page
therefore ride at the end of the key (``handle key | tail``) and the value is the first 4080
bytes: one overflow page per page, half the bytes written and fsync'ed. An all-zero page is the
handle key with a zero tail and an empty value. A handle has at most one key; a put deletes the
old one first (one cursor seek).
"""

from __future__ import annotations

import mmap
import os
import signal
import socket
import struct
import sys
import time

import lmdb

REQUEST = struct.Struct(">QIB")
INLINE = 255
REPLY = struct.Struct(">QBIQH")
DATA_LEN = struct.Struct(">I")
PUT, FLUSH, RANGE = 0, 1, 2
ZERO_PAGE = bytes(4096)
TAIL = 16  # page bytes kept in the key
SPLIT = 4096 - TAIL
ZERO_TAIL = bytes(TAIL)


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


def apply_records(env: lmdb.Environment, body: bytes | bytearray | memoryview) -> int:
    """Apply one round in one durable write transaction; returns the number of records."""
    view = memoryview(body)
    size = len(body)
    pos = 0
    n = 0
    zero = ZERO_PAGE
    zero_tail = ZERO_TAIL
    unpack_len = DATA_LEN.unpack_from
    with env.begin(write=True) as txn:
        cur = txn.cursor()
        put = txn.put
        seek = cur.set_range
        found = cur.key
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


def serve(
    sock: socket.socket,
    env: lmdb.Environment,
    shm: memoryview | None = None,
    slot_bytes: int = 0,
) -> None:
    """Commit rounds until the broker closes the socket."""
    failed: bytes | None = None
    while True:
        head = recv_exact(sock, REQUEST.size)
        if head is None:
            return
        round_id, length, where = REQUEST.unpack(head)
        body: bytes | bytearray | memoryview | None
        if where == INLINE:
            body = recv_exact(sock, length) if length else bytearray()
            if body is None:
                return  # the broker died mid-round: nothing of this round is committed
        elif shm is not None and where < 2 and length <= slot_bytes:
            start = where * slot_bytes
            body = shm[start : start + length]
        else:
            failed = failed or b"bad request frame: no such shared-memory slot"
            body = b""
        started = time.perf_counter()
        if failed is not None:
            # After a failed round no later one is applied: the disk always holds a prefix of
            # the broker's rounds.
            sock.sendall(REPLY.pack(round_id, 1, 0, 0, len(failed)) + failed)
            continue
        try:
            n = apply_records(env, body)
        except Exception as exc:  # reported to the broker, which refuses every later barrier
            failed = repr(exc).encode()[:1000]
            sock.sendall(REPLY.pack(round_id, 1, 0, 0, len(failed)) + failed)
            continue
        micros = int((time.perf_counter() - started) * 1e6)
        sock.sendall(REPLY.pack(round_id, 0, n, micros, 0))


def main() -> None:
    # Ctrl-C reaches the whole process group; the broker's shutdown still needs this process
    # to commit its last round, and it exits by itself when the broker closes the socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd, path, map_size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    shm_fd, slot_bytes = int(sys.argv[4]), int(sys.argv[5])
    sock = socket.socket(fileno=fd)
    shm = mmap.mmap(shm_fd, 2 * slot_bytes)
    os.close(shm_fd)
    view = memoryview(shm)
    env = lmdb.open(path, map_size=map_size, subdir=True, sync=True, metasync=True, max_dbs=0)
    try:
        serve(sock, env, view, slot_bytes)
    except OSError:
        pass  # the broker died while we answered: its unanswered rounds were never acknowledged
    finally:
        env.close()
        sock.close()
    os._exit(0)


if __name__ == "__main__":
    main()
