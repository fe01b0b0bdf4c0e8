"""``ClusterEngine``: the core of a broker in cluster mode (Tmem-compatible).

It is :class:`broker.core.Tmem` — every rule kept (quotas, weights, eviction accounts, shed
notices, figures) for the guests this broker is home of — with the bytes and handle maps of
PERSISTENT pages in the Redis Cluster (:mod:`broker.cluster.redis_store`):

* A persistent pool's pages are content keys flagged ``IN_REDIS``; the local core keeps the
  handle -> key map (metadata only), Redis keeps the bytes with a reference count per handle
  and, per guest, the same handle map, written only through the fenced script.
* Ephemeral pages stay in this broker's RAM (the core's own store, dedup within the broker):
  ephemeral pages may vanish at any time by contract, so they are neither replicated nor
  moved with a guest (see the loss table in docs/scale.md).

Every persistent change goes in three steps, in this order, so a crash can leak a reference
but never leave a handle pointing at nothing:

1. take the content references (``lua.TAKE``: byte compare, or create), durably (``WAIT``);
2. run the core's rules (which decide, place and remove handles locally) and write the handle
   changes it made, fenced by the guest's epoch, durably — only then is anything
   acknowledged;
3. drop the references that handles let go of (and those taken for puts the rules declined).

A failure in 1 changes nothing here and raises ``ClusterUnavailable`` (503, retry). A failure
in 2 marks the guest *stale*: its local map is rebuilt from Redis before its next call (what
Redis has is the truth). A fence found higher than ours raises ``Fenced`` and the guest is
released here. A full cluster (maxmemory: OOM) declines the put with ``capacity``.

Not thread-safe, like Tmem; the Redis calls are synchronous (see docs/scale.md, Data plane).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from broker.cluster.errors import ClusterUnavailable, Fenced
from broker.cluster.redis_store import (
    BUCKET_BITS,
    IN_REDIS,
    Cmd,
    RedisPages,
    is_oom,
    key_of,
    with_tail,
)
from broker.cluster.redis_tables import HIT, ClusterCold, ClusterContents, ClusterJournal
from broker.core.content import ZERO_KEY, ZERO_PAGE, Hasher
from broker.core.errors import BadPageSize, BadRequest
from broker.core.model import CoreConfig
from broker.core.registry import Domain, Guest, Pool
from broker.core.restore import BatchOp, check_batch, check_handle
from broker.core.tmem import Tmem
from schemas.batch import OP_GET, OP_PUT, PAGE_SIZE, STATUS_CAPACITY, STATUS_DONE

log = logging.getLogger(__name__)


class ClusterEngine(Tmem):
    """A broker's core in cluster mode; see the module docstring. Build it with
    :func:`open_cluster_engine`, then :meth:`adopt` each guest this broker is home of."""

    def __init__(
        self,
        config: CoreConfig,
        pages: RedisPages,
        broker_id: str,
        *,
        clock: Callable[[], float] | None = None,
        hasher: Hasher | None = None,
    ) -> None:
        self.handles = ClusterJournal(self)
        kwargs: dict[str, Any] = {"journal": self.handles}
        if clock is not None:
            kwargs["clock"] = clock
        if hasher is not None:
            kwargs["hasher"] = hasher
        super().__init__(config, **kwargs)
        self.pages = pages
        self.broker_id = broker_id
        self._contents = ClusterContents(self._contents, pages)
        self._table.contents = self._contents
        self._cold = ClusterCold(self._reg, self._table, self._ev)
        self.epochs: dict[int, int] = {}
        self._stale: set[int] = set()

    _contents: ClusterContents

    # ---------------------------------------------------------------- homes

    def adopt(self, guest_id: int, epoch: int) -> None:
        """Become the guest's writer at ``epoch``: raise its fence in Redis, then load its
        persistent handle map (metadata only, no page bytes) into the local core. The guest
        and its pools must be known here already (from PostgreSQL). Raises ``Fenced`` when a
        higher epoch holds the guest."""
        self._reg.guest(guest_id)
        done, fence = self.pages.adopt(guest_id, epoch)
        if not done:
            raise Fenced(guest_id, epoch, fence)
        self.epochs[guest_id] = epoch
        self._load_handles(guest_id)

    def release(self, guest_id: int) -> None:
        """Stop serving the guest: drop its local pages (Redis keeps the persistent ones; the
        ephemeral ones are gone) and its epoch. Its metadata stays known."""
        self.epochs.pop(guest_id, None)
        self._stale.discard(guest_id)
        if self.has_guest(guest_id):
            self._local(lambda: self._clear_local(guest_id))

    def fenced(self, guest_id: int) -> bool:
        """Whether this broker may not write the guest: not adopted here, or the fence in
        Redis is above our epoch (another broker took it)."""
        epoch = self.epochs.get(guest_id)
        if epoch is None:
            return True
        try:
            fence = self.pages.rc.get(self.pages.epoch_key(guest_id))
        except Exception as exc:
            raise ClusterUnavailable(f"reading the fence failed: {exc}") from exc
        return fence is not None and int(fence) > epoch

    def _local(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` with Redis untouched (local bookkeeping only)."""
        cc = self._contents
        cc.local_only = True
        try:
            return fn()
        finally:
            cc.local_only = False

    def _clear_local(self, guest_id: int, persistent_only: bool = False) -> None:
        g = self._reg.guest(guest_id)
        for pool in g.pools.values():
            if not pool.shared and (pool.persistent or not persistent_only):
                self._table.clear(pool)

    def _load_handles(self, guest_id: int) -> int:
        handles = self.pages.handles(guest_id)
        g = self._reg.guest(guest_id)

        def load() -> int:
            self._clear_local(guest_id, persistent_only=True)
            n = 0
            for pool_id, oid, index, ref in handles:
                pool = g.pools.get(pool_id)
                if pool is None or not pool.persistent:
                    log.warning("guest %d: handles of unknown pool %d skipped", guest_id, pool_id)
                    continue
                if ref:
                    self._table.place(pool, oid, index, key_of(ref), PAGE_SIZE)
                    self._contents.hold(key_of(ref))
                else:
                    self._table.place(pool, oid, index, ZERO_KEY, 0)
                n += 1
            return n

        n: int = self._local(load)
        self._stale.discard(guest_id)
        return n

    def _home(self, guest_id: int) -> None:
        if guest_id not in self.epochs:
            raise Fenced(guest_id, 0)
        if guest_id in self._stale:
            self._load_handles(guest_id)

    @property
    def unique_pages(self) -> int:
        """Distinct contents this broker's handles hold: its own (ephemeral) ones and the
        Redis contents its guests' handles reference (a content shared by guests of two
        brokers counts at each)."""
        return self._contents.unique_pages + len(self._contents.held)

    @property
    def redis_contents_held(self) -> int:
        """How many distinct Redis contents this broker's handles reference (its share of
        ``unique_pages``; the pool's figure replaces the brokers' shares by
        :meth:`count_contents`)."""
        return len(self._contents.held)

    def count_contents(self) -> int:
        """The contents in the whole Redis Cluster (this namespace), each counted once however
        many brokers' guests reference it: the pool's share of ``unique_pages``. Safe to call
        from a worker thread (it only reads counters)."""
        return self.pages.count_contents()

    @property
    def used_bytes(self) -> int:
        """Page bytes this broker's handles hold: its own and, raw, the Redis contents it
        references (so ``compression_ratio`` stays unique pages x 4096 / these bytes)."""
        return self._contents.used_bytes + len(self._contents.held) * PAGE_SIZE

    def cluster_stats(self) -> dict[str, Any]:
        """The Redis Cluster as the admin sees it: per master, memory used and its limit
        (0: none), keys, and its replicas; whether every slot is served."""
        rc = self.pages.rc
        try:
            rc.nodes_manager.initialize()
            masters = []
            for node in rc.get_primaries():
                conn = rc.get_redis_connection(node)
                memory = conn.info("memory")
                masters.append(
                    {
                        "node": node.name,
                        "used_memory": int(memory["used_memory"]),
                        "maxmemory": int(memory["maxmemory"]),
                        "keys": int(conn.dbsize()),
                        "replicas": int(conn.info("replication")["connected_slaves"]),
                    }
                )
            state = rc.cluster_info(target_nodes=rc.get_random_node())["cluster_state"]
        except Exception as exc:
            raise ClusterUnavailable(f"reading the cluster's figures failed: {exc}") from exc
        return {"state": state, "masters": masters}

    # ---------------------------------------------------------------- the three steps

    def _around(
        self,
        guest_id: int,
        takes: Sequence[tuple[int, bytes]],
        call: Callable[[set[int]], Any],
        prefetch: Iterable[int] = (),
        fix: Callable[[Any, set[tuple[int, int, int]]], Any] | None = None,
    ) -> Any:
        """Step 1 (take ``takes``: (key with tail, page)), ``call(full)`` (the core; ``full``:
        indexes into ``takes`` the cluster had no room for), step 2 and step 3."""
        self._home(guest_id)
        cc = self._contents
        pages = self.pages
        full: set[int] = set()
        cmds: list[Cmd] = []
        if takes:
            cmds = [pages.take_cmd(key, page) for key, page in takes]
            pages.run(cmds, durable=True)
            failed: Exception | None = None
            for i, ((key, _page), cmd) in enumerate(zip(takes, cmds, strict=True)):
                reply = cmd.result
                if is_oom(reply):
                    full.add(i)
                    continue
                if isinstance(reply, Exception):
                    failed = reply
                    continue
                k, hit, taken = (int(x) for x in reply)
                if k < 0:  # every collision number holds other bytes: no room for this one
                    full.add(i)
                    continue
                real = key | k << 160
                cc.take_time[real] = taken
                base = key & ((1 << 192) - 1)
                cc.prepared.setdefault(base, deque()).append(real | (HIT if hit else 0))
            if failed is not None:
                self._give_back()
                raise ClusterUnavailable(f"taking a reference failed: {failed}") from failed
        journal = self.handles
        try:
            cc.cache = pages.get_many(prefetch) if prefetch else {}
        except ClusterUnavailable:
            self._give_back()
            raise
        try:
            result = call(full)
        finally:
            leftover = [k & ~HIT for q in cc.prepared.values() for k in q]
            cc.prepared.clear()
            cc.cache = {}
            handle_cmds, journal.cmds = journal.cmds, []
            drops, cc.drops = cc.drops, []
            times = cc.take_time
            cc.take_time = {}
        leftover_drops = [(k, times[k]) for k in leftover]
        if takes and handle_cmds:
            leftover_drops += self._retake_aged(handle_cmds, takes, cmds)
        try:
            since, full_handles = self._write_handles(guest_id, handle_cmds)
        except Fenced:
            # None of the refused handles holds its new reference: give those back (the
            # handles it would have replaced keep theirs; they were not removed either).
            self._drop(leftover_drops + self._refused_takes(handle_cmds))
            raise
        if full_handles:
            leftover_drops += self._undo_full(guest_id, full_handles)
            if fix is None:
                raise ClusterUnavailable("the cluster is full")
            result = fix(result, {h for h, _k, _t in full_handles})
        self._drop([(k, since) for k in drops] + leftover_drops)
        return result

    def _retake_aged(
        self, cmds: list[Cmd], takes: Sequence[tuple[int, bytes]], take_cmds: list[Cmd]
    ) -> list[tuple[int, int]]:
        """Take again the reference of each handle write (``cmds``) whose take may be older
        than G/4 by now, and point that write at the new take's time; returns the old
        references (key, take time) for step 3 (a drop past G/2 is refused: a leak the
        collector takes). ``takes``/``take_cmds``: this call's takes and their commands.

        Why: ``lua.HANDLE`` refuses a take older than G/2 (the collector may count it as
        leaked by then), and one call can last that long: its per-master pipelines run one
        after another, each waiting for fsyncs and ``WAIT``, and a node that does not answer
        is tried again. The put then failed 503 (once in the bench; docs/scale-data.md). A
        new take is a take like any other: the collector's argument holds. A take's age is
        bounded by the local time since its pipeline was sent (``Cmd.sent``)."""
        limit = self.pages.grace_s / 4
        now = time.monotonic()
        if now - min(c.sent for c in take_cmds) <= limit:
            return []  # the common case: one pass over the takes
        aged: dict[int, tuple[int, bytes, int]] = {}  # key -> (key as taken, page, take time)
        for (key, page), c in zip(takes, take_cmds, strict=True):
            reply = c.result
            if now - c.sent <= limit or not isinstance(reply, list) or int(reply[0]) < 0:
                continue
            real = key | int(reply[0]) << 160
            taken = int(reply[2])
            if real not in aged or taken < aged[real][2]:  # the earliest: the safe deadline
                aged[real] = (key, page, taken)
        redo = [
            cmd
            for cmd in cmds
            if cmd.args[7] == b"p" and cmd.args[10] and key_of(cmd.args[10]) in aged
        ]
        if not redo:
            return []
        again = []
        for cmd in redo:
            key, page, _taken = aged[key_of(cmd.args[10])]
            again.append(self.pages.take_cmd(key, page))
        try:
            self.pages.run(again, durable=True)
        except ClusterUnavailable as exc:  # the handle writes then tell whether it mattered
            log.warning("taking %d aged references again failed: %s", len(again), exc)
            return []
        old = []
        for cmd, new in zip(redo, again, strict=True):
            reply = new.result
            if not isinstance(reply, list) or int(reply[0]) < 0:
                continue  # (the OOM of a full cluster, say): the handle write decides
            key = key_of(cmd.args[10])
            real = aged[key][0] | int(reply[0]) << 160
            taken = int(reply[2])
            if real != key:  # another collision number than the handle's: not the one
                old.append((real, taken))
                continue
            cmd.args = (*cmd.args[:11], taken, *cmd.args[12:])
            old.append((key, aged[key][2]))
        log.warning(
            "%d references taken again before their handles, %.1f s after their pipeline "
            "was sent (limit %.1f s)",
            len(again),
            now - min(c.sent for c in take_cmds),
            limit,
        )
        return old

    def _undo_full(
        self, guest_id: int, full: list[tuple[tuple[int, int, int], int, int]]
    ) -> list[tuple[int, int]]:
        """Handles the cluster had no room to write (OOM): remove them (the put is declined
        ``capacity``, which flushes the old copy too), here and in Redis; their new references
        are returned for dropping."""
        epoch = self.epochs.get(guest_id, 0)
        cmds = [self.pages.handle_cmd(guest_id, epoch, b"d", *h) for h, _k, _t in full]
        self.pages.run(cmds, durable=True)
        g = self._reg.guest(guest_id)

        def forget() -> None:
            for (pool_id, oid, index), _key, _taken in full:
                pool = g.pools[pool_id]
                self._table.take(pool, oid, index)
                pool.declined_capacity += 1
                g.declined_capacity += 1

        self._local(forget)
        return [(key, taken) for _h, key, taken in full if key != ZERO_KEY]

    def _give_back(self) -> None:
        """Drop the references prepared for a call that will not run."""
        cc = self._contents
        leftover = [k & ~HIT for q in cc.prepared.values() for k in q]
        times = cc.take_time
        cc.prepared.clear()
        cc.take_time = {}
        self._drop([(k, times[k]) for k in leftover])

    def _write_handles(
        self, guest_id: int, cmds: list[Cmd]
    ) -> tuple[int, list[tuple[tuple[int, int, int], int, int]]]:
        """Step 2; returns the server time the handles changed (for the drops' deadline) and
        the handles whose last write found the cluster full: ``((pool, oid, index), key,
        take time)``."""
        if not cmds:
            return 0, []
        try:
            self.pages.run(cmds, durable=True)
        except ClusterUnavailable:
            self._stale.add(guest_id)
            raise
        since = 0
        fenced = None
        last: dict[tuple[bytes, bytes], Cmd] = {}
        for cmd in cmds:
            reply = cmd.result
            last[(cmd.args[8], cmd.args[9])] = cmd
            if is_oom(reply) and cmd.args[7] == b"p":
                continue
            if isinstance(reply, Exception):
                self._stale.add(guest_id)
                raise ClusterUnavailable(f"writing a handle failed: {reply}") from reply
            code, value = int(reply[0]), int(reply[1])
            if code == -1:
                fenced = value
            elif code == -2:  # the takes are older than the grace: not used (the collector
                self._stale.add(guest_id)  # reclaims them)
                raise ClusterUnavailable("the cluster answered too slowly; retry")
            else:
                since = max(since, value)
        if fenced is not None:
            epoch = self.epochs.get(guest_id, 0)
            self.release(guest_id)
            raise Fenced(guest_id, epoch, fenced)
        full = []
        for (member, field), cmd in last.items():
            if cmd.args[7] == b"p" and is_oom(cmd.result):
                handle = self.pages.handle_of(member, field)
                value, taken = cmd.args[10], cmd.args[11]
                full.append((handle, key_of(value) if value else ZERO_KEY, int(taken or 0)))
        return since, full

    @staticmethod
    def _refused_takes(cmds: list[Cmd]) -> list[tuple[int, int]]:
        """The references taken for handle writes the fence refused: ``(key, take time)``."""
        out = []
        for cmd in cmds:
            reply = cmd.result
            op, value, taken = cmd.args[7], cmd.args[10], cmd.args[11]
            if op == b"p" and value and not isinstance(reply, Exception) and int(reply[0]) == -1:
                out.append((key_of(value), int(taken)))
        return out

    def _drop(self, drops: list[tuple[int, int]]) -> None:
        """Step 3: best effort (a drop lost leaks a reference, which the collector takes)."""
        if not drops:
            return
        cmds = [self.pages.drop_cmd(key, since) for key, since in drops]
        try:
            self.pages.run(cmds, durable=False)
        except ClusterUnavailable as exc:
            log.warning(
                "%d reference drops not confirmed (leaks for the collector): %s", len(cmds), exc
            )

    # ---------------------------------------------------------------- pools and pages

    def create_pool(self, guest_id: int, kind: str, **kwargs: Any) -> int:
        pool_id = super().create_pool(guest_id, kind, **kwargs)
        pool = self._reg.pool(guest_id, pool_id)[1]
        if pool.persistent:
            pool.domain_bits = pool.domain.bits | IN_REDIS
        return pool_id

    def _move_domain(self, g: Guest, domain: Domain) -> None:
        if any(p.persistent and p.pages for p in g.pools.values()):
            raise BadRequest(
                "cluster mode cannot move a guest with persistent pages to another domain"
            )
        super()._move_domain(g, domain)
        for pool in g.pools.values():
            if pool.persistent:
                pool.domain_bits = domain.bits | IN_REDIS

    def batch(
        self, guest_id: int, pool_id: int, ops: Sequence[BatchOp]
    ) -> list[tuple[int, bytes | None]]:
        g, pool = self._reg.pool(guest_id, pool_id)
        if not pool.persistent:
            return super().batch(guest_id, pool_id, ops)
        check_batch(ops)
        takes: list[tuple[int, bytes]] = []
        at: dict[int, int] = {}  # op index -> index into takes
        prefetch = []
        for i, (op, oid, index, page) in enumerate(ops):
            if op == OP_PUT:
                assert page is not None
                data = bytes(page)
                if data != ZERO_PAGE:
                    at[i] = len(takes)
                    takes.append(
                        (with_tail(self._contents.hash(data) | pool.domain_bits, data), data)
                    )
            elif op == OP_GET:
                obj = pool.objects.get(oid)
                key = None if obj is None else obj.get(index)
                if key is not None and key != ZERO_KEY:
                    prefetch.append(key)

        def call(full: set[int]) -> list[tuple[int, bytes | None]]:
            if not full:
                return Tmem.batch(self, guest_id, pool_id, ops)
            out: list[tuple[int, bytes | None]] = []
            segment: list[BatchOp] = []
            for i, op in enumerate(ops):
                if at.get(i, -1) in full:
                    if segment:
                        out += Tmem.batch(self, guest_id, pool_id, segment)
                        segment = []
                    out.append((self._decline_full(g, pool, pool_id, op[1], op[2]), None))
                else:
                    segment.append(op)
            if segment:
                out += Tmem.batch(self, guest_id, pool_id, segment)
            return out

        def fix(
            out: list[tuple[int, bytes | None]], full: set[tuple[int, int, int]]
        ) -> list[tuple[int, bytes | None]]:
            """The last put at each handle the cluster had no room for is declined."""
            for i in range(len(ops) - 1, -1, -1):
                op, oid, index, _page = ops[i]
                if op == OP_PUT and (pool_id, oid, index) in full:
                    full.discard((pool_id, oid, index))
                    out[i] = (STATUS_CAPACITY, None)
            return out

        result: list[tuple[int, bytes | None]] = self._around(guest_id, takes, call, prefetch, fix)
        return result

    def _decline_full(self, g: Guest, pool: Pool, pool_id: int, oid: int, index: int) -> int:
        """A put the cluster has no room for: declined ``capacity``, the old copy flushed (as
        every declined put does; Tmem._put's decline path)."""
        pool.puts += 1
        g.puts += 1
        if self._table.take(pool, oid, index) is not None:
            self.handles.record_flush(g.guest_id, pool_id, oid, index)
        pool.declined_capacity += 1
        g.declined_capacity += 1
        return STATUS_CAPACITY

    def put(
        self, guest_id: int, pool_id: int, oid: int, index: int, data: bytes | memoryview
    ) -> int:
        _g, pool = self._reg.pool(guest_id, pool_id)
        if not pool.persistent:
            return super().put(guest_id, pool_id, oid, index, data)
        if len(data) != PAGE_SIZE:
            raise BadPageSize(f"a page is {PAGE_SIZE} bytes, not {len(data)}")
        check_handle(oid, index)
        return self.batch(guest_id, pool_id, [(OP_PUT, oid, index, data)])[0][0]

    def get(self, guest_id: int, pool_id: int, oid: int, index: int) -> bytes | None:
        _g, pool = self._reg.pool(guest_id, pool_id)
        if not pool.persistent:
            return super().get(guest_id, pool_id, oid, index)
        check_handle(oid, index)
        if not pool.exclusive_gets:  # a plain read changes nothing in Redis
            self._home(guest_id)
            return super().get(guest_id, pool_id, oid, index)
        status, page = self.batch(guest_id, pool_id, [(OP_GET, oid, index, None)])[0]
        return page if status == STATUS_DONE else None

    def flush_page(self, guest_id: int, pool_id: int, oid: int, index: int) -> bool:
        _g, pool = self._reg.pool(guest_id, pool_id)
        if not pool.persistent:
            return super().flush_page(guest_id, pool_id, oid, index)
        found: bool = self._around(
            guest_id, (), lambda _f: Tmem.flush_page(self, guest_id, pool_id, oid, index)
        )
        return found

    def flush_object(self, guest_id: int, pool_id: int, oid: int) -> int:
        _g, pool = self._reg.pool(guest_id, pool_id)
        if not pool.persistent:
            return super().flush_object(guest_id, pool_id, oid)
        n: int = self._around(
            guest_id, (), lambda _f: Tmem.flush_object(self, guest_id, pool_id, oid)
        )
        return n

    def _flush_object(self, g: Guest, pool: Pool, pool_id: int, oid: int) -> int:
        if pool.persistent:  # note the object's handle hashes for the journal
            obj = pool.objects.get(oid, ())
            self.handles.buckets[(g.guest_id, pool_id, oid)] = {i >> BUCKET_BITS for i in obj}
        try:
            return super()._flush_object(g, pool, pool_id, oid)
        finally:
            self.handles.buckets.pop((g.guest_id, pool_id, oid), None)

    def _snapshot(self, g: Guest, pool_ids: Iterable[int]) -> bool:
        """Note the objects of the guest's persistent pools about to go (for the journal)."""
        any_ = False
        for pool_id in pool_ids:
            pool = g.pools.get(pool_id)
            if pool is not None and pool.persistent and pool.objects:
                self.handles.snapshot[(g.guest_id, pool_id)] = [
                    (oid, {i >> BUCKET_BITS for i in obj}) for oid, obj in pool.objects.items()
                ]
                any_ = True
        return any_

    def _with_snapshot(self, guest_id: int, pool_ids: Iterable[int], fn: Callable[[], Any]) -> Any:
        g = self._reg.guest(guest_id)
        if not self._snapshot(g, pool_ids):
            return self._local(fn) if guest_id not in self.epochs else fn()
        try:
            return self._around(guest_id, (), lambda _f: fn())
        finally:
            self.handles.snapshot.clear()

    def destroy_pool(self, guest_id: int, pool_id: int) -> None:
        self._with_snapshot(
            guest_id, (pool_id,), lambda: Tmem.destroy_pool(self, guest_id, pool_id)
        )

    def flush_guest(self, guest_id: int) -> int:
        g = self._reg.guest(guest_id)
        n: int = self._with_snapshot(
            guest_id, list(g.pools), lambda: Tmem.flush_guest(self, guest_id)
        )
        return n

    def remove_guest(self, guest_id: int) -> None:
        g = self._reg.guest(guest_id)
        self._with_snapshot(guest_id, list(g.pools), lambda: Tmem.remove_guest(self, guest_id))
        self.epochs.pop(guest_id, None)
        self._stale.discard(guest_id)

    def restore_pages(
        self, guest_id: int, pool_id: int, pages: Iterable[tuple[int, int, bytes]]
    ) -> int:
        """Put persistent pages at their handles (an import): no quota, capacity or frozen
        check. The references and handles go to Redis like a put's."""
        g, pool = self._reg.pool(guest_id, pool_id)
        if not pool.persistent:
            raise BadRequest("restore is for persistent pools")
        items = []
        for oid, index, data in pages:
            if len(data) != PAGE_SIZE:
                raise BadPageSize(f"a page is {PAGE_SIZE} bytes, not {len(data)}")
            check_handle(oid, index)
            items.append((oid, index, bytes(data)))
        takes = [
            (with_tail(self._contents.hash(d) | pool.domain_bits, d), d)
            for _o, _i, d in items
            if d != ZERO_PAGE
        ]

        def call(full: set[int]) -> int:
            if full:
                raise ClusterUnavailable("the cluster is full: the import is not done")
            cc = self._contents
            for oid, index, data in items:
                self._table.take(pool, oid, index)
                if data == ZERO_PAGE:
                    self._table.place(pool, oid, index, ZERO_KEY, 0)
                else:
                    base = cc.hash(data) | pool.domain_bits
                    key = cc.prepared[base].popleft() & ~HIT
                    self._table.place(pool, oid, index, key, PAGE_SIZE)
                self.handles.record_put(g.guest_id, pool_id, oid, index, data)
            return len(items)

        n: int = self._around(guest_id, takes, call)
        return n

    def restore_page(self, guest_id: int, pool_id: int, oid: int, index: int, data: bytes) -> None:
        self.restore_pages(guest_id, pool_id, ((oid, index, data),))


