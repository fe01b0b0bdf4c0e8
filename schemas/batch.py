"""The binary batch format ``application/x-tmem-batch`` (api-v1.md, "Batch format").

Request: operations, each a 29-byte header ``>BQQQI`` = (op, oid_hi, oid_mid, oid_lo, index),
followed by 4096 page bytes when ``op`` is put. Response: one result per operation, in order:
a status byte, followed by 4096 page bytes for a get hit.

Decoding is strict: an unknown op, a truncated header or page, trailing bytes, or more than
``max_ops`` operations raise :class:`BatchError` and nothing is applied. Pages are handed out
as ``memoryview`` slices of the body, so decoding copies no page bytes.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from typing import NamedTuple

PAGE_SIZE = 4096
MAX_OID = (1 << 192) - 1
MAX_INDEX = (1 << 32) - 1
BATCH_CONTENT_TYPE = "application/x-tmem-batch"

HEADER = struct.Struct(">BQQQI")
_U64 = (1 << 64) - 1

OP_PUT = 1
OP_GET = 2
OP_FLUSH_PAGE = 3
OP_FLUSH_OBJECT = 4
_OPS = frozenset((OP_PUT, OP_GET, OP_FLUSH_PAGE, OP_FLUSH_OBJECT))
_NO_PAGE_OPS = frozenset((OP_GET, OP_FLUSH_PAGE, OP_FLUSH_OBJECT))
_NO_PAGE_OP_BYTES = bytes(sorted(_NO_PAGE_OPS))

STATUS_DONE = 0
STATUS_MISS = 1
STATUS_QUOTA = 2
STATUS_CAPACITY = 3
STATUS_FROZEN = 4
STATUS_POLICY = 5
STATUS_NAMES = {
    STATUS_DONE: "done",
    STATUS_MISS: "miss",
    STATUS_QUOTA: "quota",
    STATUS_CAPACITY: "capacity",
    STATUS_FROZEN: "frozen",
    STATUS_POLICY: "policy",
}


class BatchError(ValueError):
    """A malformed batch: the whole batch is refused (HTTP 400) and nothing is applied."""


BatchOp = tuple[int, int, int, memoryview | None]
"""One decoded operation ``(op, oid, index, page)``; ``page`` is a 4096-byte view of the
request body for puts and ``None`` otherwise. A plain tuple: the decoder builds up to 1024 of
them per request."""


class BatchResult(NamedTuple):
    """One decoded result: a status byte and, for a get hit, the page."""

    status: int
    page: bytes | None


def split_oid(oid: int) -> tuple[int, int, int]:
    """(hi, mid, lo) u64 words of a 192-bit object id, most significant first."""
    return (oid >> 128) & _U64, (oid >> 64) & _U64, oid & _U64


def join_oid(hi: int, mid: int, lo: int) -> int:
    """The object id of three u64 words, most significant first."""
    return (hi << 128) | (mid << 64) | lo


def encode_request(ops: Iterable[tuple[int, int, int, bytes | memoryview | None]]) -> bytes:
    """Encode ``(op, oid, index, page)`` tuples; ``page`` is required for puts only."""
    parts: list[bytes | memoryview] = []
    pack = HEADER.pack
    for op, oid, index, page in ops:
        if op not in _OPS:
            raise BatchError(f"unknown batch op {op}")
        if not 0 <= oid <= MAX_OID or not 0 <= index <= MAX_INDEX:
            raise BatchError("oid or index out of range")
        parts.append(pack(op, oid >> 128, (oid >> 64) & _U64, oid & _U64, index))
        if op == OP_PUT:
            if page is None or len(page) != PAGE_SIZE:
                raise BatchError(f"a put needs exactly {PAGE_SIZE} page bytes")
            parts.append(page)
    return b"".join(parts)


def _typecode(size: int) -> str:
    return next(code for code in "BHILQ" if array(code).itemsize == size)


_U32, _U64_CODE = _typecode(4), _typecode(8)
_SWAP = sys.byteorder == "little"  # the wire is big-endian


def encode_gets(handles: Sequence[tuple[int, int]]) -> bytes | bytearray:
    """``encode_request`` of a get per ``(oid, index)`` handle: the same bytes, built column by
    column (the ops, the oids' and the indexes' bytes, each one C-level strided copy) instead
    of header by header: 256 gets 72-169 µs -> 22 µs (what a ``get_many`` encodes per batch,
    issue #21 b). An oid past 64 bits takes ``encode_request``."""
    n = len(handles)
    try:
        oids = array(_U64_CODE, [oid for oid, _ in handles])
        indexes = array(_U32, [index for _, index in handles])
    except OverflowError:  # past 64 bits, or out of range: checked (and refused) there
        return encode_request([(OP_GET, oid, index, None) for oid, index in handles])
    if _SWAP:
        oids.byteswap()
        indexes.byteswap()
    oid_bytes, index_bytes = oids.tobytes(), indexes.tobytes()
    size = HEADER.size  # op (1), oid hi/mid (16, zero here), oid lo (8), index (4)
    out = bytearray(size * n)
    out[0::size] = bytes((OP_GET,)) * n
    for k in range(8):
        out[17 + k :: size] = oid_bytes[k::8]
    for k in range(4):
        out[25 + k :: size] = index_bytes[k::4]
    return out


def decode_request(body: bytes | bytearray | memoryview, max_ops: int) -> list[BatchOp]:
    """Decode a whole request body or raise :class:`BatchError` (nothing partial)."""
    view = memoryview(body)
    size = len(view)
    # No put (a batch of gets or flushes: what get_many sends): every op is a bare header,
    # unpacked in one iter_unpack; 256 gets took 85 µs through the loop below, 56 µs so. A put
    # (or an unknown op) at any header's place falls back to the loop, which is exact: until
    # the first put every header is where iter_unpack reads it. The op bytes are checked
    # first, in C (256 gets 84-114 -> 68-81 µs against a check of each decoded op, load ~9).
    hsize = HEADER.size
    if (
        size % hsize == 0
        and size // hsize <= max_ops
        and not bytes(view[::hsize]).translate(None, _NO_PAGE_OP_BYTES)
    ):
        return [(op, (hi << 128) | (mid << 64) | lo, index, None)
                for op, hi, mid, lo, index in HEADER.iter_unpack(view)]  # fmt: skip
    ops: list[BatchOp] = []
    append = ops.append
    unpack_from = HEADER.unpack_from
    pos = 0
    while pos < size:
        if len(ops) >= max_ops:
            raise BatchError(f"batch has more than {max_ops} operations")
        if pos + hsize > size:
            raise BatchError(f"truncated operation header at byte {pos}")
        op, hi, mid, lo, index = unpack_from(view, pos)
        pos += hsize
        if op == OP_PUT:
            end = pos + PAGE_SIZE
            if end > size:
                raise BatchError(f"truncated page in operation {len(ops)}")
            append((op, (hi << 128) | (mid << 64) | lo, index, view[pos:end]))
            pos = end
        elif op in _OPS:
            append((op, (hi << 128) | (mid << 64) | lo, index, None))
        else:
            raise BatchError(f"unknown op {op} in operation {len(ops)}")
    return ops


def encode_results(results: Iterable[tuple[int, bytes | memoryview | None]]) -> bytes:
    """Encode ``(status, page_or_None)`` results; a page follows only a get hit."""
    return b"".join(result_parts(results)[0])


def result_parts(
    results: Iterable[tuple[int, bytes | memoryview | None]],
) -> tuple[list[bytes | memoryview], int]:
    """The encoded results as the buffers they are made of (status bytes and the pages
    themselves, not copied) and their total length: what :func:`encode_results` joins, for a
    sender that writes buffers without joining them (``os.writev``)."""
    parts: list[bytes | memoryview] = []
    append = parts.append
    status_bytes = _STATUS_BYTES
    size = 0
    for status, page in results:
        append(status_bytes[status])
        size += 1
        if page is not None:
            append(page)
            size += len(page)
    return parts, size


_STATUS_BYTES = {s: bytes((s,)) for s in STATUS_NAMES}


def decode_results(body: bytes, ops: Sequence[int]) -> list[BatchResult]:
    """Decode a response given the op codes of the request that produced it.

    A get answered ``done`` carries a page; every other result is the status byte alone.
    """
    out: list[BatchResult] = []
    pos = 0
    size = len(body)
    for op in ops:
        if pos >= size:
            raise BatchError("truncated batch response")
        status = body[pos]
        pos += 1
        if op == OP_GET and status == STATUS_DONE:
            end = pos + PAGE_SIZE
            if end > size:
                raise BatchError("truncated page in batch response")
            out.append(BatchResult(status, body[pos:end]))
            pos = end
        else:
            out.append(BatchResult(status, None))
    if pos != size:
        raise BatchError("trailing bytes in batch response")
    return out
