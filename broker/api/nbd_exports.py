"""NBD exports served by the broker itself, on Unix sockets, for VMs on the broker's host.

::

    tmem-broker serve --uds /run/tmem/broker.sock --nbd-dir /run/tmem/nbd ...
    curl --unix-socket /run/tmem/broker.sock -X PUT -H "Authorization: Bearer $GUEST_TOKEN" \\
        -d '{"size": 1073741824}' http://localhost/v1/self/nbd/swap
    # -> {"name": "swap", "size": ..., "pool_id": ..., "socket": "/run/tmem/nbd/g7-swap.sock"}
    qemu-system-x86_64 ... -drive file=nbd+unix:///swap?socket=/run/tmem/nbd/g7-swap.sock,...

Why: through ``tmem-agent nbd`` every NBD round crosses two processes (the agent, then the
broker over HTTP); here the same export code — ``guest_agent.nbd``'s server, dispatcher and
:class:`~guest_agent.nbd.broker_backend.BrokerBackend` with its fallback file — runs inside
the broker and calls the core directly (:class:`CorePages`), so a read at queue depth 1 is one
hop. The agent's export stays for VMs on other hosts and for exports that must outlive a
broker restart.

Who may connect: each export is one socket in ``--nbd-dir``, which the broker creates with
mode 0700, so only the broker's user (the hypervisor's, or a group the operator grants) can
open it. The export is created by the guest's own token, serves that guest's pool only, and
its pages count against that guest's quota like any put; what the broker declines goes to the
export's fallback file in the same directory. The export answers shed notices of its guest
the way the agent's does (moves blocks to the fallback file, then acks).

Lifetime: an export lives until ``DELETE /v1/self/nbd/{name}`` or until its guest is deleted;
a broker restart (a stop or a crash) does not end it. Each export is a row in SQL (guest,
name, size, pool); at start, once the journal has reloaded the pool's pages and before
``/readyz`` says ready, the broker serves it again on the same socket over the same pool and
fallback file (:meth:`BrokerBackend.reopen <guest_agent.nbd.broker_backend.BrokerBackend.reopen>`
rebuilds where each block is), so a VM whose NBD client reconnects (qemu ``reconnect-delay``)
reads what it wrote. Durability: each batch waits for the journal (``sync``) before the round
is answered, and ``FLUSH`` fsyncs the fallback file when it changed, so what a ``FLUSH``
acknowledged survives a crash of the broker or of the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Request, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from broker.api.deps import GuestDep
from broker.api.errors import ApiError, BadInput
from broker.api.service import BrokerService
from broker.core.errors import TmemError, UnknownGuest
from broker.db.repo import NbdExportRecord
from guest_agent.nbd.broker_backend import BrokerBackend, block_handle
from guest_agent.nbd.dispatcher import NOT_NOW, Dispatcher
from guest_agent.nbd.notices import follow_notices
from guest_agent.nbd.server import NbdServer
from schemas.batch import OP_FLUSH_PAGE, OP_GET, OP_PUT, STATUS_DONE
from schemas.wire import Notice, PoolCreate

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_SIZE = 1 << 44  # 16 TiB: the block number is the page index (u32)
_CHUNK = 1024  # ops per core call: bounds the time one call holds the event loop


class NbdDisabled(ApiError):
    status = 404
    code = "nbd_disabled"


class NbdInCluster(ApiError):
    """Cluster mode: see :meth:`NbdExports.create`."""

    status = 409
    code = "nbd_in_cluster_mode"


class NbdExists(ApiError):
    status = 409
    code = "nbd_exists"


class UnknownNbdExport(ApiError):
    status = 404
    code = "unknown_nbd_export"


class CorePages:
    """The page calls :class:`BrokerBackend` makes (``PageClient``), answered by the core in
    this process: the same operations and outcomes as the guest's HTTP batch route, without
    HTTP. Each call waits for the journal, as the route does before it answers."""

    def __init__(self, service: BrokerService, guest_id: int) -> None:
        self.service = service
        self.guest_id = guest_id

    async def create_pool(self, kind: Literal["persistent"]) -> int:
        info = await self.service.create_pool(self.guest_id, PoolCreate(kind=kind))
        return info.pool_id

    async def destroy_pool(self, pool_id: int) -> None:
        await self.service.destroy_pool(self.guest_id, pool_id)

    async def _batch(self, pool_id: int, ops: list[Any]) -> list[tuple[int, bytes | None]]:
        service = self.service
        if not service.ready.is_set():
            await service.ready.wait()
        batch = service.core.batch
        out: list[tuple[int, bytes | None]] = []
        for start in range(0, len(ops), _CHUNK):
            out += batch(self.guest_id, pool_id, ops[start : start + _CHUNK])
        if service.journal.pending:
            await service.journal.barrier()
        return out

    async def shed_candidates(self, limit: int = 256) -> list[tuple[int, int, int]]:
        """The guest's coldest persistent pages (what a shed takes back first)."""
        return self.service.core.shed_candidates(self.guest_id, limit)

    def get_now(self, pool_id: int, oid: int, index: int) -> object:
        """A get answered at once (``BrokerBackend.read_block_now``), or ``NOT_NOW`` while the
        broker is not ready. A non-exclusive persistent get records nothing in the journal,
        so there is nothing to wait for."""
        if not self.service.ready.is_set():
            return NOT_NOW
        return self.service.core.get(self.guest_id, pool_id, oid, index)

    def put_now(self, pool_id: int, oid: int, index: int, page: bytes) -> object:
        """A put answered at once (``BrokerBackend.write_block_now``): whether it was stored,
        or ``NOT_NOW`` when it should take the batch path — the broker is not ready, or it
        keeps a journal (durability ``sync``), whose commits that path waits for a round at a
        time (group commits), where a put stored here would leave them all to the next
        ``FLUSH``."""
        service = self.service
        if not service.ready.is_set() or service.settings.durability != "none":
            return NOT_NOW
        return service.core.put(self.guest_id, pool_id, oid, index, page) == STATUS_DONE

    async def barrier(self) -> None:
        """Wait for the journal (``BrokerBackend.flush``: a FLUSH covers every stored put)."""
        await self.service.barrier()

    async def put_many(
        self, pool_id: int, pages: Sequence[tuple[int, int, bytes | memoryview]]
    ) -> list[bool]:
        ops = [(OP_PUT, oid, index, page) for oid, index, page in pages]
        return [status == STATUS_DONE for status, _ in await self._batch(pool_id, ops)]

    async def get_many(
        self, pool_id: int, handles: Sequence[tuple[int, int]]
    ) -> list[bytes | None]:
        ops = [(OP_GET, oid, index, None) for oid, index in handles]
        return [page for _, page in await self._batch(pool_id, ops)]

    async def flush_many(self, pool_id: int, handles: Sequence[tuple[int, int]]) -> None:
        await self._batch(pool_id, [(OP_FLUSH_PAGE, oid, index, None) for oid, index in handles])

    # the calls follow_notices makes
    async def notices(self, after: int = 0, wait: float = 0) -> list[Notice]:
        return await self.service.hub.poll(self.guest_id, after, wait)

    async def ack(self, seq: int, pages_returned: int = 0) -> None:
        # what the ack route does: store it, then tell the pressure policy
        if await self.service.hub.ack(self.guest_id, seq, pages_returned):
            self.service.pressure_loop.acked(self.guest_id, seq, pages_returned)


