"""BrokerBackend's placement rules, against a fake page client that keeps the contract:
a declined put leaves nothing at the handle; persistent pages stay until flushed."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from guest_agent.errors import BrokerUnavailable
from guest_agent.nbd.backend import BLOCK_SIZE
from guest_agent.nbd.broker_backend import (
    BROKER,
    FALLBACK,
    NOWHERE,
    BrokerBackend,
    block_handle,
)
from guest_agent.nbd.dispatcher import NOT_NOW, Dispatcher
from guest_agent.nbd.errors import BackendError

pytestmark = pytest.mark.timeout(30)


class FakeClient:
    """Pages in a dict; puts beyond ``cap`` pages are declined (and flush the old copy)."""

    def __init__(self, cap: int | None = None) -> None:
        self.cap = cap
        self.pages: dict[tuple[int, int], bytes] = {}
        self.pools: set[int] = set()
        self.down = False
        self.declining = False  # decline every put, as a frozen guest's are
        self.land_then_fail = False  # store the puts, then lose the answer
        self.no_candidates = False  # a broker that cannot name its coldest pages
        self.calls: list[str] = []

    async def create_pool(self, kind: str) -> int:
        assert kind == "persistent"
        self.pools.add(len(self.pools))
        return len(self.pools) - 1

    async def destroy_pool(self, pool_id: int) -> None:
        self.pools.discard(pool_id)
        self.pages.clear()

    async def put_many(
        self, pool_id: int, pages: Sequence[tuple[int, int, bytes | memoryview]]
    ) -> list[bool]:
        self.calls.append("put_many")
        if self.down:
            raise BrokerUnavailable("connection refused")
        out = []
        for oid, index, page in pages:
            assert len(page) == BLOCK_SIZE
            key = (oid, index)
            full = self.cap is not None and key not in self.pages and len(self.pages) >= self.cap
            if full or self.declining:
                self.pages.pop(key, None)
                out.append(False)
            else:
                self.pages.pop(key, None)  # (re)put: the newest by last access
                self.pages[key] = bytes(page)
                out.append(True)
        if self.land_then_fail:
            raise BrokerUnavailable("connection reset after the batch was applied")
        return out

    async def get_many(
        self, pool_id: int, handles: Sequence[tuple[int, int]]
    ) -> list[bytes | None]:
        self.calls.append("get_many")
        if self.down:
            raise BrokerUnavailable("connection refused")
        out = [self.pages.pop(h, None) for h in handles]
        for h, got in zip(handles, out, strict=True):
            if got is not None:
                self.pages[h] = got  # a get makes it the newest by last access
        return out

    async def shed_candidates(self, limit: int = 256) -> list[tuple[int, int, int]]:
        """Coldest first by last access, as the broker names them."""
        self.calls.append("shed_candidates")
        if self.down or self.no_candidates:
            raise BrokerUnavailable("connection refused")
        return [(0, oid, index) for oid, index in list(self.pages)[:limit]]

    async def flush_many(self, pool_id: int, handles: Sequence[tuple[int, int]]) -> None:
        self.calls.append("flush_many")
        if self.down:
            raise BrokerUnavailable("connection refused")
        for h in handles:
            self.pages.pop(h, None)


def page(byte: int) -> bytes:
    return bytes([byte]) * BLOCK_SIZE


async def make(
    tmp_path: Path, client: FakeClient, blocks: int = 1024, read_retry_s: float = 0.2
) -> BrokerBackend:
    return await BrokerBackend.open(
        client,
        size=blocks * BLOCK_SIZE,
        fallback_path=str(tmp_path / "fallback"),
        read_retry_s=read_retry_s,
    )


def test_block_handle_mapping() -> None:
    assert block_handle(0) == (0, 0)
    assert block_handle(255) == (0, 255)
    assert block_handle(256) == (1, 256)
    assert block_handle((1 << 32) - 1) == ((1 << 24) - 1, (1 << 32) - 1)


async def test_blocks_go_to_the_broker_and_come_back(tmp_path: Path) -> None:
    client = FakeClient()
    backend = await make(tmp_path, client)
    await backend.write_blocks([(3, page(3)), (700, page(7))])
    assert client.pages == {(0, 3): page(3), (2, 700): page(7)}
    assert await backend.read_blocks([3, 700, 5]) == [page(3), page(7), None]
    assert backend.count(BROKER) == 2
    await backend.close()
    assert not client.pools  # the export's pool is destroyed with it


async def test_declined_puts_land_in_the_fallback_file(tmp_path: Path) -> None:
    client = FakeClient(cap=2)
    backend = await make(tmp_path, client)
    await backend.write_blocks([(i, page(i)) for i in range(5)])
    assert [backend.location[i] for i in range(5)] == [BROKER, BROKER] + [FALLBACK] * 3
    assert await backend.read_blocks(list(range(5))) == [page(i) for i in range(5)]
    with open(tmp_path / "fallback", "rb") as f:
        f.seek(4 * BLOCK_SIZE)
        assert f.read(BLOCK_SIZE) == page(4)
    # a block in the fallback file moves back once the broker takes it again
    client.cap = None
    await backend.write_blocks([(4, page(44))])
    assert backend.location[4] == BROKER
    assert await backend.read_blocks([4]) == [page(44)]
    # and a broker block whose rewrite is declined loses its broker copy (contract)
    client.declining = True
    await backend.write_blocks([(0, page(100))])
    assert backend.location[0] == FALLBACK and (0, 0) not in client.pages
    assert await backend.read_blocks([0]) == [page(100)]
    await backend.close()


async def test_unreachable_broker_writes_fall_back_reads_fail(tmp_path: Path) -> None:
    client = FakeClient()
    backend = await make(tmp_path, client)
    await backend.write_blocks([(1, page(1))])
    client.down = True
    await backend.write_blocks([(2, page(2))])
    assert backend.location[2] == FALLBACK
    assert await backend.read_blocks([2]) == [page(2)]
    with pytest.raises(BackendError):
        await backend.read_blocks([1])  # after read_retry_s of retries
    # discards never fail on the broker: the map forgets the block either way
    await backend.discard_blocks([1])
    assert await backend.read_blocks([1]) == [None]
    client.down = False
    await backend.close()


async def test_reads_wait_for_a_restarting_broker(tmp_path: Path) -> None:
    client = FakeClient()
    backend = await make(tmp_path, client, read_retry_s=10)
    await backend.write_blocks([(1, page(1))])
    client.down = True

    async def come_back() -> None:
        await asyncio.sleep(0.2)
        client.down = False

    back = asyncio.create_task(come_back())
    assert await backend.read_blocks([1]) == [page(1)]
    await back
    assert backend.stats["broker_read_retries"] > 0
    await backend.close()


async def test_a_put_that_may_have_landed_is_never_read_and_a_shed_flushes_it(
    tmp_path: Path,
) -> None:
    client = FakeClient()
    backend = await make(tmp_path, client)
    await backend.write_blocks([(5, page(1))])
    client.land_then_fail = True
    await backend.write_blocks([(5, page(2)), (6, page(3))])
    client.land_then_fail = False
    assert backend.location[5] == FALLBACK and backend.location[6] == FALLBACK
    assert len(client.pages) == 2  # the broker holds copies the map no longer points at
    assert await backend.read_blocks([5, 6]) == [page(2), page(3)]
    assert await backend.shed(1) == 2  # the stale copies go first, and count
    assert not client.pages
    assert await backend.read_blocks([5, 6]) == [page(2), page(3)]
    await backend.close()


async def test_a_discard_the_broker_missed_is_flushed_with_the_next_one(tmp_path: Path) -> None:
    client = FakeClient()
    backend = await make(tmp_path, client)
    await backend.write_blocks([(1, page(1)), (2, page(2))])
    client.down = True
    await backend.discard_blocks([1])
    client.down = False
    assert client.pages == {block_handle(1): page(1), block_handle(2): page(2)}
    await backend.discard_blocks([1, 2])  # the block's own call flushes its stale copy
    assert not client.pages
    assert await backend.read_blocks([1, 2]) == [None, None]
    # a rewrite replaces a stale copy at the broker: nothing left to flush afterwards
    await backend.write_blocks([(3, page(3))])
    client.down = True
    await backend.discard_blocks([3])
    client.down = False
    await backend.write_blocks([(3, page(4))])
    assert not backend.placement.stale
    assert await backend.read_blocks([3]) == [page(4)]
    await backend.close()


async def test_discard_flushes_broker_pages_in_one_batch(tmp_path: Path) -> None:
    client = FakeClient()
    backend = await make(tmp_path, client)
    await backend.write_blocks([(b, page(1)) for b in range(512)])
    client.calls.clear()
    await backend.discard_blocks([*range(256), 300])
    assert client.calls == ["flush_many"]
    assert len(client.pages) == 255
    assert backend.location[0] == NOWHERE and backend.location[301] == BROKER
    # discarding blocks that hold nothing costs no broker call
    client.calls.clear()
    await backend.discard_blocks(list(range(600, 1000)))
    assert client.calls == []
    await backend.close()


async def test_flush_fsyncs_only_after_fallback_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    client = FakeClient(cap=1)
    backend = await make(tmp_path, client)
    await backend.write_blocks([(0, page(1))])
    await backend.flush()
    assert synced == []  # the broker acknowledged durably; nothing local to sync
    await backend.write_blocks([(1, page(2))])
    await backend.flush()
    await backend.flush()
    assert len(synced) == 1
    await backend.close()


async def test_shed_moves_broker_blocks_to_the_file(tmp_path: Path) -> None:
    client = FakeClient()
    backend = await make(tmp_path, client)
    await backend.write_blocks([(b, page(b % 251)) for b in range(100)])
    moved = await backend.shed(30)
    assert moved == 30
    assert backend.count(BROKER) == 70 and backend.count(FALLBACK) == 30
    assert len(client.pages) == 70
    assert await backend.read_blocks(list(range(100))) == [page(b % 251) for b in range(100)]
    assert await backend.shed(1000) == 70
    assert not client.pages
    assert await backend.shed(5) == 0
    await backend.close()


async def test_shed_takes_the_blocks_the_broker_names_coldest_first(tmp_path: Path) -> None:
    client = FakeClient()
    backend = await make(tmp_path, client)
    await backend.write_blocks([(b, page(b % 251)) for b in range(20)])
    # blocks 0..9 read again: the broker's coldest are 10..19 (not the tail, 19 down)
    assert await backend.read_blocks(list(range(10))) == [page(b) for b in range(10)]
    assert await backend.shed(4) == 4
    assert [b for b in range(20) if backend.location[b] == FALLBACK] == [10, 11, 12, 13]
    assert "shed_candidates" in client.calls
    # a broker that cannot name pages: the highest blocks go, as before
    client.no_candidates = True
    assert await backend.shed(2) == 2
    assert [b for b in range(20) if backend.location[b] == FALLBACK] == [10, 11, 12, 13, 18, 19]
    assert await backend.read_blocks(list(range(20))) == [page(b) for b in range(20)]
    await backend.close()


async def test_dispatcher_over_broker_backend_matches_a_model(tmp_path: Path) -> None:
    client = FakeClient(cap=40)
    backend = await make(tmp_path, client, blocks=64)
    dispatcher = Dispatcher(backend)
    dispatcher.start()
    size = 64 * BLOCK_SIZE
    model = bytearray(size)
    rng = random.Random(11)
    for step in range(200):
        offset = rng.randrange(size)
        length = rng.randrange(1, min(size - offset, 3 * BLOCK_SIZE) + 1)
        roll = rng.random()
        if roll < 0.5:
            data = rng.randbytes(length)
            await dispatcher.write(offset, data)
            model[offset : offset + length] = data
        elif roll < 0.6:
            await dispatcher.zero(offset, length)
            model[offset : offset + length] = bytes(length)
        elif roll < 0.65:
            await backend.shed(5)
        else:
            assert await dispatcher.read(offset, length) == model[offset : offset + length]
        if step % 50 == 0:
            await dispatcher.flush()
    assert await dispatcher.read(0, size) == model
    assert backend.count(FALLBACK) > 0 and backend.count(BROKER) > 0
    await dispatcher.stop()
    await backend.close()


async def test_discard_gives_fallback_file_space_back(tmp_path: Path) -> None:
    client = FakeClient(cap=0)
    backend = await make(tmp_path, client)
    await backend.write_blocks([(b, page(9)) for b in range(64)])
    path = tmp_path / "fallback"
    before = path.stat().st_blocks
    await backend.discard_blocks(list(range(16, 48)))
    assert backend.count(FALLBACK) == 32
    if backend.stats["fallback_punched"]:  # the filesystem punches holes (tmpfs, ext4, xfs)
        assert path.stat().st_blocks < before
    assert await backend.read_blocks([15, 16, 48]) == [page(9), None, page(9)]
    await backend.close()


class NowClient(FakeClient):
    """A client that can answer a get at once (the broker's own exports' ``CorePages``)."""

    barriers = 0

    def get_now(self, pool_id: int, oid: int, index: int) -> object:
        if self.down:
            raise ConnectionError("broker down")
        return self.pages.get((oid, index))

    def put_now(self, pool_id: int, oid: int, index: int, data: bytes) -> object:
        if self.down:
            raise ConnectionError("broker down")
        if self.cap is not None and len(self.pages) >= self.cap and (oid, index) not in self.pages:
            self.pages.pop((oid, index), None)
            return False
        self.pages[(oid, index)] = data
        return True

    async def barrier(self) -> None:
        self.barriers += 1


async def test_read_block_now_from_each_place_or_not_now(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    plain = await make(tmp_path / "a", FakeClient())
    await plain.write_blocks([(1, page(1))])
    assert plain.read_block_now(0) is None  # nowhere: zeros, no I/O
    assert plain.read_block_now(1) is NOT_NOW  # an HTTP client cannot answer at once
    await plain.close()

    client = NowClient(cap=1)
    backend = await make(tmp_path, client)
    await backend.write_blocks([(1, page(1)), (2, page(2))])
    assert [backend.location[1], backend.location[2]] == [BROKER, FALLBACK]
    assert backend.read_block_now(1) == page(1)
    assert backend.read_block_now(2) == page(2)  # from the fallback file
    client.down = True
    assert backend.read_block_now(1) is NOT_NOW  # the normal path retries
    client.down = False
    client.pages.clear()  # a page the broker lost: the normal path fails the read
    assert backend.read_block_now(1) is NOT_NOW
    await backend.close()


async def test_write_block_now_stores_declines_to_the_file_and_flush_waits(tmp_path: Path) -> None:
    client = NowClient(cap=1)
    backend = await make(tmp_path, client)
    assert backend.write_block_now(1, page(1))
    assert backend.write_block_now(2, page(2))  # declined: into the fallback file
    assert [backend.location[1], backend.location[2]] == [BROKER, FALLBACK]
    assert await backend.read_blocks([1, 2]) == [page(1), page(2)]
    client.down = True
    assert not backend.write_block_now(3, page(3))  # left to the round
    assert backend.location[3] == NOWHERE
    await backend.flush()
    assert client.barriers == 1
    await backend.close()


@pytest.mark.parametrize("punch", [True, False], ids=["holes", "no-holes"])
async def test_reopen_over_the_pool_and_file_reads_what_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, punch: bool
) -> None:
    """What the broker's own exports rely on across a restart: the pool and the fallback file
    alone say where every block is (writes, zeroes, declines, sheds, quota freed)."""
    if not punch:  # a filesystem that cannot punch holes: zeros are written instead
        monkeypatch.setattr("guest_agent.nbd.broker_backend._fallocate", None)
    client = FakeClient(cap=24)
    blocks = 64
    backend = await make(tmp_path, client, blocks=blocks)
    dispatcher = Dispatcher(backend)
    dispatcher.start()
    size = blocks * BLOCK_SIZE
    model = bytearray(size)
    rng = random.Random(5)
    for _ in range(300):
        offset = rng.randrange(size)
        length = rng.randrange(1, min(size - offset, 3 * BLOCK_SIZE) + 1)
        roll = rng.random()
        if roll < 0.55:
            data = rng.randbytes(length)
            await dispatcher.write(offset, data)
            model[offset : offset + length] = data
        elif roll < 0.85:
            await dispatcher.zero(offset, length)
            model[offset : offset + length] = bytes(length)
        else:
            await dispatcher.exclusive(lambda: backend.shed(3))
    await dispatcher.flush()
    await dispatcher.stop()
    location = bytes(backend.location)
    assert FALLBACK in location and BROKER in location and NOWHERE in location
    await backend.close(keep_pool=True)
    assert client.pools == {0}  # the pool stays

    again = BrokerBackend.reopen(
        client, 0, size=size, fallback_path=str(tmp_path / "fallback"),
        broker_blocks=[index for _, index in client.pages],
    )  # fmt: skip
    if punch:
        assert bytes(again.location) == location
    else:  # every block outside the pool counts as in the file (holes read as zeros)
        assert all(
            was == now or (was == NOWHERE and now == FALLBACK)
            for was, now in zip(location, again.location, strict=True)
        )
    dispatcher = Dispatcher(again)
    dispatcher.start()
    assert await dispatcher.read(0, size) == model
    await dispatcher.stop()
    await again.close()
    assert client.pools == set()
