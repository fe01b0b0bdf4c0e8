"""The Redis side of the data plane: names, content refs, and pipelines per node.

Names (``ns`` is the deployment's namespace, so several can share a cluster)::

    ns:c{<first 8 bytes of ref, hex>}<rest of ref>   a content (lua.py: header | body)
    ns:{g<guest>}:epoch                              the guest's fence (epoch of its home)
    ns:{g<guest>}:objs                               set of the guest's handle hashes
    ns:{g<guest>}:o:<pool>:<oid>:<index >> 7>        hash index & 127 (1 byte) -> content ref
    ns:n{<2 bytes>}                                  contents in that tag's slot (one a slot)

A content *ref* (45 bytes) is ``digest (16) | domain (4) | k (1) | tail (24)``: the xxh3_128
digest and dedup domain the core already uses, the collision number, and the page's last 24
bytes. Every key of one guest shares the tag ``{g<guest>}``, so one script writes a handle
atomically with the fence check. A handle map is a hash per 128 indexes of an object, so it
stays listpack-encoded (tens of bytes a handle, see bench/scale_bench.py).

:class:`RedisPages` sends commands grouped by the master that serves their slot, one pipeline
per node, ending with ``WAIT 1 <ms>`` when the change must be durable: each master runs with
``appendfsync always`` (its reply means its AOF was fsynced), and WAIT on the same connection
says a replica has it too. A node answering WAIT with 0 makes the whole call fail with
:class:`~broker.cluster.errors.ClusterUnavailable`: never an acknowledgement.

A master that dies must not stall the broker (its calls run on the event loop): a node that
refuses a connection (or resets it), or hangs (no answer within ``socket_timeout``, the WAIT's
deadline + 0.5 s), is marked *down* for ``DOWN_S``, the slot map is refreshed
at once (at most every ``REFRESH_S``), and until the map moves its slots elsewhere a call
routed to it fails at once with ``ClusterUnavailable`` (503 + Retry-After: puts in the gap are
declined, never acknowledged) while a read of a content goes to the master's replica, which
holds every acknowledged page (``WAIT 1``). The per-node clients do not retry by themselves:
redis-py's default (10 retries, jittered backoff) held every call to a dead node ~4.1 s on
this machine, the stall that made the failover outage 4.1-6.1 s (bench/README.md).
"""

from __future__ import annotations

import contextlib
import functools
import time
from binascii import crc_hqx
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.retry import Retry

from broker.cluster.errors import ClusterUnavailable
from broker.cluster.lua import SCRIPTS
from schemas.batch import PAGE_SIZE

HEADER: Final = 8
TAIL: Final = 24
BODY: Final = PAGE_SIZE - TAIL  # 4072: value = header + body = 4080 bytes
REF_LEN: Final = 16 + 4 + 1 + TAIL
# Handles per hash: Redis keeps a hash of up to 128 entries (hash-max-listpack-entries) as a
# listpack, about 50 bytes a handle here, against about 110 as a hashtable (bench/scale_bench).
BUCKET_BITS: Final = 7
BUCKET_MASK: Final = (1 << BUCKET_BITS) - 1
CANDIDATES: Final = 4  # collision numbers tried per digest (xxh3_128 + 24 bytes: never > 1)

# A content key of the core (an int) that lives in Redis: digest | domain << 128 | k << 160 |
# IN_REDIS | tail << 192. The flag keeps it apart from the local contents of ephemeral pages.
IN_REDIS: Final = 1 << 191
_M128: Final = (1 << 128) - 1
_M32: Final = (1 << 32) - 1

# How long a node that failed a connection is skipped, and the least time between two slot map
# refreshes caused by such failures (a refresh asks the live nodes; ~1-3 ms here).
DOWN_S: Final = 0.5
REFRESH_S: Final = 0.1

_NOT_RUN = (MovedError, TryAgainError, ClusterDownError, MasterDownError, BusyLoadingError)
_PENDING: Final[Any] = object()


SLOTS: Final = 16384


@functools.cache
def slot_tags() -> tuple[bytes, ...]:
    """A 2-byte hash tag for every slot: ``slot_tags()[s]`` hashes to slot ``s`` (Redis's
    CRC16; over 2-byte strings it is a bijection, so every slot has 4, one without ``}``).
    ~60 ms, once a process."""
    tags: dict[int, bytes] = {}
    for i in range(1 << 16):
        tag = i.to_bytes(2, "big")
        if b"}" not in tag:
            tags.setdefault(crc_hqx(tag, 0) % SLOTS, tag)
    return tuple(tags[s] for s in range(SLOTS))


