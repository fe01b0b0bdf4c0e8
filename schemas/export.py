"""The migration stream ``application/x-tmem-export`` (api-v1.md, ``GET /v1/guests/{id}/export``).

A guest's settings, its persistent pools and their pages, in the spirit of Xen's tmem
save/restore. Every integer is big-endian; every checksum is CRC-32 (``zlib.crc32``, stdlib, so
a guest-side client can read streams without extra packages)::

    header   b"TMEMEXP\\n" | version u16 | length u32 | JSON (length bytes) | crc32 u32
                 crc32 covers version, length and JSON; JSON is :class:`ExportHeader`
    page     b"P" | pool_id u16 | oid 24 bytes | index u32 | flags u8 | [4096 bytes] | crc32 u32
                 flags bit 0: an all-zero page, no page bytes follow; crc32 covers the record
                 from b"P" up to the crc (header and page bytes)
    trailer  b"T" | pages u64 | zero_pages u64 | stream crc32 u32
                 pages counts every page record (zero pages included); the stream crc covers
                 every byte of the stream before it, from the magic on

Only persistent pools are carried; ephemeral pages may vanish at any time anyway.

Usage::

    enc = ExportEncoder()
    chunks = [enc.header(header), *(enc.page(p, oid, i, data) for ...), enc.trailer()]

    dec = ExportDecoder()
    for chunk in body_chunks:
        for item in dec.feed(chunk):      # ExportHeader, then ExportPage..., then ExportTrailer
            ...
    trailer = dec.finish()                # raises ExportError if the stream is incomplete

The decoder is strict: bad magic or version, a checksum mismatch, an unknown record, a page of
an undeclared pool, a handle out of range, counts that disagree with the trailer, bytes after
the trailer or a stream that ends early raise :class:`ExportError`. A consumer must apply
nothing until :meth:`ExportDecoder.finish` returned.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.batch import MAX_INDEX, PAGE_SIZE

EXPORT_CONTENT_TYPE = "application/x-tmem-export"
MAGIC = b"TMEMEXP\n"
VERSION = 1
MAX_HEADER_BYTES = 1 << 20

_HEAD = struct.Struct(">HI")  # version, JSON length
_PAGE = struct.Struct(">cH24sIB")  # b"P", pool_id, oid, index, flags
_TRAILER = struct.Struct(">cQQ")  # b"T", pages, zero_pages
_CRC = struct.Struct(">I")
_ZERO = bytes(PAGE_SIZE)
FLAG_ZERO = 0x01


class ExportError(ValueError):
    """A malformed, corrupted or truncated export stream: refuse it whole (HTTP 400 ``bad_export``)."""


class ExportGuest(BaseModel):
    """The guest's settings carried across: what ``POST /v1/guests`` takes."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    weight: int = Field(default=100, ge=1)
    cap_pages: int | None = Field(default=None, ge=0)
    dedup_domain: str = Field(default="default", min_length=1, max_length=200)
    # null: the guest inherits its domain's (else the broker's) compression mode
    compress: bool | None = False


class ExportPool(BaseModel):
    """A persistent pool of the guest; the pool id is kept on import (guests keep their handles)."""

    model_config = ConfigDict(extra="forbid")

    pool_id: int = Field(ge=0, le=0xFFFF)
    exclusive_gets: bool = False


class ExportHeader(BaseModel):
    """The JSON head of a stream. ``source`` is informational (broker URL, guest id, time)."""

    model_config = ConfigDict(extra="forbid")

    guest: ExportGuest
    pools: list[ExportPool]
    source: dict[str, str | int | None] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ExportPage:
    """One page of the stream."""

    pool_id: int
    oid: int
    index: int
    page: bytes


class ExportTrailer(NamedTuple):
    """The stream's end: how many page records it held, of which all-zero."""

    pages: int
    zero_pages: int


