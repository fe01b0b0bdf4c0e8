"""Backends a simulated guest runs against (see :class:`guest_agent.sim.model.GuestBackend`).

:class:`MemoryBroker` + :class:`MemoryBackend` are an in-memory twin of a broker and a guest's
agent, faithful to the contract where the simulator can observe it: persistent frontswap pages
are never dropped and loads are non-destructive, private cleancache gets are exclusive, a
declined put leaves nothing behind, identical contents are stored once, zero pages take no
storage, and ephemeral pages are evicted (least recently put first) before a put is declined
for capacity. Unit tests use it; ``tmem-agent simulate`` uses :class:`AgentBackend` (in
:mod:`guest_agent.sim.agent`), which drives the real agent shims against a real broker.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from schemas.batch import PAGE_SIZE

from .images import ZERO_PAGE
from .model import SwapSource

_Key = tuple[int, str, int, int]  # guest, "swap"|"cache", oid, index


@dataclass
class _GuestState:
    cap_pages: int | None
    persistent_pages: int = 0
    frozen: bool = False
    sheds: list[int] = field(default_factory=list)


class MemoryBroker:
    """A broker in a dict: exact dedup, a capacity in pages, per-guest persistent caps."""

    def __init__(self, capacity_pages: int = 1 << 30) -> None:
        self.capacity_pages = capacity_pages
        self._pages: dict[_Key, bytes] = {}
        self._ephemeral: OrderedDict[_Key, None] = OrderedDict()
        self._refs: dict[bytes, int] = {}
        self._guests: dict[int, _GuestState] = {}
        self.zero_pages = 0
        self.puts = 0
        self.evictions = 0

    def add_guest(self, guest_id: int, *, cap_pages: int | None = None) -> None:
        self._guests[guest_id] = _GuestState(cap_pages)
        self._guests.setdefault(0, _GuestState(None))  # owner of the shared pools

    def request_shed(self, guest_id: int, pages: int) -> None:
        """Queue a shed notice: the guest should return ``pages`` persistent pages."""
        self._guests[guest_id].sheds.append(pages)

    def take_sheds(self, guest_id: int) -> list[int]:
        """The pending shed requests of a guest (each a page count), now answered."""
        state = self._guests[guest_id]
        out, state.sheds = state.sheds, []
        return out

    # -- page storage ---------------------------------------------------------------------

    def _drop(self, key: _Key) -> None:
        data = self._pages.pop(key, None)
        if data is None:
            return
        self._ephemeral.pop(key, None)
        if key[1] == "swap":
            self._guests[key[0]].persistent_pages -= 1
        if data == ZERO_PAGE:
            self.zero_pages -= 1
            return
        n = self._refs[data] - 1
        if n:
            self._refs[data] = n
        else:
            del self._refs[data]

    def put(self, key: _Key, data: bytes) -> str | None:
        """Store ``data`` at ``key``; the decline reason, or ``None`` when stored."""
        if len(data) != PAGE_SIZE:
            raise ValueError("a page is exactly 4096 bytes")
        self.puts += 1
        self._drop(key)  # a put replaces, and a declined put leaves nothing
        guest = self._guests[key[0]]
        persistent = key[1] == "swap"
        if guest.frozen:
            return "frozen"
        if persistent and guest.cap_pages is not None and guest.persistent_pages >= guest.cap_pages:
            return "quota"
        is_zero = data == ZERO_PAGE
        if not is_zero and data not in self._refs:
            while len(self._refs) >= self.capacity_pages and self._ephemeral:
                victim, _ = self._ephemeral.popitem(last=False)
                self._drop(victim)
                self.evictions += 1
            if len(self._refs) >= self.capacity_pages:
                return "capacity"
        self._pages[key] = data
        if persistent:
            guest.persistent_pages += 1
        else:
            self._ephemeral[key] = None
        if is_zero:
            self.zero_pages += 1
        else:
            self._refs[data] = self._refs.get(data, 0) + 1
        return None

    def get(self, key: _Key, *, exclusive: bool) -> bytes | None:
        data = self._pages.get(key)
        if data is not None and exclusive:
            self._drop(key)
        return data

    def flush(self, key: _Key) -> None:
        self._drop(key)

    def stats(self) -> dict[str, Any]:
        """The figures of ``GET /v1/stats`` the simulator reads."""
        logical = len(self._pages)
        unique = len(self._refs)
        return {
            "logical_pages": logical,
            "unique_pages": unique,
            "zero_pages": self.zero_pages,
            "used_bytes": unique * PAGE_SIZE,
            "dedup_ratio": (logical / unique) if unique else 1.0,
            "puts": self.puts,
            "evictions": self.evictions,
        }

    def keys(self, guest_id: int) -> list[_Key]:
        return [k for k in self._pages if k[0] == guest_id]


class MemoryBackend:
    """One guest's frontswap + cleancache against a :class:`MemoryBroker`, with a fallback
    swap "file" (a dict) for declined stores."""

    def __init__(self, broker: MemoryBroker, guest_id: int, *, shared: str | None = None) -> None:
        self.broker = broker
        self.guest_id = guest_id
        self.fallback: dict[int, bytes] = {}
        # cleancache: a private pool of this guest, or the shared pool ``shared`` (guest 0 in
        # the key stands for "every guest authorised for it"; gets are not exclusive)
        self._cache_owner, self._cache_kind = (
            (0, f"shared:{shared}")
            if shared
            else (
                guest_id,
                "cache",
            )
        )

    def swap_store(self, items: Sequence[tuple[int, bytes]]) -> list[str | None]:
        out: list[str | None] = []
        for offset, data in items:
            reason = self.broker.put((self.guest_id, "swap", offset, 0), data)
            if reason is None:
                self.fallback.pop(offset, None)
            else:
                self.fallback[offset] = data
            out.append(reason)
        return out

    def swap_load(self, offsets: Sequence[int]) -> list[tuple[SwapSource, bytes | None]]:
        out: list[tuple[SwapSource, bytes | None]] = []
        for offset in offsets:
            data = self.broker.get((self.guest_id, "swap", offset, 0), exclusive=False)
            if data is not None:
                out.append(("tmem", data))
            elif offset in self.fallback:
                out.append(("disk", self.fallback[offset]))
            else:
                out.append(("miss", None))
        return out

    def swap_invalidate(self, offsets: Sequence[int]) -> None:
        for offset in offsets:
            self.broker.flush((self.guest_id, "swap", offset, 0))
            self.fallback.pop(offset, None)

    def swap_at_broker(self, offsets: Sequence[int]) -> list[bool]:
        keys = self.broker._pages
        return [(self.guest_id, "swap", o, 0) in keys for o in offsets]

    def shed(self, pages: int) -> int:
        """Move up to ``pages`` broker-held swap pages (lowest offsets first) to the fallback."""
        held = sorted(k[2] for k in self.broker.keys(self.guest_id) if k[1] == "swap")
        moved = 0
        for offset in held[:pages]:
            data = self.broker.get((self.guest_id, "swap", offset, 0), exclusive=False)
            assert data is not None
            self.fallback[offset] = data
            self.broker.flush((self.guest_id, "swap", offset, 0))
            moved += 1
        return moved

    def cache_put(self, items: Sequence[tuple[int, int, bytes]]) -> list[str | None]:
        owner, kind = self._cache_owner, self._cache_kind
        return [self.broker.put((owner, kind, inode, index), data) for inode, index, data in items]

    def cache_get(self, keys: Sequence[tuple[int, int]]) -> list[bytes | None]:
        owner, kind = self._cache_owner, self._cache_kind
        exclusive = kind == "cache"
        return [
            self.broker.get((owner, kind, inode, index), exclusive=exclusive)
            for inode, index in keys
        ]
