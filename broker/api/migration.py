"""Migration: what ``GET /v1/guests/{id}/export`` and ``POST /v1/guests/import`` (admin routes,
``admin.py``) do.

Xen's tmem save/restore, over HTTP: the export streams ``application/x-tmem-export``
(:mod:`schemas.export`) with the guest's settings, persistent pools and pages, the guest frozen
while it streams; the import checks every checksum and the trailer **before** it creates
anything, so a corrupted or truncated stream leaves no guest, no page and no journal record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from broker.api.errors import BadExport, ImportDeclined
from broker.api.service import BrokerService
from broker.core.errors import GuestExists
from schemas.batch import PAGE_SIZE, STATUS_DONE, STATUS_NAMES
from schemas.export import (
    EXPORT_CONTENT_TYPE,
    ExportDecoder,
    ExportEncoder,
    ExportError,
    ExportGuest,
    ExportHeader,
    ExportPage,
    ExportPool,
)
from schemas.wire import GuestCreate, Imported, PoolCreate

log = logging.getLogger(__name__)

_PAGES_PER_CHUNK = 256  # ~1 MiB per body chunk; the loop yields between chunks


def _persistent_pools(service: BrokerService, guest_id: int) -> list[ExportPool]:
    return [
        ExportPool(pool_id=p.pool_id, exclusive_gets=p.exclusive_gets)
        for p in service.core.pools(guest_id)
        if p.kind == "persistent" and not p.shared
    ]


async def export_guest(service: BrokerService, guest_id: int) -> StreamingResponse:
    """The export of ``guest_id`` as a streaming answer; the guest stays frozen while it streams
    (and is thawed after, unless it was frozen before)."""
    record = service.guest_record(guest_id)
    was_frozen = record.frozen
    if not was_frozen:
        await service.set_frozen(guest_id, True)
    try:
        await service.barrier()
        header = ExportHeader(
            guest=ExportGuest(
                name=record.name,
                weight=record.weight,
                cap_pages=record.cap_pages,
                dedup_domain=record.dedup_domain,
                compress=record.compress,
            ),
            pools=_persistent_pools(service, guest_id),
            # the token's hash (never the token) lets an import with keep_token keep it
            source={"guest_id": guest_id, "token_sha256": record.token_hash.hex()},
        )
    except BaseException:
        if not was_frozen:
            await service.set_frozen(guest_id, False)
        raise
    log.info("export of guest %d (%s) started", guest_id, record.name)
    return StreamingResponse(
        _export_body(service, guest_id, header, was_frozen), media_type=EXPORT_CONTENT_TYPE
    )


async def _export_body(
    service: BrokerService, guest_id: int, header: ExportHeader, was_frozen: bool
) -> AsyncIterator[bytes]:
    enc = ExportEncoder()
    try:
        yield enc.header(header)
        chunk: list[bytes] = []
        for pool in header.pools:
            # Read from the core, not the journal: the same with --durability none, and the
            # guest is frozen, so only its flushes can still change the pool meanwhile.
            for oid, index, page in service.core.pool_pages(guest_id, pool.pool_id):
                chunk.append(enc.page(pool.pool_id, oid, index, page))
                if len(chunk) >= _PAGES_PER_CHUNK:
                    yield b"".join(chunk)
                    chunk.clear()
        if chunk:
            yield b"".join(chunk)
        yield enc.trailer()
        log.info("export of guest %d done: %d pages (%d zero)", guest_id, enc.pages, enc.zero_pages)
    finally:
        if not was_frozen and guest_id in service.guests:
            await asyncio.shield(service.set_frozen(guest_id, False))


async def _read_stream(
    body: AsyncIterator[bytes], service: BrokerService
) -> tuple[ExportHeader, list[ExportPage]]:
    """Decode and check the whole body; nothing is created before it returns."""
    dec = ExportDecoder()
    pages: list[ExportPage] = []
    limit = service.core.capacity_bytes // PAGE_SIZE
    try:
        async for chunk in body:
            for item in dec.feed(chunk):
                if isinstance(item, ExportPage):
                    pages.append(item)
                    if len(pages) > limit:
                        raise ImportDeclined(
                            "the stream holds more pages than this broker's capacity"
                        )
                elif isinstance(item, ExportHeader):
                    name = item.guest.name
                    # Fail fast, before the pages arrive; create_guest checks again.
                    if any(g.name == name for g in service.guests.values()):
                        raise GuestExists(f"a guest named {name!r} exists already")
        dec.finish()
    except ExportError as exc:
        raise BadExport(f"refused the whole export stream: {exc}") from exc
    except ClientDisconnect as exc:
        raise BadExport("refused the whole export stream: the client went away mid-stream") from exc
    assert dec.header is not None  # finish() succeeded
    return dec.header, pages


async def import_guest(
    service: BrokerService, body: AsyncIterator[bytes], *, keep_token: bool = False
) -> Imported:
    """Recreate the guest of the export stream ``body`` (a request's body chunks): new id,
    same name, pools and pages; all of it, or (on any failure) nothing. ``keep_token``: the
    guest keeps the token it had at the source (the stream carries its hash; the answer's
    ``token`` is then empty), else it gets a new one."""
    header, pages = await _read_stream(body, service)
    token_hash: bytes | None = None
    if keep_token:
        try:
            token_hash = bytes.fromhex(str(header.source.get("token_sha256") or ""))
        except ValueError:
            token_hash = b""
        if len(token_hash) != 32:
            raise BadExport("keep_token: the stream carries no token hash (an older export)")
    g = header.guest
    # Created without a cap so that a guest over its cap (a shed in progress) still arrives
    # whole; the cap is set once the pages are in.
    record, token = await service.create_guest(
        GuestCreate(
            name=g.name,
            weight=g.weight,
            cap_pages=None,
            dedup_domain=g.dedup_domain,
            compress=g.compress,
        ),
        token_hash=token_hash,
    )
    guest_id = record.guest_id
    try:
        await _apply(service, guest_id, header, pages)
    except BaseException:
        log.warning("import of %r failed part-way: removing guest %d again", g.name, guest_id)
        await asyncio.shield(service.delete_guest(guest_id))
        raise
    log.info("imported guest %d (%s): %d pages", guest_id, g.name, len(pages))
    return Imported(guest_id=guest_id, token=token)


async def _apply(
    service: BrokerService, guest_id: int, header: ExportHeader, pages: list[ExportPage]
) -> None:
    core = service.core
    for pool in header.pools:
        # The route's own way (core and SQL, or neither), keeping the exported pool ids.
        body = PoolCreate(kind="persistent", exclusive_gets=pool.exclusive_gets)
        await service.create_pool(guest_id, body, pool_id=pool.pool_id)
    # Through the core's put, so dedup applies as pages arrive and each page is journaled. Nobody
    # holds the new guest's token yet, so no guest request interleaves with this.
    put = core.put
    for n, p in enumerate(pages, 1):
        status = put(guest_id, p.pool_id, p.oid, p.index, p.page)
        if status != STATUS_DONE:
            raise ImportDeclined(f"page {n} was declined ({STATUS_NAMES.get(int(status), status)})")
        if n % 4096 == 0:
            await asyncio.sleep(0)
    if header.guest.cap_pages is not None:
        changes: dict[str, Any] = {"cap_pages": header.guest.cap_pages}
        await service.update_guest(guest_id, changes)
    await service.barrier()
