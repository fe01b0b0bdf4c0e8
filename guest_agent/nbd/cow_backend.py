"""A copy-on-write export over a read-only base image, with a cache shared by every VM of it.

::

    base = BaseImage.open("golden.raw")
    backend = await open_cow(client, base, size=base.size, overlay="vm1.overlay", cache_uuid=uuid)
    # or piece by piece:
    overlay, state, written = await open_overlay(client, base, size=base.size, path="vm1.overlay")
    cache = await SharedCache.join(client, uuid, base.cache_tag)        # optional
    backend = CowBackend(overlay, base, size=base.size, cache=cache, written=written, state=state)

A block is read from the first of three places that has it:

1. the **overlay** — the VM's own writes: a persistent pool at the broker with its fallback
   file (:class:`~guest_agent.nbd.broker_backend.BrokerBackend`, as a plain export keeps its
   blocks). A one-byte-per-block *written* map says which blocks the guest ever wrote,
   trimmed or zeroed; such a block is the overlay's for good (a trimmed one reads as zeros)
   and never comes from the cache or the base again;
2. the **shared cache** — a shared ephemeral pool named by a UUID that every VM of the image
   joins (the admin authorises each guest for it). It only ever holds base-image bytes, under
   handles carrying the image's :attr:`~guest_agent.nbd.base_image.BaseImage.cache_tag`, so it
   cannot hold another VM's writes nor another image's (or another version's) blocks; equal
   blocks of different images still meet in the broker's dedup. The broker may drop any of
   it at any time: a miss (or an unreachable broker) just means reading the base;
3. the **base image**; a block read from it is put into the shared cache (in the background:
   the read is answered first).

Cache handle of block ``b`` of an image with tag ``t`` (128 bits)::

    oid   = (t << 24) | (b >> 8)     # one object per 1 MiB chunk, as the overlay's
    index = b

The export joins the shared pool at start and does not leave it at a stop (joining again is
idempotent at the broker): a shared pool and its pages go with its last member, and the
cache is worth most to the next VM booted from the image. The guest leaves it by destroying
the pool (``DELETE /v1/pools/{id}``) or when the admin removes the guest.

Persistence: with an overlay file, the written map, the overlay's location map and its pool id
are kept in ``FILE.state`` (written to a temporary file, fsynced, renamed) at every ``FLUSH``
that follows a change and at a clean stop, and the overlay's pool is kept at the broker when
the export stops: a restarted export with the same ``--overlay`` serves the same disk. A block
whose place changed after the last ``FLUSH`` may read back, after a crash of the agent,
as ``EIO`` instead of its old or new bytes (never as another block's bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Literal, Protocol

from guest_agent.errors import TmemClientError
from guest_agent.nbd.backend import BLOCK_SIZE, BlockBackend
from guest_agent.nbd.base_image import BaseImage, ImageVersion
from guest_agent.nbd.broker_backend import BROKER, BrokerBackend
from guest_agent.nbd.errors import BackendError
from schemas.wire import SelfInfo

log = logging.getLogger(__name__)

_OBJECT_SHIFT = 8
_TAG_SHIFT = 24  # room for block >> 8 of any block number below 2^32
_STATE_MAGIC = b"TMEMCOW1\n"
_MAX_PENDING_CACHE_PUTS = 8


class CacheClient(Protocol):
    """The calls of :class:`guest_agent.client.AsyncTmemClient` the shared cache uses."""

    async def create_pool(
        self,
        kind: Literal["persistent", "ephemeral"],
        *,
        shared: bool = ...,
        uuid: str | None = ...,
    ) -> int: ...  # pragma: no cover

    async def destroy_pool(self, pool_id: int) -> None: ...  # pragma: no cover

    async def put_many(
        self, pool_id: int, pages: Sequence[tuple[int, int, bytes | memoryview]]
    ) -> Sequence[object]: ...  # pragma: no cover

    async def get_many(
        self, pool_id: int, handles: Sequence[tuple[int, int]]
    ) -> list[bytes | None]: ...  # pragma: no cover


class CowClient(CacheClient, Protocol):
    """Everything a base-image export asks of the client (its overlay's calls included)."""

    async def flush_many(
        self, pool_id: int, handles: Sequence[tuple[int, int]]
    ) -> None: ...  # pragma: no cover

    async def self_info(self) -> SelfInfo: ...  # pragma: no cover

    async def shed_candidates(
        self, limit: int = 256
    ) -> list[tuple[int, int, int]]: ...  # pragma: no cover

    async def report_export(
        self, name: str, figures: dict[str, int]
    ) -> None: ...  # pragma: no cover


class SharedCache:
    """Base-image blocks in a shared ephemeral pool: best effort in both directions.

    ``get`` answers ``None`` for a block it cannot deliver (a miss, or the broker failing:
    the caller reads the base image instead); ``put`` never raises. ``stats`` counts hits,
    misses, puts, declined puts and errors.
    """

    def __init__(self, client: CacheClient, pool_id: int, uuid: str, tag: int) -> None:
        self.client = client
        self.pool_id = pool_id
        self.uuid = uuid
        self.tag = tag
        self._oid_base = tag << _TAG_SHIFT
        self.stats: dict[str, int] = defaultdict(int)

    @classmethod
    async def join(cls, client: CacheClient, uuid: str, tag: int) -> SharedCache:
        """Create or join the shared pool ``uuid`` (the guest must be authorised for it)."""
        pool_id = await client.create_pool("ephemeral", shared=True, uuid=uuid)
        return cls(client, pool_id, uuid, tag)

    def handle(self, block: int) -> tuple[int, int]:
        """The cache handle ``(oid, index)`` of a base-image block."""
        return self._oid_base | (block >> _OBJECT_SHIFT), block

    async def get(self, blocks: Sequence[int]) -> list[bytes | None]:
        handle = self.handle
        try:
            pages = await self.client.get_many(self.pool_id, [handle(b) for b in blocks])
        except TmemClientError as exc:
            log.warning("nbd: shared cache get failed (%s); reading the base image", exc)
            self.stats["cache_errors"] += 1
            return [None] * len(blocks)
        hits = sum(1 for page in pages if page is not None)
        self.stats["cache_hits"] += hits
        self.stats["cache_misses"] += len(blocks) - hits
        return pages

    async def put(self, pages: Sequence[tuple[int, bytes]]) -> None:
        handle = self.handle
        try:
            results = await self.client.put_many(
                self.pool_id, [(*handle(block), data) for block, data in pages]
            )
        except TmemClientError as exc:
            log.warning("nbd: shared cache put failed: %s", exc)
            self.stats["cache_errors"] += 1
            return
        stored = sum(1 for r in results if r)
        self.stats["cache_puts"] += stored
        self.stats["cache_puts_declined"] += len(pages) - stored

    async def leave(self) -> None:
        """Leave the shared pool (it lives on while other exports are members)."""
        try:
            await self.client.destroy_pool(self.pool_id)
        except TmemClientError as exc:
            log.warning("nbd: leaving the shared cache failed: %s", exc)


class OverlayState:
    """The overlay's maps and pool id in ``PATH.state``: what a restarted export reads back.

    Layout: a magic line, one JSON line (``pool_id``, ``blocks``, ``base``: the image version's
    size, mtime and header digest), then ``blocks`` bytes of the written map and ``blocks``
    bytes of the overlay's location map. The image is matched by version, not by cache tag:
    the tag may carry the file's device and inode, which a reboot or a copy can change.
    """

    def __init__(self, path: str, *, base: ImageVersion, block_count: int) -> None:
        self.path = path
        self.base = base
        self.block_count = block_count
        self._saved = b""
        self.saves = 0

    def load(self) -> tuple[int, bytearray, bytearray] | None:
        """``(pool_id, written, location)`` from the file, ``None`` when there is none;
        ``ValueError`` when it belongs to another base image or size, or is damaged."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            if not raw.startswith(_STATE_MAGIC):
                raise ValueError("no magic line")
            head_end = raw.index(b"\n", len(_STATE_MAGIC))
            head = json.loads(raw[len(_STATE_MAGIC) : head_end])
            base, blocks, pool_id = head["base"], head["blocks"], int(head["pool_id"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.path}: not an overlay state file ({exc})") from exc
        body = raw[head_end + 1 :]
        if base != self._base_json():
            raise ValueError(
                f"{self.path}: the overlay was made over another version of the base image"
            )
        if blocks != self.block_count or len(body) != 2 * self.block_count:
            raise ValueError(f"{self.path}: the overlay is for another export size")
        self._saved = raw
        n = self.block_count
        return pool_id, bytearray(body[:n]), bytearray(body[n:])

    def _base_json(self) -> dict[str, object]:
        return {
            "size": self.base.size,
            "mtime_ns": self.base.mtime_ns,
            "header_digest": self.base.header_digest,
        }

    def save(self, pool_id: int, written: bytearray, location: bytearray) -> bool:
        """Write the state durably when it changed since the last save; whether it did."""
        head = {
            "pool_id": pool_id,
            "blocks": self.block_count,
            "base": self._base_json(),
        }
        raw = b"".join((_STATE_MAGIC, json.dumps(head).encode(), b"\n", written, location))
        if raw == self._saved:
            return False
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dirfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        self._saved = raw
        self.saves += 1
        return True


async def open_overlay(
    client: CowClient,
    base: BaseImage,
    *,
    size: int,
    path: str,
    read_retry_s: float = 30.0,
) -> tuple[BrokerBackend, OverlayState, bytearray]:
    """The overlay of an export: its broker backend (pool kept at stop), state and written map.

    A new overlay (no ``PATH.state``) gets a new persistent pool; an existing one gets its
    pool, maps and fallback file back. ``ValueError`` when the state does not fit ``base``
    and ``size``, or its pool is gone from the broker while it held blocks.
    """
    block_count = (size + BLOCK_SIZE - 1) // BLOCK_SIZE
    state = OverlayState(path + ".state", base=base.version, block_count=block_count)
    loaded = state.load()
    if loaded is None:
        pool_id = await client.create_pool("persistent")
        backend = BrokerBackend(
            client,
            pool_id,
            size=size,
            fallback_path=path,
            destroy_pool_on_close=False,
            read_retry_s=read_retry_s,
        )
        written = bytearray(block_count)
        state.save(pool_id, written, backend.location)
        return backend, state, written
    pool_id, written, location = loaded
    pools = await _pool_ids(client)
    if pool_id not in pools:
        if location.count(BROKER):
            raise ValueError(f"{state.path}: the overlay's pool {pool_id} is gone from the broker")
        pool_id = await client.create_pool("persistent")
    backend = BrokerBackend(
        client,
        pool_id,
        size=size,
        fallback_path=path,
        destroy_pool_on_close=False,
        read_retry_s=read_retry_s,
    )
    backend.location[:] = location
    state.save(pool_id, written, backend.location)
    return backend, state, written


async def _pool_ids(client: CowClient) -> set[int]:
    """The guest's persistent pool ids at the broker."""
    info = await client.self_info()
    return {int(p.pool_id) for p in info.pools if p.kind == "persistent"}


class CowBackend:
    """A :class:`~guest_agent.nbd.backend.BlockBackend`: overlay, then shared cache, then base.

    ``overlay`` is any block backend (the broker backend in production, a
    :class:`~guest_agent.nbd.backend.MemoryBackend` for a throwaway overlay); ``written`` is
    its written map (a fresh one when omitted); ``state`` keeps it across restarts (see the
    module docstring). At :meth:`close` the export stays a member of the shared cache unless
    ``leave_cache_on_close``: a shared pool goes with its last member, and the cache should
    outlive the VMs that come and go (the next VM of the image finds it warm).
    :attr:`stats` has the figures an operator reads: ``base_reads`` and ``base_read_bytes``,
    ``cache_hits`` and ``cache_misses``, ``overlay_blocks`` (blocks the guest wrote), and the
    overlay's own counters.
    """

    def __init__(
        self,
        overlay: BlockBackend,
        base: BaseImage,
        *,
        size: int,
        cache: SharedCache | None = None,
        written: bytearray | None = None,
        state: OverlayState | None = None,
        leave_cache_on_close: bool = False,
    ) -> None:
        self.overlay = overlay
        self.leave_cache_on_close = leave_cache_on_close
        self.base = base
        self.size = size
        self.block_count = (size + BLOCK_SIZE - 1) // BLOCK_SIZE
        self.cache = cache
        self.written = written if written is not None else bytearray(self.block_count)
        if len(self.written) != self.block_count:
            raise ValueError("the written map does not fit the export's size")
        self.state = state
        self.overlay_blocks = self.block_count - self.written.count(0)
        self._puts: set[asyncio.Task[None]] = set()
        self.counts: dict[str, int] = defaultdict(int)

    @property
    def stats(self) -> dict[str, int]:
        """Every figure of the export, the overlay's and the cache's included."""
        out: dict[str, int] = dict(getattr(self.overlay, "stats", {}))
        out.update(self.counts)
        if self.cache is not None:
            out.update(self.cache.stats)
        out["cache_hits"] = out.get("cache_hits", 0)
        out["cache_misses"] = out.get("cache_misses", 0)
        out["base_reads"] = self.base.reads
        out["base_read_bytes"] = self.base.read_bytes
        out["overlay_blocks"] = self.overlay_blocks
        return out

    # --- BlockBackend ---------------------------------------------------------------------

    async def read_blocks(self, blocks: Sequence[int]) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(blocks)
        written = self.written
        image_blocks = self.base.block_count
        mine: list[int] = []
        shared: list[int] = []
        for i, block in enumerate(blocks):
            if written[block]:
                mine.append(i)
            elif block < image_blocks:
                shared.append(i)
            # else: past the image's end and never written: zeros
        if mine:
            pages = await self.overlay.read_blocks([blocks[i] for i in mine])
            for i, page in zip(mine, pages, strict=True):
                out[i] = page
            self.counts["overlay_reads"] += len(mine)
        if not shared:
            return out
        # a changed base is refused even where the cache could answer: those bytes belong to
        # a version of the disk that no longer exists
        self.base.check()
        missing = shared
        if self.cache is not None:
            pages = await self.cache.get([blocks[i] for i in shared])
            missing = []
            for i, page in zip(shared, pages, strict=True):
                if page is None:
                    missing.append(i)
                else:
                    out[i] = page
        if missing:
            wanted = [blocks[i] for i in missing]
            contents = await asyncio.to_thread(self.base.read_blocks, wanted)
            for i, data in zip(missing, contents, strict=True):
                out[i] = data
            if self.cache is not None:
                await self._cache_put(list(zip(wanted, contents, strict=True)))
        return out

    async def write_blocks(self, writes: Sequence[tuple[int, bytes]]) -> None:
        self._mark([block for block, _ in writes])
        await self.overlay.write_blocks(writes)

    async def discard_blocks(self, blocks: Sequence[int]) -> None:
        # a trimmed or zeroed block is the overlay's (zeros), not the base's again
        self._mark(blocks)
        await self.overlay.discard_blocks(blocks)

    async def flush(self) -> None:
        await self.overlay.flush()
        await self.save_state()

    async def close(self) -> None:
        try:
            if self._puts:
                await asyncio.wait(set(self._puts), timeout=10)
            for task in self._puts:
                task.cancel()
            await self.save_state()
            if self.cache is not None and self.leave_cache_on_close:
                await self.cache.leave()
        finally:
            try:
                await self.overlay.close()
            finally:
                self.base.close()

    async def shed(self, pages: int) -> int:
        """Move up to ``pages`` of the overlay's broker blocks to its fallback file (a shed
        notice; run through ``Dispatcher.exclusive``) and save the maps that moved them."""
        if not isinstance(self.overlay, BrokerBackend):
            return 0
        moved = await self.overlay.shed(pages)
        if moved:
            await self.save_state()
        return moved

    async def save_state(self) -> None:
        """Persist the maps when they changed (a no-op without an overlay state file)."""
        if self.state is None or not isinstance(self.overlay, BrokerBackend):
            return
        overlay = self.overlay
        try:
            await asyncio.to_thread(
                self.state.save,
                overlay.pool_id,
                bytearray(self.written),
                bytearray(overlay.location),
            )
        except OSError as exc:
            raise BackendError(f"saving {self.state.path} failed: {exc}") from exc

    # --- helpers --------------------------------------------------------------------------

    def _mark(self, blocks: Sequence[int]) -> None:
        written = self.written
        new = 0
        for block in blocks:
            if not written[block]:
                written[block] = 1
                new += 1
        self.overlay_blocks += new

    async def _cache_put(self, pages: list[tuple[int, bytes]]) -> None:
        """Put base blocks into the cache without holding up the read that fetched them;
        beyond a few puts in flight, wait for one (memory stays bounded)."""
        assert self.cache is not None
        while len(self._puts) >= _MAX_PENDING_CACHE_PUTS:
            await asyncio.wait(set(self._puts), return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.create_task(self.cache.put(pages))
        self._puts.add(task)
        task.add_done_callback(self._puts.discard)

    async def wait_for_cache_puts(self) -> None:
        """Return once every background cache put has finished (for tests and stop)."""
        with contextlib.suppress(asyncio.CancelledError):
            while self._puts:
                await asyncio.wait(set(self._puts))


async def open_cow(
    client: CowClient,
    base: BaseImage,
    *,
    size: int,
    overlay: str,
    cache_uuid: str | None,
) -> CowBackend:
    """The broker-backed copy-on-write export of ``tmem-agent nbd --base``: overlay pool and
    ``overlay`` file (state in ``overlay + ".state"``), the shared cache ``cache_uuid`` when
    given, the base image. Leaves nothing open when it fails."""
    backend, state, written = await open_overlay(client, base, size=size, path=overlay)
    cache: SharedCache | None = None
    try:
        if cache_uuid is not None:
            cache = await SharedCache.join(client, cache_uuid, base.cache_tag)
        return CowBackend(backend, base, size=size, cache=cache, written=written, state=state)
    except BaseException:
        await backend.close()
        raise


async def report_figures(
    client: CowClient, name: str, backend: CowBackend, *, every_s: float = 5.0
) -> None:
    """Send the export's figures to the broker every ``every_s`` seconds until cancelled
    (the operator reads them at ``GET /v1/exports``); a failed report is logged, not fatal."""
    name = report_name(name)
    while True:
        try:
            await client.report_export(name, figures_for_broker(backend))
        except TmemClientError as exc:
            log.warning("nbd: reporting figures failed: %s", exc)
        await asyncio.sleep(every_s)


def report_name(export_name: str) -> str:
    """The name an export reports under: its own, in the broker's alphabet
    (``A-Za-z0-9._-``, 1 to 64 characters; anything else becomes ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", export_name)[:64] or "_"


FIGURES = (
    "base_reads",
    "base_read_bytes",
    "cache_hits",
    "cache_misses",
    "cache_puts",
    "cache_errors",
    "overlay_blocks",
    "overlay_reads",
)


def figures_for_broker(backend: CowBackend) -> dict[str, int]:
    """The figures an export reports to the broker (a fixed set of counters)."""
    stats = backend.stats
    figures = {key: int(stats.get(key, 0)) for key in FIGURES}
    figures["size_blocks"] = backend.block_count
    return figures