def key_of(ref: bytes) -> int:
    """The core's int content key of a 45-byte ref."""
    digest = int.from_bytes(ref[:16], "big")
    domain = int.from_bytes(ref[16:20], "big")
    k = ref[20]
    return digest | domain << 128 | k << 160 | IN_REDIS | int.from_bytes(ref[21:], "big") << 192


def ref_of(key: int) -> bytes:
    """The 45-byte ref of a content key made by :func:`key_of` or :func:`base_key`."""
    return (
        (key & _M128).to_bytes(16, "big")
        + ((key >> 128) & _M32).to_bytes(4, "big")
        + bytes(((key >> 160) & 0x7F,))
        + (key >> 192).to_bytes(TAIL, "big")
    )


def with_tail(base: int, page: bytes) -> int:
    """``base`` (digest | domain bits | IN_REDIS) plus the page's tail: the key for k = 0."""
    return base | int.from_bytes(page[BODY:], "big") << 192


@dataclass
class Cmd:
    """One command for :meth:`RedisPages.run`: ``args`` routed by ``key``'s slot. ``safe``:
    may be sent again when its fate is unknown (a lost reply), i.e. at worst it leaks a
    reference; a drop is never safe (a second drop would free a content still referred to)."""

    args: tuple[Any, ...]
    key: bytes
    safe: bool = True
    replica_ok: bool = False  # a read a replica may answer while its master is down
    result: Any = _PENDING
    ask: tuple[str, int] | None = None
    attempts: int = field(default=0)
    sent: float = 0.0  # when (monotonic) it was last sent: its effect is no older


