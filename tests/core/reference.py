"""A plain, slow reference model of the tmem rules, written independently of the core.

Everything is recomputed by scanning: which contents are live, how many bytes they hold, which
account to evict from. The stateful test runs the core and this model side by side and
compares every answer and every counter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lz4.block

PAGE = 4096
ZERO = bytes(PAGE)
DECLINES = ("quota", "capacity", "frozen", "policy")
OPS = (
    "puts",
    "gets",
    "get_hits",
    "flushes",
    "flushes_found",
    "object_flushes",
    "evictions",
    "compress_poor",
    "dedup_hits",
)


def lz4_len(page: bytes) -> int:
    return len(lz4.block.compress(page, store_size=False))


@dataclass
class MAccount:
    serial: int
    weight: int
    lru: list[tuple[int, int, int]] = field(default_factory=list)  # (pool uid, oid, index)


@dataclass
class MPool:
    uid: int
    persistent: bool
    shared: bool
    uuid: str | None
    exclusive_gets: bool
    domain: str
    owner: int | None
    account: MAccount | None
    pages: dict[tuple[int, int], tuple[bytes, int]] = field(
        default_factory=dict
    )  # -> (page, charge)
    members: dict[int, int] = field(default_factory=dict)


@dataclass
class MGuest:
    gid: int
    weight: int
    cap: int | None
    compress: bool
    frozen: bool
    domain: str
    account: MAccount
    pools: dict[int, MPool] = field(default_factory=dict)
    ops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OPS, 0))
    declined: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DECLINES, 0))


class Model:
    def __init__(self, capacity: int, max_pools: int, compress_max: int) -> None:
        self.capacity = capacity
        self.max_pools = max_pools
        self.compress_max = compress_max
        self.guests: dict[int, MGuest] = {}
        self.shared: dict[str, MPool] = {}
        self.auth: set[tuple[str, int]] = set()
        self.serial = 0
        self.uid = 0
        self.retired_ops = dict.fromkeys(OPS, 0)
        self.retired_declined = dict.fromkeys(DECLINES, 0)
        self.evictions = 0
        # stored size of each live content (domain, page): the smallest charge of any page
        # that referred to it while it lived (a raw copy gives way to a sharer's lz4 block)
        self.sizes: dict[tuple[str, bytes], int] = {}

    # -- helpers
    def all_pools(self) -> list[MPool]:
        seen: dict[int, MPool] = {}
        for g in self.guests.values():
            for p in g.pools.values():
                seen[p.uid] = p
        return list(seen.values())

    def live_contents(self) -> set[tuple[str, bytes]]:
        return {
            (p.domain, page)
            for p in self.all_pools()
            for page, _ in p.pages.values()
            if page != ZERO
        }

    def collect(self) -> None:
        live = self.live_contents()
        for key in list(self.sizes):
            if key not in live:
                del self.sizes[key]

    def used(self) -> int:
        self.collect()
        return sum(self.sizes.values())

    def charged(self) -> int:
        return sum(c for p in self.all_pools() for _, c in p.pages.values())

    def level(self) -> int:
        """What capacity decisions compare: charges, never what sharing saved (the bytes
        held are never more: see self.sizes)."""
        return self.charged()

    def accounts(self) -> list[MAccount]:
        accts = [g.account for g in self.guests.values()]
        accts += [p.account for p in self.shared.values() if p.account is not None]
        return sorted(accts, key=lambda a: a.serial)

    def new_account(self, weight: int) -> MAccount:
        self.serial += 1
        return MAccount(self.serial, weight)

    def pool_by_uid(self, uid: int) -> MPool:
        return next(p for p in self.all_pools() if p.uid == uid)

    def remove_page(self, pool: MPool, oid: int, index: int) -> None:
        del pool.pages[(oid, index)]
        if pool.account is not None:
            pool.account.lru.remove((pool.uid, oid, index))

    def evict_one(self) -> bool:
        best = None
        for acct in self.accounts():
            n = len(acct.lru)
            if n and (best is None or n * best.weight > len(best.lru) * acct.weight):
                best = acct
        if best is None:
            return False
        uid, oid, index = best.lru[0]
        pool = self.pool_by_uid(uid)
        self.remove_page(pool, oid, index)
        self.evictions += 1
        if pool.owner is not None:
            self.guests[pool.owner].ops["evictions"] += 1
        return True

    def reweigh(self, pool: MPool) -> None:
        assert pool.account is not None
        if pool.members:
            pool.account.weight = max(self.guests[m].weight for m in pool.members)

    # -- operations
    def add_guest(self, gid: int, weight: int, compress: bool, domain: str) -> None:
        self.guests[gid] = MGuest(
            gid, weight, None, compress, False, domain, self.new_account(weight)
        )

    def remove_guest(self, gid: int) -> None:
        g = self.guests[gid]
        for pid in list(g.pools):
            self.destroy_pool(gid, pid)
        for k in OPS:
            self.retired_ops[k] += g.ops[k]
        for k in DECLINES:
            self.retired_declined[k] += g.declined[k]
        del self.guests[gid]
        self.auth = {(u, x) for (u, x) in self.auth if x != gid}

    def create_pool(
        self, gid: int, kind: str, shared: bool, uuid: str | None, exclusive: bool = False
    ) -> int | str:
        g = self.guests[gid]
        if shared:
            assert uuid is not None
            if (uuid, gid) not in self.auth:
                return "not_authorised"
            pool = self.shared.get(uuid)
            if pool is not None and gid in pool.members:
                return pool.members[gid]
        free = [i for i in range(self.max_pools) if i not in g.pools]
        if not free:
            return "too_many_pools"
        pid = free[0]
        self.uid += 1
        if shared:
            assert uuid is not None
            if pool is None:
                pool = MPool(
                    self.uid, False, True, uuid, False, g.domain, None, self.new_account(g.weight)
                )
                self.shared[uuid] = pool
            pool.members[gid] = pid
            g.pools[pid] = pool
            self.reweigh(pool)
        else:
            persistent = kind == "persistent"
            g.pools[pid] = MPool(
                self.uid,
                persistent,
                False,
                None,
                exclusive,
                g.domain,
                gid,
                None if persistent else g.account,
            )
        return pid

    def destroy_pool(self, gid: int, pid: int) -> None:
        g = self.guests[gid]
        pool = g.pools.pop(pid, None)
        if pool is None:
            return
        if pool.shared:
            del pool.members[gid]
            if pool.members:
                self.reweigh(pool)
                return
            assert pool.uuid is not None
            del self.shared[pool.uuid]
        for oid, index in list(pool.pages):
            self.remove_page(pool, oid, index)

    def charge(self, g: MGuest, page: bytes) -> tuple[int, bool]:
        """(charge, compress_poor)."""
        if page == ZERO:
            return 0, False
        if g.compress:
            n = lz4_len(page)
            return (n, False) if n <= self.compress_max else (PAGE, True)
        return PAGE, False

    def put(self, gid: int, pid: int, oid: int, index: int, page: bytes) -> str:
        g = self.guests[gid]
        pool = g.pools[pid]
        g.ops["puts"] += 1
        if (oid, index) in pool.pages:
            self.remove_page(pool, oid, index)
        if g.frozen:
            reason = "frozen"
        elif pool.persistent and g.cap is not None and self.persistent_pages(g) >= g.cap:
            reason = "quota"
        else:
            charge, poor = self.charge(g, page)
            if poor:
                g.ops["compress_poor"] += 1
            while self.level() + charge > self.capacity:
                if not self.evict_one():
                    break
            if self.level() + charge > self.capacity:
                reason = "capacity"
            else:
                if page != ZERO:
                    key = (pool.domain, page)
                    self.collect()  # contents whose last page went are gone
                    if key in self.sizes:
                        g.ops["dedup_hits"] += 1
                        self.sizes[key] = min(self.sizes[key], charge)
                    else:
                        self.sizes[key] = charge
                pool.pages[(oid, index)] = (page, charge)
                if pool.account is not None:
                    pool.account.lru.append((pool.uid, oid, index))
                return "done"
        g.declined[reason] += 1
        return reason

    def persistent_pages(self, g: MGuest) -> int:
        return sum(len(p.pages) for p in g.pools.values() if p.persistent)

    def get(self, gid: int, pid: int, oid: int, index: int) -> bytes | None:
        g = self.guests[gid]
        pool = g.pools[pid]
        g.ops["gets"] += 1
        hit = pool.pages.get((oid, index))
        if hit is None:
            return None
        g.ops["get_hits"] += 1
        if pool.shared:
            assert pool.account is not None
            pool.account.lru.remove((pool.uid, oid, index))
            pool.account.lru.append((pool.uid, oid, index))
        elif not pool.persistent or pool.exclusive_gets:
            self.remove_page(pool, oid, index)
        return hit[0]

    def flush_page(self, gid: int, pid: int, oid: int, index: int) -> bool:
        g = self.guests[gid]
        pool = g.pools[pid]
        g.ops["flushes"] += 1
        if (oid, index) not in pool.pages:
            return False
        g.ops["flushes_found"] += 1
        self.remove_page(pool, oid, index)
        return True

    def flush_object(self, gid: int, pid: int, oid: int) -> int:
        g = self.guests[gid]
        pool = g.pools[pid]
        g.ops["object_flushes"] += 1
        handles = [h for h in pool.pages if h[0] == oid]
        for o, i in handles:
            self.remove_page(pool, o, i)
        return len(handles)

    def flush_guest(self, gid: int) -> int:
        n = 0
        for pool in self.guests[gid].pools.values():
            if not pool.shared:
                for oid, index in list(pool.pages):
                    self.remove_page(pool, oid, index)
                    n += 1
        return n

    def set_capacity(self, capacity: int) -> None:
        self.capacity = capacity
        while self.level() > self.capacity and self.evict_one():
            pass

    def evict(self, nbytes: int) -> int:
        # counts charges, like every capacity decision (what sharing saved must not show)
        target = self.charged() - nbytes
        n = 0
        while self.charged() > target and self.evict_one():
            n += 1
        return n

    # -- figures
    def guest_figures(self, g: MGuest) -> dict[str, Any]:
        private = [p for p in g.pools.values() if not p.shared]
        pages = [v for p in private for v in p.pages.values()]
        zero = sum(1 for page, _ in pages if page == ZERO)
        charged = sum(c for _, c in pages)
        ops = dict(g.ops)
        return {
            "logical_pages": len(pages),
            "zero_pages": zero,
            "persistent_pages": self.persistent_pages(g),
            "ephemeral_pages": sum(len(p.pages) for p in private if not p.persistent),
            "charged_bytes": charged,
            "frozen": g.frozen,
            "weight": g.weight,
            "cap_pages": g.cap,
            "pools": len(g.pools),
            "puts_declined": dict(g.declined),
            "puts_stored": g.ops["puts"] - sum(g.declined.values()),
            **ops,
        }

    def stats(self) -> dict[str, Any]:
        pools = self.all_pools()
        ops = dict(self.retired_ops)
        declined = dict(self.retired_declined)
        for g in self.guests.values():
            for k in OPS:
                ops[k] += g.ops[k]
            for k in DECLINES:
                declined[k] += g.declined[k]
        ops["evictions"] = self.evictions
        pages = [v for p in pools for v in p.pages.values()]
        return {
            "capacity_bytes": self.capacity,
            "used_bytes": self.used(),
            "charged_bytes": self.charged(),
            "unique_pages": len(self.sizes),
            "logical_pages": len(pages),
            "zero_pages": sum(1 for page, _ in pages if page == ZERO),
            "persistent_pages": sum(len(p.pages) for p in pools if p.persistent),
            "ephemeral_pages": sum(len(p.pages) for p in pools if not p.persistent),
            "puts_declined": declined,
            "puts_stored": ops["puts"] - sum(declined.values()),
            **ops,
        }
