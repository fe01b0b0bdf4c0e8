"""The dispatcher: batching of concurrent requests and per-block ordering within a round."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import pytest

from guest_agent.nbd.backend import BLOCK_SIZE, MemoryBackend
from guest_agent.nbd.dispatcher import FLUSH, READ, TRIM, WRITE, ZERO, BlockRequest, Dispatcher
from guest_agent.nbd.errors import BackendError

pytestmark = pytest.mark.timeout(30)


class SlowBackend(MemoryBackend):
    """Each call takes a moment, as a broker round trip does, so requests pile up."""

    def __init__(self, fail_writes: bool = False) -> None:
        super().__init__()
        self.fail_writes = fail_writes

    async def read_blocks(self, blocks: Sequence[int]) -> list[bytes | None]:
        await asyncio.sleep(0.002)
        return await super().read_blocks(blocks)

    async def write_blocks(self, writes: Sequence[tuple[int, bytes]]) -> None:
        await asyncio.sleep(0.002)
        if self.fail_writes:
            raise BackendError("broker down")
        await super().write_blocks(writes)


async def test_concurrent_requests_become_one_batch() -> None:
    backend = SlowBackend()
    dispatcher = Dispatcher(backend)
    dispatcher.start()
    await dispatcher.write(0, b"\1" * BLOCK_SIZE)  # the loop is now busy for a moment...
    # ...while 64 single-block writes queue up behind it
    await asyncio.gather(
        *(dispatcher.write(i * BLOCK_SIZE, bytes([i]) * BLOCK_SIZE) for i in range(1, 65))
    )
    await dispatcher.flush()  # writes are acknowledged before they are stored (write-back)
    assert backend.calls["write"] <= 3
    assert backend.largest_batch >= 32
    reads = await asyncio.gather(*(dispatcher.read(i * BLOCK_SIZE, 10) for i in range(65)))
    assert reads == [bytes([max(i, 1) if i == 0 else i]) * 10 for i in range(65)]
    assert backend.calls["read"] <= 3
    await dispatcher.stop()


async def test_same_round_read_sees_earlier_write_not_later_one() -> None:
    backend = MemoryBackend()
    backend.blocks[0] = b"o" * BLOCK_SIZE
    dispatcher = Dispatcher(backend)
    # queue everything before the loop starts: one round holds all of it
    r0 = dispatcher.submit(BlockRequest(READ, 0, 4))
    dispatcher.submit(BlockRequest(WRITE, 1, 2, b"AB"))
    r1 = dispatcher.submit(BlockRequest(READ, 0, 4))
    dispatcher.submit(BlockRequest(WRITE, 2, 2, b"CD"))
    r2 = dispatcher.submit(BlockRequest(READ, 0, 4))
    dispatcher.start()
    assert await r0 == b"oooo"
    assert await r1 == b"oABo"
    assert await r2 == b"oACD"
    await dispatcher.stop()
    assert dispatcher.rounds == 1
    assert backend.calls == {"read": 1, "write": 1, "discard": 0, "flush": 0}
    assert backend.blocks[0][:5] == b"oACDo"


async def test_random_concurrent_workload_matches_sequential_model() -> None:
    backend = SlowBackend()
    dispatcher = Dispatcher(backend, max_round_blocks=16)
    dispatcher.start()
    size = 16 * BLOCK_SIZE
    model = bytearray(size)
    rng = random.Random(5)
    pending: list[tuple[asyncio.Future[bytes | None], bytes | None]] = []
    for _ in range(1000):
        offset = rng.randrange(size)
        length = rng.randrange(1, min(size - offset, 2 * BLOCK_SIZE) + 1)
        kind = rng.random()
        if kind < 0.45:
            data = rng.randbytes(length)
            fut = dispatcher.submit(BlockRequest(WRITE, offset, length, data))
            model[offset : offset + length] = data
            pending.append((fut, None))
        elif kind < 0.55:
            fut = dispatcher.submit(BlockRequest(2, offset, length))  # ZERO
            model[offset : offset + length] = bytes(length)
            pending.append((fut, None))
        else:
            fut = dispatcher.submit(BlockRequest(READ, offset, length))
            pending.append((fut, bytes(model[offset : offset + length])))
        if rng.random() < 0.1:
            await asyncio.sleep(0)
    for fut, expected in pending:
        assert await fut == expected
    assert await dispatcher.read(0, size) == model
    assert dispatcher.rounds < 1000
    await dispatcher.stop()


async def test_failed_store_after_early_ack_is_reported_by_reads_and_flush() -> None:
    backend = SlowBackend(fail_writes=True)
    dispatcher = Dispatcher(backend)
    dispatcher.start()
    await dispatcher.write(0, b"x" * 100)  # acknowledged (write-back), then the store fails
    with pytest.raises(BackendError):
        await dispatcher.read(0, 3)  # never the stale zeros
    with pytest.raises(BackendError):
        await dispatcher.flush()  # the next FLUSH reports the lost write
    await dispatcher.flush()  # ...once
    backend.fail_writes = False
    await dispatcher.write(0, b"y" * 100)
    assert await dispatcher.read(0, 3) == b"yyy"
    await dispatcher.stop()


async def test_fua_write_fails_itself_when_the_store_fails() -> None:
    backend = SlowBackend(fail_writes=True)
    dispatcher = Dispatcher(backend)
    dispatcher.start()
    with pytest.raises(BackendError):
        await dispatcher.write(0, b"x" * 100, fua=True)
    backend.fail_writes = False
    await dispatcher.write(0, b"y" * 100, fua=True)
    assert backend.blocks[0][:1] == b"y"
    await dispatcher.stop()


class GatedBackend(MemoryBackend):
    """Writes wait on a gate, so a test can hold rounds in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.writing = 0

    async def write_blocks(self, writes: Sequence[tuple[int, bytes]]) -> None:
        self.writing += 1
        await self.gate.wait()
        self.writing -= 1
        await super().write_blocks(writes)