async def _notice_stream(pages: CorePages, after: int) -> AsyncIterator[Notice]:
    while True:
        batch = await pages.notices(after, wait=25)
        for notice in batch:
            after = max(after, notice.seq)
            yield notice


@dataclass
class _Export:
    guest_id: int
    name: str
    socket: Path
    fallback: Path
    backend: BrokerBackend
    dispatcher: Dispatcher
    server: NbdServer
    tasks: list[asyncio.Task[None]]

    def info(self) -> NbdExportInfo:
        return NbdExportInfo(
            name=self.name, size=self.server.size, pool_id=self.backend.pool_id,
            socket=str(self.socket), uri=f"nbd+unix:///{self.name}?socket={self.socket}",
        )  # fmt: skip


class NbdExportCreate(BaseModel):
    size: Annotated[int, Field(ge=4096, le=MAX_SIZE, description="bytes, rounded up to 4 KiB")]


class NbdExportInfo(BaseModel):
    name: str
    size: int
    pool_id: int
    socket: str
    uri: str


class NbdExports:
    """The broker's exports, keyed by (guest id, name); sockets and fallback files in
    ``directory`` (created mode 0700), rows in SQL. Call :meth:`restore` once at start, once
    the journal has reloaded (creations wait for it), and :meth:`close` at shutdown."""

    def __init__(self, service: BrokerService, directory: Path) -> None:
        self.service = service
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self.exports: dict[tuple[int, str], _Export] = {}
        # exports in SQL that could not be served again at start: only DELETE helps
        self.unrestored: dict[tuple[int, str], NbdExportRecord] = {}
        self.restored = asyncio.Event()
        self._lock = asyncio.Lock()
        service.guest_removers.append(self.forget_guest)

    def _paths(self, guest_id: int, name: str) -> tuple[Path, Path]:
        stem = self.directory / f"g{guest_id}-{name}"
        return stem.with_suffix(".sock"), stem.with_suffix(".fallback")

    async def create(self, guest_id: int, name: str, size: int) -> _Export:
        if self.service.cluster is not None:
            # An export is a socket and a fallback file on ONE broker's host, but a guest's
            # home (its only writer) moves: a failover, an admin move, a restart handing its
            # guests over. Pinned to a host, the export would lose its writer or drag the
            # guest back; ``tmem-agent nbd`` follows the home instead (docs/scale.md).
            raise NbdInCluster(
                "a broker in cluster mode serves no NBD exports of its own: run `tmem-agent "
                "nbd`, which follows the guest's home broker"
            )
        if not NAME.fullmatch(name):
            raise BadInput("an export name is 1-64 of A-Z a-z 0-9 . _ -")
        await self.restored.wait()  # a name kept in SQL is taken, even before it serves again
        async with self._lock:
            if (guest_id, name) in self.exports or (guest_id, name) in self.unrestored:
                raise NbdExists(f"guest {guest_id} already has an export {name!r}")
            size = (size + 4095) // 4096 * 4096
            sock, fallback = self._paths(guest_id, name)
            for path in (sock, fallback):  # left by an export whose pool is gone
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            pages = CorePages(self.service, guest_id)
            backend = await BrokerBackend.open(pages, size=size, fallback_path=str(fallback))
            record = NbdExportRecord(guest_id, name, size, backend.pool_id)
            try:
                await asyncio.to_thread(_fsync_dir, self.directory)
                await asyncio.to_thread(self.service.repo.add_nbd_export, record)
                export = await self._serve(record, backend, sock, fallback)
                if guest_id not in self.service.guests:  # deleted while this was made
                    await self._stop(export, keep_pool=True)
                    raise UnknownGuest(f"no guest {guest_id}")
            except BaseException:
                with contextlib.suppress(Exception):
                    await backend.close()
                _unlink(sock, fallback)
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.service.repo.delete_nbd_export, guest_id, name)
                raise
            log.info("nbd: guest %d export %r (%d bytes) on %s", guest_id, name, size, sock)
            return export

    async def restore(self, *, serve: bool = True) -> int:
        """Serve every export SQL holds again, over its pool and fallback file; returns how
        many. An export whose pool is gone is dropped; one that fails otherwise is logged and
        kept in :attr:`unrestored` (its name stays taken until ``DELETE``). ``serve=False``
        (cluster mode: a guest's pages arrive with its lease, after the start) only takes
        the names."""
        served = 0
        try:
            records = await asyncio.to_thread(self.service.repo.nbd_exports)
            async with self._lock:
                for record in records:
                    if not serve:  # (made before cluster mode: create refuses them there)
                        log.warning("nbd: export %r of guest %d not served in cluster mode "
                                    "(DELETE it)", record.name, record.guest_id)  # fmt: skip
                        self.unrestored[(record.guest_id, record.name)] = record
                        continue
                    try:
                        if await self._restore(record):
                            served += 1
                    except Exception:
                        log.exception("nbd: export %r of guest %d not restored",
                                      record.name, record.guest_id)  # fmt: skip
                        self.unrestored[(record.guest_id, record.name)] = record
        finally:
            self.restored.set()
        if served:
            log.info("nbd: %d exports served again", served)
        return served

    async def _restore(self, record: NbdExportRecord) -> bool:
        guest_id, name = record.guest_id, record.name
        core = self.service.core
        sock, fallback = self._paths(guest_id, name)
        if self.service.settings.durability == "none":
            # the pool's pages died with the last process: serving the rest would read the
            # lost blocks as zeros (silent corruption); no device at all is an honest error
            log.warning("nbd: export %r of guest %d dropped: --durability none kept none of "
                        "its broker blocks", name, guest_id)  # fmt: skip
            with contextlib.suppress(TmemError):
                await self.service.destroy_pool(guest_id, record.pool_id)
            await asyncio.to_thread(self.service.repo.delete_nbd_export, guest_id, name)
            _unlink(sock, fallback)
            return False
        try:
            handles = core.pool_handles(guest_id, record.pool_id)
            pool = next(p for p in core.pools(guest_id) if p.pool_id == record.pool_id)
        except (TmemError, StopIteration):
            pool = None
        if pool is None or pool.kind != "persistent" or not fallback.exists():
            # its pool (or its file) went while the broker was down: half an image is none
            log.warning("nbd: export %r of guest %d has lost its pool or file; dropped",
                        name, guest_id)  # fmt: skip
            await asyncio.to_thread(self.service.repo.delete_nbd_export, guest_id, name)
            _unlink(sock, fallback)
            return False
        blocks = [index for oid, index in handles if block_handle(index) == (oid, index)]
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()  # left by the broker that stopped
        backend = BrokerBackend.reopen(
            CorePages(self.service, guest_id), record.pool_id, size=record.size,
            fallback_path=str(fallback), broker_blocks=blocks,
        )  # fmt: skip
        try:
            await self._serve(record, backend, sock, fallback)
        except BaseException:
            await backend.close(keep_pool=True)
            raise
        log.info("nbd: guest %d export %r on %s again (%d blocks at the broker)",
                 guest_id, name, sock, len(blocks))  # fmt: skip
        return True

    async def _serve(
        self, record: NbdExportRecord, backend: BrokerBackend, sock: Path, fallback: Path
    ) -> _Export:
        guest_id, name = record.guest_id, record.name
        pages = backend.client
        assert isinstance(pages, CorePages)
        after = max((n.seq for n in await pages.notices(0, 0)), default=0)
        dispatcher = Dispatcher(backend)
        dispatcher.start()
        server = NbdServer(dispatcher, size=record.size, name=name)
        try:
            await server.listen_unix(str(sock))
        except BaseException:
            await dispatcher.stop()
            raise

        async def shed(n: int) -> int:
            return await dispatcher.exclusive(lambda: backend.shed(n))

        tasks = [
            asyncio.create_task(server.serve_forever(), name=f"nbd-{guest_id}-{name}"),
            asyncio.create_task(
                follow_notices(_notice_stream(pages, after), shed, pages),
                name=f"nbd-notices-{guest_id}-{name}",
            ),
        ]
        export = _Export(guest_id, name, sock, fallback, backend, dispatcher, server, tasks)
        self.exports[(guest_id, name)] = export
        return export

    async def delete(self, guest_id: int, name: str) -> None:
        """Stop the export, destroy its pool, forget it (SQL, socket, fallback file)."""
        async with self._lock:
            export = self.exports.pop((guest_id, name), None)
            record = self.unrestored.pop((guest_id, name), None)
            if export is None and record is None:
                raise UnknownNbdExport(f"no export {name!r}")
            if export is not None:
                await self._stop(export, keep_pool=False)
            elif record is not None:
                with contextlib.suppress(TmemError):
                    await self.service.destroy_pool(guest_id, record.pool_id)
            # the pool first: a crash before the row goes leaves a row whose pool is gone,
            # which the next start drops
            await asyncio.to_thread(self.service.repo.delete_nbd_export, guest_id, name)
            _unlink(*self._paths(guest_id, name))

    async def forget_guest(self, guest_id: int) -> None:
        """Stop the guest's exports (it is being deleted: the core drops its pools and SQL
        its rows). Called under the service's lock, so it takes no lock that waits for it."""
        for key in [k for k in self.unrestored if k[0] == guest_id]:
            del self.unrestored[key]
        for key in [k for k in self.exports if k[0] == guest_id]:
            export = self.exports.pop(key)
            with contextlib.suppress(Exception):
                await self._stop(export, keep_pool=True)
            _unlink(export.socket, export.fallback)
            log.info("nbd: guest %d export %r stopped with its guest", guest_id, key[1])

    async def close(self) -> None:
        """Stop serving every export (broker shutdown); pools, files and rows stay for the
        next start."""
        async with self._lock:
            exports, self.exports = list(self.exports.values()), {}
        for export in exports:
            with contextlib.suppress(Exception):
                await self._stop(export, keep_pool=True)
            with contextlib.suppress(OSError):
                export.socket.unlink()

    @staticmethod
    async def _stop(export: _Export, *, keep_pool: bool) -> None:
        for task in export.tasks:
            task.cancel()
        for task in export.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await export.server.close()
        await export.dispatcher.stop()
        try:
            await export.backend.flush()  # the fallback file fsynced when it changed
        finally:
            await export.backend.close(keep_pool=keep_pool)