class ExportEncoder:
    """Builds a stream piece by piece: :meth:`header` once, :meth:`page` per page, :meth:`trailer`."""

    def __init__(self) -> None:
        self._crc = 0
        self._pools: set[int] | None = None
        self.pages = 0
        self.zero_pages = 0

    def header(self, header: ExportHeader) -> bytes:
        if self._pools is not None:
            raise ExportError("header already written")
        body = header.model_dump_json().encode()
        if len(body) > MAX_HEADER_BYTES:
            raise ExportError("export header too large")
        head = _HEAD.pack(VERSION, len(body))
        out = MAGIC + head + body + _CRC.pack(zlib.crc32(body, zlib.crc32(head)))
        self._crc = zlib.crc32(out)
        self._pools = {p.pool_id for p in header.pools}
        return out

    def page(self, pool_id: int, oid: int, index: int, data: bytes | memoryview) -> bytes:
        if self._pools is None:
            raise ExportError("page before header")
        if pool_id not in self._pools:
            raise ExportError(f"pool {pool_id} is not in the header")
        if not 0 <= oid < (1 << 192) or not 0 <= index <= MAX_INDEX:
            raise ExportError("oid or index out of range")
        if len(data) != PAGE_SIZE:
            raise ExportError(f"a page is exactly {PAGE_SIZE} bytes")
        zero = data == _ZERO
        rec = _PAGE.pack(b"P", pool_id, oid.to_bytes(24, "big"), index, FLAG_ZERO if zero else 0)
        crc = zlib.crc32(rec) if zero else zlib.crc32(data, zlib.crc32(rec))
        out = rec + _CRC.pack(crc) if zero else b"".join((rec, data, _CRC.pack(crc)))
        self._crc = zlib.crc32(out, self._crc)
        self.pages += 1
        self.zero_pages += zero
        return out

    def trailer(self) -> bytes:
        if self._pools is None:
            raise ExportError("trailer before header")
        rec = _TRAILER.pack(b"T", self.pages, self.zero_pages)
        return rec + _CRC.pack(zlib.crc32(rec, self._crc))


def encode_export(
    header: ExportHeader, pages: Iterable[tuple[int, int, int, bytes | memoryview]]
) -> Iterator[bytes]:
    """The whole stream as chunks: header, one chunk per page, trailer."""
    enc = ExportEncoder()
    yield enc.header(header)
    for pool_id, oid, index, data in pages:
        yield enc.page(pool_id, oid, index, data)
    yield enc.trailer()


