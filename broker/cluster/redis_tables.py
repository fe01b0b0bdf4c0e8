"""The core's two seams in cluster mode, used by :class:`broker.cluster.engine.ClusterEngine`:

* :class:`ClusterContents` — the content table with persistent contents in Redis: a key
  flagged ``IN_REDIS`` takes the reference the engine prepared (step 1), its drops are queued
  (step 3), and it loads from Redis;
* :class:`ClusterJournal` — the journal seam, collecting the handle-map writes of one call
  (step 2);
* :class:`ClusterCold` — cold compression of local (ephemeral) pages only.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from broker.cluster.errors import ClusterUnavailable
from broker.cluster.redis_store import BUCKET_BITS, IN_REDIS, Cmd, RedisPages, ref_of
from broker.core.compression import ColdCompressor
from broker.core.content import ZERO_KEY, Contents
from broker.core.registry import Domain, Pool

if TYPE_CHECKING:
    from broker.cluster.engine import ClusterEngine


class ClusterContents(Contents):
    """The content table with persistent contents in Redis: keys flagged ``IN_REDIS`` take
    the references prepared by the engine, queue their drops, and load from Redis."""

    def __init__(self, base: Contents, pages: RedisPages) -> None:
        super().__init__(base.store, base.hash, base.compress_max)
        self.pages = pages
        # Always truthy: the put path then calls acquire() for every new content, which is
        # where a flagged key takes its prepared Redis reference (a dummy entry, never a base).
        self.collided = {-2: 0}
        self.prepared: dict[int, deque[int]] = {}
        self.take_time: dict[int, int] = {}
        self.drops: list[int] = []
        self.cache: dict[int, bytes | None] = {}
        self.local_only = False
        # the Redis contents this broker's handles reference: key -> handles (its share of
        # ``unique_pages``; kept on every place and drop, so reading it is O(1))
        self.held: dict[int, int] = {}

    def hold(self, key: int) -> None:
        """One more of this broker's handles references the Redis content ``key``."""
        held = self.held
        held[key] = held.get(key, 0) + 1

    def acquire(self, base: int, page: bytes, stored: bytes, domain: Domain) -> tuple[int, bool]:
        if not base & IN_REDIS:
            return super().acquire(base, page, stored, domain)
        queue = self.prepared.get(base)
        if not queue:
            raise AssertionError("a persistent put without a prepared Redis reference")
        key = queue.popleft()
        self.hold(key & ~HIT)
        return key & ~HIT, bool(key & HIT)  # the engine marks shared references

    def unref(self, key: int, domain: Domain) -> None:
        if not key & IN_REDIS:
            super().unref(key, domain)
            return
        key &= ~HIT
        held = self.held
        count = held.get(key, 0)
        if count <= 1:
            held.pop(key, None)
        else:
            held[key] = count - 1
        if not self.local_only:
            self.drops.append(key)

    def load(self, key: int) -> bytes:
        if key == ZERO_KEY or not key & IN_REDIS:
            return super().load(key)
        key &= ~HIT
        page = self.cache.get(key)
        if page is None:
            page = self.pages.get_many((key,))[key]
        if page is None:
            raise ClusterUnavailable("a handle's content is missing from the cluster")
        return page


# Marks a prepared key as a shared (dedup) reference; bit 190, never set in a stored key.
HIT = 1 << 190


class ClusterJournal:
    """The core's journal seam: collects the handle-map writes of one engine call."""

    def __init__(self, engine: ClusterEngine) -> None:
        self.engine = engine
        self.cmds: list[Cmd] = []
        # the handle hashes of objects and pools about to go (ClusterEngine notes them)
        self.snapshot: dict[tuple[int, int], list[tuple[int, set[int]]]] = {}
        self.buckets: dict[tuple[int, int, int], set[int]] = {}

    def _cmd(self, guest_id: int, op: bytes, pool_id: int, oid: int, index: int = 0) -> None:
        engine = self.engine
        if engine._contents.local_only:
            return
        value = b""
        taken = None
        if op == b"p":
            key = engine._reg.pool(guest_id, pool_id)[1].objects[oid][index]
            if key != ZERO_KEY:
                key &= ~HIT
                value = ref_of(key)
                taken = engine._contents.take_time.get(key)
        epoch = engine.epochs.get(guest_id, 0)
        self.cmds.append(
            engine.pages.handle_cmd(guest_id, epoch, op, pool_id, oid, index, value, taken)
        )

    def record_put(self, guest_id: int, pool_id: int, oid: int, index: int, data: bytes) -> None:
        self._cmd(guest_id, b"p", pool_id, oid, index)

    def record_flush(self, guest_id: int, pool_id: int, oid: int, index: int) -> None:
        self._cmd(guest_id, b"d", pool_id, oid, index)

    def record_flush_object(self, guest_id: int, pool_id: int, oid: int) -> None:
        for bucket in self.buckets.pop((guest_id, pool_id, oid), ()):
            self._cmd(guest_id, b"o", pool_id, oid, bucket << BUCKET_BITS)

    def record_destroy_pool(self, guest_id: int, pool_id: int) -> None:
        for oid, buckets in self.snapshot.pop((guest_id, pool_id), ()):
            for bucket in buckets:
                self._cmd(guest_id, b"o", pool_id, oid, bucket << BUCKET_BITS)

    def record_remove_guest(self, guest_id: int) -> None:
        for gid, pool_id in [k for k in self.snapshot if k[0] == guest_id]:
            self.record_destroy_pool(gid, pool_id)


class ClusterCold(ColdCompressor):
    """Cold compression of local (ephemeral) pages only: Redis holds persistent pages raw."""

    def _compress(self, pool: Pool, oid: int, index: int) -> bool:
        if pool.persistent:
            return False
        return super()._compress(pool, oid, index)