def _unlink(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def _fsync_dir(directory: Path) -> None:
    """Make a new file's name durable (its contents are fsynced by the export's FLUSH)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def exports_of(request: Request) -> NbdExports:
    exports: NbdExports | None = request.app.state.nbd_exports
    if exports is None:
        raise NbdDisabled("this broker serves no NBD exports (start it with --nbd-dir)")
    return exports


router = APIRouter(prefix="/v1", tags=["guest"])
ExportName = Annotated[str, PathParam(min_length=1, max_length=64, pattern=f"^{NAME.pattern}$")]


@router.put("/self/nbd/{name}", status_code=201, response_model=NbdExportInfo)
async def create_nbd_export(
    name: ExportName,
    body: Annotated[NbdExportCreate, Body()],
    request: Request,
    guest_id: GuestDep,
) -> NbdExportInfo:
    """Serve an NBD export of a new persistent pool on a Unix socket (broker's host only)."""
    export = await exports_of(request).create(guest_id, name, body.size)
    return export.info()


@router.delete("/self/nbd/{name}", status_code=204, response_class=Response)
async def delete_nbd_export(name: ExportName, request: Request, guest_id: GuestDep) -> None:
    """Stop an export and destroy its pool (a broker restart keeps both)."""
    await exports_of(request).delete(guest_id, name)
