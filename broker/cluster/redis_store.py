"""The Redis side of the data plane: names, content refs, and pipelines per node.

Names (``ns`` is the deployment's namespace, so several can share a cluster)::

    ns:c{<first 8 bytes of ref, hex>}<rest of ref>   a content (lua.py: header | body)
    ns:{g<guest>}:epoch                              the guest's fence (epoch of its home)
    ns:{g<guest>}:objs                               set of the guest's handle hashes
    ns:{g<guest>}:o:<pool>:<oid>:<index >> 7>        hash index & 127 (1 byte) -> content ref

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
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import redis
from redis.backoff import ExponentialBackoff
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

_NOT_RUN = (MovedError, TryAgainError, ClusterDownError, MasterDownError, BusyLoadingError)
_PENDING: Final[Any] = object()


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
    result: Any = _PENDING
    ask: tuple[str, int] | None = None
    attempts: int = field(default=0)


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
        socket_timeout: float = 5.0,
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
        self.socket_timeout = socket_timeout
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
        self.sha = {name: self.rc.script_load(text) for name, text in SCRIPTS.items()}
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
        return self.script("take", names, (page[:BODY],), safe=True)

    def drop_cmd(self, key: int, since: int) -> Cmd:
        return self.script(
            "drop", (self.content_name(ref_of(key)),), (since, self.grace_s // 2), safe=False
        )

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
        return Cmd(("GET", name), name, True)

    # ---------------------------------------------------------------- running

    def _client(self, host: str, port: int) -> Any:
        client = self._clients.get((host, port))
        if client is None:
            client = self._clients[(host, port)] = redis.Redis(
                host=host,
                port=port,
                socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.socket_timeout,
            )
        return client

    def _refresh(self) -> None:
        with contextlib.suppress(redis.RedisError):  # every seed down: the next round tries
            self.rc.nodes_manager.initialize()

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
        for attempt in range(self.retries + 1):
            pending = [c for c in cmds if c.result is _PENDING]
            if not pending:
                return
            if attempt:
                time.sleep(min(0.05 * 2**attempt, 1.0))
            groups: dict[tuple[str, int], list[Cmd]] = {}
            try:
                for c in pending:
                    groups.setdefault(self._route(c), []).append(c)
            except redis.RedisError:
                self._refresh()
                continue
            refresh = False
            for addr, group in groups.items():
                refresh |= self._run_group(addr, group, durable)
            if refresh:
                self._refresh()
        left = [c for c in cmds if c.result is _PENDING]
        if left:
            raise ClusterUnavailable(f"{len(left)} Redis commands could not be sent")

    def _run_group(self, addr: tuple[str, int], group: list[Cmd], durable: bool) -> bool:
        """One pipeline to one node; True when the slot map should be refreshed."""
        pipe = self._client(*addr).pipeline(transaction=False)
        for c in group:
            if c.ask is not None:
                pipe.execute_command("ASKING")
            pipe.execute_command(*c.args)
        if durable:
            pipe.execute_command("WAIT", 1, self.wait_ms)
        self.round_trips += 1
        try:
            replies = pipe.execute(raise_on_error=False)
        except (redis.ConnectionError, redis.TimeoutError):
            for c in group:
                c.ask = None
                if not c.safe:  # it may have run: never send a drop twice
                    c.result = ClusterUnavailable(f"node {addr} went away during a drop")
            return True
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
                if refresh:
                    self._refresh()
                raise ClusterUnavailable(f"no replica of {addr[0]}:{addr[1]} confirmed in time")
        return refresh

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
