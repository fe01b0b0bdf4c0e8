"""Fixtures of the core tests: a broker with two guests, pages and a recording journal."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from broker.core import CoreConfig, Tmem

PAGE = 4096
ZERO = bytes(PAGE)
SHARED_UUID = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"


def page(tag: int) -> bytes:
    """An incompressible page unique to ``tag``."""
    return tag.to_bytes(8, "little") + _NOISE[8:]


def soft_page(tag: int) -> bytes:
    """A page lz4 shrinks a lot, unique to ``tag``."""
    return tag.to_bytes(8, "little") + bytes(PAGE - 8)[:-1] + b"\x01"


_NOISE = os.urandom(PAGE)


class RecordingJournal:
    """Remembers every call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def record_put(self, guest_id: int, pool_id: int, oid: int, index: int, data: bytes) -> None:
        self.calls.append(("put", guest_id, pool_id, oid, index, bytes(data)))

    def record_flush(self, guest_id: int, pool_id: int, oid: int, index: int) -> None:
        self.calls.append(("flush", guest_id, pool_id, oid, index))

    def record_flush_object(self, guest_id: int, pool_id: int, oid: int) -> None:
        self.calls.append(("flush_object", guest_id, pool_id, oid))

    def record_destroy_pool(self, guest_id: int, pool_id: int) -> None:
        self.calls.append(("destroy_pool", guest_id, pool_id))

    def record_remove_guest(self, guest_id: int) -> None:
        self.calls.append(("remove_guest", guest_id))


MakeTmem = Callable[..., Tmem]


@pytest.fixture
def make_tmem() -> MakeTmem:
    """A factory: ``make_tmem(capacity_pages=..., **Tmem kwargs)`` with guests 1 and 2."""

    def make(capacity_pages: int = 1000, guests: bool = True, **kwargs: Any) -> Tmem:
        config = CoreConfig(
            capacity_bytes=capacity_pages * PAGE,
            max_pools_per_guest=kwargs.pop("max_pools", 16),
        )
        tmem = Tmem(config, **kwargs)
        if guests:
            tmem.add_guest(1, name="one")
            tmem.add_guest(2, name="two")
        return tmem

    return make


@pytest.fixture
def tmem(make_tmem: MakeTmem) -> Tmem:
    return make_tmem()