def open_cluster_engine(settings: Any, broker_id: str) -> ClusterEngine:
    """The engine for a broker in cluster mode, from ``settings.cluster`` (``host:port``
    seeds, or one comma-separated string) and the usual core settings. Optional settings:
    ``cluster_namespace`` (key prefix, default ``tmem``), ``cluster_wait_ms`` (how long a
    durable write waits for a replica, default 500), ``cluster_timeout_ms`` (how long a node
    may send nothing before it is marked down, default ``cluster_wait_ms`` + 500) and
    ``cluster_grace_s`` (the collector's grace, default 60)."""
    seeds = settings.cluster
    if isinstance(seeds, str):
        seeds = [s for s in seeds.split(",") if s]
    timeout_ms = getattr(settings, "cluster_timeout_ms", None)
    pages = RedisPages(
        list(seeds),
        getattr(settings, "cluster_namespace", "tmem"),
        wait_ms=int(getattr(settings, "cluster_wait_ms", 500)),
        grace_s=int(getattr(settings, "cluster_grace_s", 60)),
        socket_timeout=None if timeout_ms is None else timeout_ms / 1000,
    )
    config = CoreConfig(
        capacity_bytes=settings.capacity_bytes,
        compress_default=getattr(settings, "compress", "never"),
        max_pools_per_guest=getattr(settings, "max_pools_per_guest", 16),
    )
    return ClusterEngine(config, pages, broker_id)


__all__ = ["ClusterEngine", "open_cluster_engine"]