class ExportDecoder:
    """Incremental, strict decoder; see the module docstring. Feed chunks of any size."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._crc = 0
        self._pools: set[int] = set()
        self.header: ExportHeader | None = None
        self.trailer: ExportTrailer | None = None
        self.pages = 0
        self.zero_pages = 0

    def feed(
        self, data: bytes | bytearray | memoryview
    ) -> list[ExportHeader | ExportPage | ExportTrailer]:
        """Decode what ``data`` completes; returns the items in stream order."""
        if self.trailer is not None:
            if len(data):
                raise ExportError("bytes after the trailer")
            return []
        self._buf += data
        out: list[ExportHeader | ExportPage | ExportTrailer] = []
        buf = self._buf
        view = memoryview(buf)
        pos = 0
        try:
            size = len(buf)
            if self.header is None:
                item, pos = self._header(view, size)
                if item is None:
                    return out
                out.append(item)
            while pos < size:
                tag = buf[pos]
                if tag == 0x50:  # b"P"
                    end = pos + _PAGE.size
                    if end + _CRC.size > size:
                        break
                    _t, pool_id, oid_b, index, flags = _PAGE.unpack_from(view, pos)
                    if flags & ~FLAG_ZERO:
                        raise ExportError(f"unknown page flags {flags:#x}")
                    zero = flags & FLAG_ZERO
                    if not zero:
                        end += PAGE_SIZE
                        if end + _CRC.size > size:
                            break
                    (crc,) = _CRC.unpack_from(view, end)
                    if zlib.crc32(view[pos:end]) != crc:
                        raise ExportError(f"page record {self.pages} fails its checksum")
                    if pool_id not in self._pools:
                        raise ExportError(
                            f"page of pool {pool_id}, which the header does not declare"
                        )
                    page = _ZERO if zero else bytes(view[end - PAGE_SIZE : end])
                    out.append(ExportPage(pool_id, int.from_bytes(oid_b, "big"), index, page))
                    end += _CRC.size
                    self._crc = zlib.crc32(view[pos:end], self._crc)
                    self.pages += 1
                    self.zero_pages += 1 if zero else 0
                    pos = end
                elif tag == 0x54:  # b"T"
                    end = pos + _TRAILER.size
                    if end + _CRC.size > size:
                        break
                    _t, pages, zero_pages = _TRAILER.unpack_from(view, pos)
                    (crc,) = _CRC.unpack_from(view, end)
                    if zlib.crc32(view[pos:end], self._crc) != crc:
                        raise ExportError("the stream fails its whole-stream checksum")
                    if (pages, zero_pages) != (self.pages, self.zero_pages):
                        raise ExportError(
                            f"trailer counts {pages}/{zero_pages} pages/zero pages, "
                            f"stream held {self.pages}/{self.zero_pages}"
                        )
                    pos = end + _CRC.size
                    if pos != size:
                        raise ExportError("bytes after the trailer")
                    self.trailer = ExportTrailer(pages, zero_pages)
                    out.append(self.trailer)
                    break
                else:
                    raise ExportError(f"unknown record {tag:#04x} after page {self.pages}")
        finally:
            view.release()
        del buf[:pos]
        return out

    def _header(self, view: memoryview, size: int) -> tuple[ExportHeader | None, int]:
        fixed = len(MAGIC) + _HEAD.size
        if size < len(MAGIC):
            if bytes(view[:size]) != MAGIC[:size]:
                raise ExportError("not a tmem export stream (bad magic)")
            return None, 0
        if bytes(view[: len(MAGIC)]) != MAGIC:
            raise ExportError("not a tmem export stream (bad magic)")
        if size < fixed:
            return None, 0
        version, length = _HEAD.unpack_from(view, len(MAGIC))
        if version != VERSION:
            raise ExportError(f"export version {version} is not supported (this is {VERSION})")
        if length > MAX_HEADER_BYTES:
            raise ExportError("export header too large")
        end = fixed + length
        if end + _CRC.size > size:
            return None, 0
        (crc,) = _CRC.unpack_from(view, end)
        if zlib.crc32(view[len(MAGIC) : end]) != crc:
            raise ExportError("the export header fails its checksum")
        try:
            header = ExportHeader.model_validate_json(bytes(view[fixed:end]))
        except ValidationError as exc:
            raise ExportError(f"invalid export header: {exc.errors()[0]['msg']}") from exc
        pools = [p.pool_id for p in header.pools]
        if len(set(pools)) != len(pools):
            raise ExportError("the export header declares a pool twice")
        end += _CRC.size
        self._crc = zlib.crc32(view[:end])
        self._pools = set(pools)
        self.header = header
        return header, end

    def finish(self) -> ExportTrailer:
        """The trailer, once the whole stream was fed; raises :class:`ExportError` otherwise."""
        if self.trailer is None:
            raise ExportError(
                f"truncated export stream: it ended after {self.pages} pages without a trailer"
            )
        return self.trailer


def decode_export(
    data: bytes | bytearray | memoryview,
) -> tuple[ExportHeader, list[ExportPage], ExportTrailer]:
    """Decode a whole stream at once (tests, small guests)."""
    dec = ExportDecoder()
    pages = [item for item in dec.feed(data) if isinstance(item, ExportPage)]
    trailer = dec.finish()
    assert dec.header is not None
    return dec.header, pages, trailer