class RedisPages:
    """Connections and commands of the data plane for one broker (not thread-safe)."""

    def __init__(
        self,
        seeds: Sequence[str],
        namespace: str = "tmem",
        *,
        wait_ms: int = 500,
        grace_s: int = 60,
        retries: int = 4,
        socket_timeout: float | None = None,
        down_on_timeout: bool = True,
    ) -> None:
        if not seeds:
            raise ValueError("a Redis Cluster needs at least one seed host:port")
        nodes = []
        for seed in seeds:
            host, _, port = seed.removeprefix("redis://").rpartition(":")
            nodes.append(
                ClusterNode(  # type: ignore[no-untyped-call]
                    host or "127.0.0.1", int(port)
                )
            )
        self.ns = namespace.encode()
        self.wait_ms = wait_ms
        self.grace_s = grace_s
        self.retries = retries
        # Past a WAIT's own deadline by 0.5 s (was 2 s, before that 5 s), and a node that
        # times out is marked down like one that refuses (``down_on_timeout``): a hung node
        # (SIGSTOP, a partition) then holds one call ~1 s, not each of its 5 tries 2.5 s (a
        # call held 12.6 s; bench/scale_hang.py, docs/scale-data.md). The timeout is per read,
        # and a live node answers a pipeline in pieces, so a slow one is not taken for hung:
        # no timeout in 256-page durable batches at load 7.6-12 (same bench).
        if socket_timeout is None:
            socket_timeout = wait_ms / 1000 + 0.5
        self.socket_timeout = socket_timeout
        self.down_on_timeout = down_on_timeout
        self.timeouts = 0  # pipelines that timed out (a hung node, or a slow one)
        try:
            # redis-py's cluster client is untyped in places: held as Any
            self.rc: Any = RedisCluster(
                startup_nodes=nodes,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries),
            )
        except redis.RedisError as exc:
            raise ClusterUnavailable(f"no Redis Cluster at {', '.join(seeds)}: {exc}") from exc
        self._clients: dict[tuple[str, int], Any] = {}
        self._down: dict[tuple[str, int], float] = {}  # node -> when it last failed (monotonic)
        self._refreshed = 0.0
        self._no_replica: set[tuple[str, int]] = set()  # masters whose WAIT found no replica
        self.sha = {name: self.rc.script_load(text) for name, text in SCRIPTS.items()}
        slot_tags()  # ~60 ms once, here at the start rather than in the first put
        # sent commands per kind, for the figures (tests and the bench read them)
        self.round_trips = 0

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        self.rc.close()

    # ---------------------------------------------------------------- names

    def content_name(self, ref: bytes) -> bytes:
        return self.ns + b":c{" + ref[:8].hex().encode() + b"}" + ref[8:]

    def count_name(self, content: bytes) -> bytes:
        """The counter of contents in the slot of the content named ``content``."""
        return self.count_of_slot(self.rc.keyslot(content))

    def count_of_slot(self, slot: int) -> bytes:
        return self.ns + b":n{" + slot_tags()[slot] + b"}"

    def guest_tag(self, guest_id: int) -> bytes:
        return self.ns + b":{g%d}" % guest_id

    def epoch_key(self, guest_id: int) -> bytes:
        return self.guest_tag(guest_id) + b":epoch"

    def objs_key(self, guest_id: int) -> bytes:
        return self.guest_tag(guest_id) + b":objs"

    def obj_key(self, guest_id: int, member: bytes) -> bytes:
        return self.guest_tag(guest_id) + b":o:" + member

    @staticmethod
    def member(pool_id: int, oid: int, index: int) -> bytes:
        """The name of the handle hash holding ``index``: one per 128 indexes of an object
        (``BUCKET``), so every hash stays listpack-encoded however large the object."""
        return b"%d:%d:%d" % (pool_id, oid, index >> BUCKET_BITS)

    @staticmethod
    def handle_of(member: bytes, field: bytes) -> tuple[int, int, int]:
        """``(pool, oid, index)`` of a handle hash's name and field."""
        pool, oid, bucket = member.split(b":")
        return int(pool), int(oid), int(bucket) << BUCKET_BITS | field[0]

    # ---------------------------------------------------------------- commands

    def script(self, name: str, keys: Sequence[bytes], args: Sequence[Any], safe: bool) -> Cmd:
        return Cmd(("EVALSHA", self.sha[name], len(keys), *keys, *args), keys[0], safe)

    def take_cmd(self, key: int, page: bytes) -> Cmd:
        """A reference to the content ``page`` at ``key`` (k = 0, tail included), trying the
        collision numbers 0.. ``CANDIDATES``-1."""
        ref = ref_of(key)
        names = [self.content_name(ref[:20] + bytes((k,)) + ref[21:]) for k in range(CANDIDATES)]
        names.append(self.count_name(names[0]))
        return self.script("take", names, (page[:BODY],), safe=True)

    def drop_cmd(self, key: int, since: int) -> Cmd:
        name = self.content_name(ref_of(key))
        keys = (name, self.count_name(name))
        return self.script("drop", keys, (since, self.grace_s // 2), safe=False)

    def handle_cmd(
        self,
        guest_id: int,
        epoch: int,
        op: bytes,
        pool_id: int,
        oid: int,
        index: int = 0,
        value: bytes = b"",
        taken: int | None = None,
    ) -> Cmd:
        member = self.member(pool_id, oid, index)
        keys = (self.epoch_key(guest_id), self.objs_key(guest_id), self.obj_key(guest_id, member))
        args = (
            epoch,
            op,
            member,
            bytes((index & BUCKET_MASK,)),
            value,
            b"" if taken is None else taken,
            self.grace_s // 2,
        )
        return self.script("handle", keys, args, safe=True)

    def get_cmd(self, key: int) -> Cmd:
        name = self.content_name(ref_of(key))
        return Cmd(("GET", name), name, True, replica_ok=True)

    # ---------------------------------------------------------------- running

    def _client(self, host: str, port: int) -> Any:
        client = self._clients.get((host, port))
        if client is None:
            client = self._clients[(host, port)] = redis.Redis(
                host=host,
                port=port,
                socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.socket_timeout,
                retry=Retry(NoBackoff(), 0),  # run() decides what is retried (module doc)
            )
        return client

    def _refresh(self, *, soon: bool = False) -> None:
        """Reload the slot map; ``soon``: skip it if one ran in the last ``REFRESH_S``."""
        now = time.monotonic()
        if soon and now - self._refreshed < REFRESH_S:
            return
        self._refreshed = now
        with contextlib.suppress(redis.RedisError):  # every seed down: the next round tries
            self.rc.nodes_manager.initialize()

    def _is_down(self, addr: tuple[str, int]) -> bool:
        failed = self._down.get(addr)
        if failed is None:
            return False
        if time.monotonic() - failed < DOWN_S:
            return True
        del self._down[addr]  # try it again (a restarted node, or a blip)
        return False

    def _replica(self, cmd: Cmd) -> tuple[str, int] | None:
        """A live replica of the master serving ``cmd``'s slot, from the slot map."""
        slot = self.rc.keyslot(cmd.key)
        for node in self.rc.nodes_manager.slots_cache.get(slot, ())[1:]:
            if not self._is_down((node.host, node.port)):
                return node.host, node.port
        return None

    def _lonely(self, addr: tuple[str, int], cmd: Cmd) -> bool:
        """Whether ``addr`` answered a WAIT with no replica and the slot map still shows none
        for ``cmd``'s slot (Redis lists only live, synced replicas): after a failover the new
        master has none until the old one returns, and each durable write there would hold
        the broker ``wait_ms`` only to be declined. The first one waits; the next are
        declined at once until a refreshed map shows a replica again."""
        if addr not in self._no_replica:
            return False
        if len(self.rc.nodes_manager.slots_cache.get(self.rc.keyslot(cmd.key), ())) > 1:
            self._no_replica.discard(addr)
            return False
        return True

    def _route(self, cmd: Cmd) -> tuple[str, int]:
        if cmd.ask is not None:
            return cmd.ask
        key = cmd.key or cmd.args[1]
        node = self.rc.get_node_from_key(key)
        return node.host, node.port

    def run(self, cmds: Sequence[Cmd], *, durable: bool) -> None:
        """Send ``cmds`` (a pipeline per master, in order within each), retrying those not run
        (MOVED, ASK, TRYAGAIN, a failover) and, when ``safe``, those whose fate is unknown.
        Fills each ``result`` (a value, or the error Redis answered for it, e.g. OOM).
        ``durable``: each pipeline ends with ``WAIT 1``; raises :class:`ClusterUnavailable`
        when a node does not confirm a replica (or commands stay unsent after the retries)."""
        wait = rechecked = False
        for attempt in range(self.retries + 1):
            pending = [c for c in cmds if c.result is _PENDING]
            if not pending:
                return
            if wait:  # MOVED, TRYAGAIN, CLUSTERDOWN...: give the cluster a moment
                time.sleep(min(0.05 * 2**attempt, 1.0))
            groups: dict[tuple[str, int], list[Cmd]] = {}
            reads: dict[tuple[str, int], list[Cmd]] = {}
            stuck = False  # commands for a down master, no replica to read from
            try:
                for c in pending:
                    addr = self._route(c)
                    if durable and self._lonely(addr, c):
                        stuck = True  # WAIT 1 would time out again: decline at once
                    elif not self._is_down(addr):
                        groups.setdefault(addr, []).append(c)
                        continue
                    replica = self._replica(c) if c.replica_ok else None
                    if replica is None:
                        stuck = True
                    else:
                        reads.setdefault(replica, []).append(c)
            except redis.RedisError:
                self._refresh()
                wait = True
                continue
            if stuck:  # fail now (retrying a dead node would hold the event loop) unless a
                if rechecked:  # fresh slot map shows a promoted replica, or a replica back
                    break
                rechecked = True
                self._refresh(soon=True)
                continue
            wait = lost = False
            for addr, group in groups.items():
                moved, gone = self._run_group(addr, group, durable)
                wait |= moved
                lost |= gone
            for addr, group in reads.items():
                self._read_replica(addr, group)
            if wait or lost:
                self._refresh(soon=not wait)
        left = [c for c in cmds if c.result is _PENDING]
        if left:
            raise ClusterUnavailable(f"{len(left)} Redis commands could not be sent")

    def _execute(self, addr: tuple[str, int], pipe: Any) -> list[Any] | None:
        """The replies of ``pipe`` sent to ``addr``; None when the node did not answer. Refused
        or reset: the node is gone (marked down). Timed out (no byte for ``socket_timeout``):
        hung, marked down too (``down_on_timeout``), so its slots' writes are declined and
        their reads go to the replica until the map moves them or ``DOWN_S`` passes; with it
        off, the node was retried, each try holding the call the whole timeout."""
        self.round_trips += 1
        try:
            replies: list[Any] = pipe.execute(raise_on_error=False)
        except redis.ConnectionError:
            self._down[addr] = time.monotonic()
            return None
        except redis.TimeoutError:
            self.timeouts += 1
            if self.down_on_timeout:
                self._down[addr] = time.monotonic()
            return None
        return replies

    def _read_replica(self, addr: tuple[str, int], group: list[Cmd]) -> None:
        """Reads (``replica_ok``) sent to a replica while their master is down."""
        pipe = self._client(*addr).pipeline(transaction=False)
        pipe.execute_command("READONLY")
        for c in group:
            pipe.execute_command(*c.args)
        replies = self._execute(addr, pipe)
        if replies is None:
            return
        for c, reply in zip(group, replies[1:], strict=True):
            if not isinstance(reply, (*_NOT_RUN, ReadOnlyError, AskError)):
                c.result = reply

    def _run_group(
        self, addr: tuple[str, int], group: list[Cmd], durable: bool
    ) -> tuple[bool, bool]:
        """One pipeline to one node: (whether the slot map moved, whether the node is down)."""
        pipe = self._client(*addr).pipeline(transaction=False)
        sent = time.monotonic()
        for c in group:
            if c.ask is not None:
                pipe.execute_command("ASKING")
            pipe.execute_command(*c.args)
            c.sent = sent
        if durable:
            pipe.execute_command("WAIT", 1, self.wait_ms)
        replies = self._execute(addr, pipe)
        if replies is None:
            for c in group:
                c.ask = None
                if not c.safe:  # it may have run: never send a drop twice
                    c.result = ClusterUnavailable(f"node {addr} went away during a drop")
            return False, self._is_down(addr)
        refresh = False
        ran = False
        it = iter(replies)
        for c in group:
            if c.ask is not None:
                next(it)  # ASKING's OK
                c.ask = None
            reply = next(it)
            if isinstance(reply, AskError):
                c.ask = (reply.host, reply.port)
            elif isinstance(reply, (*_NOT_RUN, ReadOnlyError)):
                refresh = True
            elif isinstance(reply, NoScriptError):
                self._client(*addr).script_load(SCRIPTS[self._script_name(c.args[1])])
            else:
                c.result = reply
                ran = True
        if durable and ran:  # (a node that ran nothing, e.g. all MOVED, has nothing to confirm)
            acked = next(it)
            if isinstance(acked, ResponseError) or int(acked) < 1:
                self._no_replica.add(addr)
                if refresh:
                    self._refresh()
                raise ClusterUnavailable(f"no replica of {addr[0]}:{addr[1]} confirmed in time")
        return refresh, False

    def _script_name(self, sha: Any) -> str:
        for name, known in self.sha.items():
            if known == sha:
                return name
        raise KeyError(sha)

    # ---------------------------------------------------------------- reads

    def get_many(self, keys: Iterable[int]) -> dict[int, bytes | None]:
        """The raw pages of content keys (None: missing), one pipeline per node."""
        keys = list(dict.fromkeys(keys))
        cmds = [self.get_cmd(k) for k in keys]
        self.run(cmds, durable=False)
        out: dict[int, bytes | None] = {}
        for k, c in zip(keys, cmds, strict=True):
            value = c.result
            if isinstance(value, Exception):
                raise ClusterUnavailable(f"reading a page failed: {value}") from value
            out[k] = None if value is None else bytes(value[HEADER:]) + ref_of(k)[21:]
        return out

    def count_contents(self) -> int:
        """The namespace's contents in the whole cluster: the per-slot counters the scripts
        keep, summed by one read-only script per master (``lua.COUNT``: ~50 ms here; a GET per
        slot through :meth:`run` took 350-700 ms). A dead master's replica answers for it."""
        by_node: dict[tuple[str, int], list[bytes]] = {}
        cache = self.rc.nodes_manager.slots_cache
        for slot in range(SLOTS):
            nodes = cache.get(slot)
            if nodes:
                by_node.setdefault((nodes[0].host, nodes[0].port), []).append(
                    self.count_of_slot(slot)
                )
        sha = self.sha["count"]
        cmds = [Cmd(("EVALSHA", sha, 1, *ks), ks[0], replica_ok=True) for ks in by_node.values()]
        self.run(cmds, durable=False)
        total = 0
        for c in cmds:
            if isinstance(c.result, Exception):
                raise ClusterUnavailable(f"counting the contents failed: {c.result}")
            total += int(c.result)
        return total

    def handles(self, guest_id: int) -> list[tuple[int, int, int, bytes]]:
        """Every persistent handle of the guest: ``(pool, oid, index, ref)``; ref ``b''`` is
        the zero page."""
        try:
            members = self.rc.smembers(self.objs_key(guest_id))
            out: list[tuple[int, int, int, bytes]] = []
            for member in sorted(members):
                entries = self.rc.hgetall(self.obj_key(guest_id, member))
                for field_, value in entries.items():
                    out.append((*self.handle_of(member, field_), value))
            return out
        except redis.RedisError as exc:
            raise ClusterUnavailable(f"reading guest {guest_id}'s handles failed: {exc}") from exc

    def adopt(self, guest_id: int, epoch: int) -> tuple[bool, int]:
        """Raise the guest's fence to ``epoch`` (durably); ``(done, fence now)``."""
        cmd = self.script("adopt", (self.epoch_key(guest_id),), (epoch,), safe=True)
        self.run([cmd], durable=True)
        if isinstance(cmd.result, Exception):
            raise ClusterUnavailable(f"setting the fence failed: {cmd.result}") from cmd.result
        done, fence = cmd.result
        return bool(done), int(fence)


def is_oom(reply: Any) -> bool:
    """Whether a command's reply says the cluster is full (maxmemory reached)."""
    return isinstance(reply, OutOfMemoryError) or (
        isinstance(reply, ResponseError) and "OOM" in str(reply)
    )