async def test_disjoint_rounds_overlap_and_overlapping_ones_wait() -> None:
    backend = GatedBackend()
    dispatcher = Dispatcher(backend, max_inflight=4, min_overlap_blocks=1)
    dispatcher.start()
    first = asyncio.ensure_future(dispatcher.write(0, b"a" * BLOCK_SIZE))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(dispatcher.write(BLOCK_SIZE, b"b" * BLOCK_SIZE))
    await asyncio.sleep(0.01)
    assert backend.writing == 2  # two rounds on different blocks are in flight together
    # a read of block 0 must wait for the first round: it may not see the old contents
    read = asyncio.ensure_future(dispatcher.read(0, 1))
    await asyncio.sleep(0.01)
    assert not read.done()
    backend.gate.set()
    await asyncio.gather(first, second)
    assert await read == b"a"
    assert dispatcher.most_inflight == 2
    await dispatcher.stop()


class ReadGatedBackend(MemoryBackend):
    """Reads wait on a gate and are counted, so a test can watch read rounds start."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.reading = 0

    async def read_blocks(self, blocks: Sequence[int]) -> list[bytes | None]:
        self.reading += 1
        await self.gate.wait()
        return await super().read_blocks(blocks)


async def test_a_round_beside_n_in_flight_waits_for_n_times_the_threshold() -> None:
    backend = ReadGatedBackend()
    dispatcher = Dispatcher(backend, max_inflight=4, min_overlap_blocks=2)
    dispatcher.start()
    reads: list[asyncio.Future[bytes]] = []

    async def queue(*blocks: int) -> None:
        """Queue one-block reads together (the dispatcher looks once they are all queued)."""
        for block in blocks:
            reads.append(asyncio.ensure_future(dispatcher.read(block * BLOCK_SIZE, BLOCK_SIZE)))
        await asyncio.sleep(0.01)

    await queue(0)
    assert backend.reading == 1
    await queue(1, 2)
    assert backend.reading == 2  # two blocks beside one round (2 x 1): a second round
    await queue(3, 4, 5, 6)
    assert backend.reading == 3  # four beside two rounds (2 x 2): a third
    await queue(7)
    assert backend.reading == 3  # one beside three rounds waits for a round to end
    backend.gate.set()
    assert await asyncio.gather(*reads) == [bytes(BLOCK_SIZE)] * 8
    assert dispatcher.rounds == 4
    await dispatcher.stop()


async def test_a_second_write_round_starts_at_once_a_third_waits_for_the_threshold() -> None:
    # write-back: at queue depth 1 the next write arrives while the one before is stored
    backend = GatedBackend()
    dispatcher = Dispatcher(backend, max_inflight=4, min_overlap_blocks=2)
    dispatcher.start()
    writes: list[asyncio.Future[None]] = []
    for block in range(3):
        writes.append(asyncio.ensure_future(dispatcher.write(block * BLOCK_SIZE, b"w" * 4096)))
        await asyncio.sleep(0.01)
        # acknowledged, but the store is held: one block beside two rounds (2 x 1) waits
        assert backend.writing == min(block + 1, 2)
    assert [w.done() for w in writes] == [True, True, False]  # the third is not in a round yet
    backend.gate.set()
    await asyncio.gather(*writes)
    assert dispatcher.rounds == 3
    await dispatcher.stop()


async def test_exclusive_runs_with_nothing_in_flight_in_queue_order() -> None:
    backend = GatedBackend()
    dispatcher = Dispatcher(backend)
    dispatcher.start()
    write = asyncio.ensure_future(dispatcher.write(0, b"x" * BLOCK_SIZE))
    await asyncio.sleep(0.01)
    seen: list[int] = []

    async def quiet() -> int:
        seen.append(backend.writing)
        return 42

    exclusive = asyncio.ensure_future(dispatcher.exclusive(quiet))
    later = asyncio.ensure_future(dispatcher.write(BLOCK_SIZE, b"y" * BLOCK_SIZE))
    await asyncio.sleep(0.01)
    assert not exclusive.done() and backend.writing == 1  # the later write waits too
    backend.gate.set()
    assert await exclusive == 42
    await asyncio.gather(write, later)
    assert seen == [0]
    await dispatcher.stop()


class JitterBackend(MemoryBackend):
    """Every call takes a random time, so rounds in flight finish out of order."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.rng = random.Random(seed)

    async def read_blocks(self, blocks: Sequence[int]) -> list[bytes | None]:
        await asyncio.sleep(self.rng.random() * 0.003)
        return await super().read_blocks(blocks)

    async def write_blocks(self, writes: Sequence[tuple[int, bytes]]) -> None:
        await asyncio.sleep(self.rng.random() * 0.003)
        await super().write_blocks(writes)

    async def discard_blocks(self, blocks: Sequence[int]) -> None:
        await asyncio.sleep(self.rng.random() * 0.003)
        await super().discard_blocks(blocks)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_out_of_order_completion_keeps_per_block_order(seed: int) -> None:
    backend = JitterBackend(seed)
    dispatcher = Dispatcher(backend, min_overlap_blocks=1)
    dispatcher.start()
    size = 64 * BLOCK_SIZE
    model = bytearray(size)
    rng = random.Random(seed)
    pending: list[tuple[asyncio.Future[bytes | None], bytes | None]] = []
    for _ in range(600):
        offset = rng.randrange(size)
        length = rng.randrange(1, min(size - offset, 3 * BLOCK_SIZE) + 1)
        roll = rng.random()
        if roll < 0.4:
            data = rng.randbytes(length)
            request = BlockRequest(WRITE, offset, length, data, fua=rng.random() < 0.05)
            model[offset : offset + length] = data
            pending.append((dispatcher.submit(request), None))
        elif roll < 0.5:
            request = BlockRequest(TRIM if roll < 0.45 else ZERO, offset, length)
            if request.kind == ZERO:
                model[offset : offset + length] = bytes(length)
            else:
                # a trim leaves its partial blocks alone and makes whole ones read as zeros
                first = -(-offset // BLOCK_SIZE) * BLOCK_SIZE
                last = (offset + length) // BLOCK_SIZE * BLOCK_SIZE
                if last > first:
                    model[first:last] = bytes(last - first)
            pending.append((dispatcher.submit(request), None))
        elif roll < 0.53:
            pending.append((dispatcher.submit(BlockRequest(FLUSH, 0, 0)), None))
        else:
            future = dispatcher.submit(BlockRequest(READ, offset, length))
            pending.append((future, bytes(model[offset : offset + length])))
        if rng.random() < 0.3:
            await asyncio.sleep(rng.random() * 0.002)
    for future, expected in pending:
        assert await future == expected
    await dispatcher.flush()
    assert await dispatcher.read(0, size) == model
    assert dispatcher.most_inflight > 1
    await dispatcher.stop()


class NowBackend(SlowBackend):
    """Answers one block at once when asked (as the broker's own exports do)."""

    def read_block_now(self, block: int) -> object:
        return self.blocks.get(block)

    def write_block_now(self, block: int, data: bytes) -> bool:
        self.blocks[block] = data
        return True


async def test_read_and_write_now_only_when_idle_and_never_stale() -> None:
    backend = NowBackend()
    dispatcher = Dispatcher(backend, max_round_blocks=8)
    dispatcher.start()
    size = 16 * BLOCK_SIZE
    model = bytearray(size)
    rng = random.Random(11)
    pending: list[tuple[asyncio.Future[bytes | None], bytes | None]] = []
    for step in range(600):
        block = rng.randrange(16)
        offset = block * BLOCK_SIZE
        if rng.random() < 0.5:
            data = rng.randbytes(BLOCK_SIZE)
            if not (rng.random() < 0.5 and dispatcher.write_now(offset, data)):
                request = BlockRequest(WRITE, offset, BLOCK_SIZE, data)
                pending.append((dispatcher.submit(request), None))
            model[offset : offset + BLOCK_SIZE] = data
        else:
            expected = bytes(model[offset : offset + BLOCK_SIZE])
            now = dispatcher.read_now(offset, BLOCK_SIZE)
            if now is not None:
                assert now == expected, step
            else:
                pending.append(
                    (dispatcher.submit(BlockRequest(READ, offset, BLOCK_SIZE)), expected)
                )
        if rng.random() < 0.2:
            await asyncio.sleep(0.003 if rng.random() < 0.3 else 0)
    for fut, expected in pending:
        assert await fut == expected
    assert dispatcher.reads_now > 0 and dispatcher.writes_now > 0  # idle moments, used
    await asyncio.sleep(0.01)
    before = dispatcher.reads_now
    assert dispatcher.read_now(0, BLOCK_SIZE) == bytes(model[:BLOCK_SIZE])  # idle: at once
    assert dispatcher.read_now(1, BLOCK_SIZE) is None  # unaligned: a round
    assert dispatcher.read_now(0, 2 * BLOCK_SIZE) is None  # two blocks: a round
    assert dispatcher.reads_now == before + 1

    seen: list[bytes | None] = []

    async def action() -> None:
        seen.append(dispatcher.read_now(0, BLOCK_SIZE))  # blocks may be moving: no

    await dispatcher.exclusive(action)
    assert seen == [None]
    await dispatcher.stop()


async def test_read_now_needs_a_backend_that_can() -> None:
    dispatcher = Dispatcher(MemoryBackend())
    dispatcher.start()
    await dispatcher.write(0, b"x" * BLOCK_SIZE)
    assert dispatcher.read_now(0, BLOCK_SIZE) is None
    assert not dispatcher.write_now(0, b"y" * BLOCK_SIZE)
    await dispatcher.stop()
