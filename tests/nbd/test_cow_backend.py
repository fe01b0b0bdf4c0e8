"""The copy-on-write export over a base image: overlay, then shared cache, then base.

Exports run against :class:`tests.agent.fake_broker.FakeBroker` through the real async client;
several exports on one fake broker stand for several VMs of one image (each its own overlay
pool, one shared cache pool by UUID).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from guest_agent.client import AsyncTmemClient
from guest_agent.nbd.backend import BLOCK_SIZE, ZERO_BLOCK, MemoryBackend
from guest_agent.nbd.base_image import BaseImage, BaseImageChanged
from guest_agent.nbd.broker_backend import FALLBACK
from guest_agent.nbd.cow_backend import (
    CowBackend,
    OverlayState,
    SharedCache,
    figures_for_broker,
    open_cow,
    report_name,
)
from guest_agent.nbd.dispatcher import Dispatcher
from tests.agent.fake_broker import FakeBroker

pytestmark = pytest.mark.timeout(60)

UUID = "6f1c2c1e-8d2b-4b8e-9a51-0e4c3f1d2a77"
IMAGE_BLOCKS = 64


def write_image(path: Path, blocks: int = IMAGE_BLOCKS, seed: int = 1) -> bytes:
    """A base image whose every block is different (and a few all-zero ones)."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(blocks * BLOCK_SIZE))
    data[5 * BLOCK_SIZE : 6 * BLOCK_SIZE] = ZERO_BLOCK
    path.write_bytes(data)
    return bytes(data)


def block_of(data: bytes, block: int) -> bytes:
    return data[block * BLOCK_SIZE : (block + 1) * BLOCK_SIZE]


class Vm:
    """One export over the image: its client, its backend, its dispatcher."""

    def __init__(self, client: AsyncTmemClient, backend: CowBackend) -> None:
        self.client = client
        self.backend = backend
        self.dispatcher = Dispatcher(backend)
        self.dispatcher.start()

    async def read(self, block: int, count: int = 1) -> bytes:
        return await self.dispatcher.read(block * BLOCK_SIZE, count * BLOCK_SIZE)

    async def stop(self) -> None:
        await self.dispatcher.stop()
        await self.backend.flush()
        await self.backend.close()
        await self.client.aclose()


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "base.raw"
    return path, write_image(path)


@pytest.fixture
async def fake() -> AsyncIterator[FakeBroker]:
    yield FakeBroker()


async def start_vm(
    fake: FakeBroker,
    image_path: Path,
    overlay: Path,
    *,
    cache: bool = True,
    size: int | None = None,
) -> Vm:
    client = AsyncTmemClient("http://fake", fake.token, transport=fake.transport())
    base = BaseImage.open(str(image_path))
    backend = await open_cow(
        client,
        base,
        size=size or base.size,
        overlay=str(overlay),
        cache_uuid=UUID if cache else None,
    )
    return Vm(client, backend)


def shared_pool(fake: FakeBroker) -> dict[tuple[int, int], bytes]:
    (pool,) = [p for p in fake.pools.values() if p.shared]
    return pool.pages


async def test_second_vm_reads_the_cache_not_the_base(
    fake: FakeBroker, image: tuple[Path, bytes], tmp_path: Path
) -> None:
    path, data = image
    first = await start_vm(fake, path, tmp_path / "a.overlay")
    assert await first.read(0, IMAGE_BLOCKS) == data
    await first.backend.wait_for_cache_puts()
    assert first.backend.stats["base_reads"] == IMAGE_BLOCKS
    assert first.backend.stats["base_read_bytes"] == IMAGE_BLOCKS * BLOCK_SIZE
    assert first.backend.stats["cache_misses"] == IMAGE_BLOCKS
    assert len(shared_pool(fake)) == IMAGE_BLOCKS

    second = await start_vm(fake, path, tmp_path / "b.overlay")
    assert await second.read(0, IMAGE_BLOCKS) == data
    figures = figures_for_broker(second.backend)
    assert figures["base_reads"] == 0
    assert figures["cache_hits"] == IMAGE_BLOCKS
    assert figures["overlay_blocks"] == 0
    await first.stop()
    await second.stop()
    # the exports stay members: the cache outlives them, for the next VM of the image
    assert len(shared_pool(fake)) == IMAGE_BLOCKS
    third = await start_vm(fake, path, tmp_path / "c.overlay")
    assert await third.read(0, IMAGE_BLOCKS) == data
    assert third.backend.stats["base_reads"] == 0
    await third.stop()


async def test_a_write_stays_in_its_vm_and_never_comes_from_the_cache(
    fake: FakeBroker, image: tuple[Path, bytes], tmp_path: Path
) -> None:
    path, data = image
    one = await start_vm(fake, path, tmp_path / "a.overlay")
    two = await start_vm(fake, path, tmp_path / "b.overlay")
    assert await one.read(3) == block_of(data, 3)
    await one.backend.wait_for_cache_puts()
    mine = b"\x42" * BLOCK_SIZE
    await one.dispatcher.write(3 * BLOCK_SIZE, mine)
    await one.dispatcher.write(7 * BLOCK_SIZE + 100, b"partial")  # read-modify-write
    await one.dispatcher.flush()
    hits = one.backend.stats["cache_hits"]
    assert await one.read(3) == mine
    expected7 = bytearray(block_of(data, 7))
    expected7[100:107] = b"partial"
    assert await one.read(7) == bytes(expected7)
    assert one.backend.stats["cache_hits"] == hits  # written blocks: the overlay's only
    assert one.backend.stats["overlay_blocks"] == 2
    # the other VM, and the cache, still have the base's bytes
    assert await two.read(3) == block_of(data, 3)
    assert await two.read(7) == block_of(data, 7)
    await one.backend.wait_for_cache_puts()
    await two.backend.wait_for_cache_puts()
    assert mine not in shared_pool(fake).values()
    await one.stop()
    await two.stop()


async def test_trimmed_and_zeroed_blocks_read_zeros_not_the_base(
    fake: FakeBroker, image: tuple[Path, bytes], tmp_path: Path
) -> None:
    path, data = image
    vm = await start_vm(fake, path, tmp_path / "a.overlay")
    await vm.dispatcher.trim(2 * BLOCK_SIZE, BLOCK_SIZE)
    await vm.dispatcher.zero(4 * BLOCK_SIZE, 2 * BLOCK_SIZE)
    await vm.dispatcher.write(9 * BLOCK_SIZE, ZERO_BLOCK)  # an all-zero write stores nothing
    assert await vm.read(2) == ZERO_BLOCK
    assert await vm.read(4, 2) == ZERO_BLOCK * 2
    assert await vm.read(9) == ZERO_BLOCK
    assert await vm.read(3) == block_of(data, 3)
    assert vm.backend.stats["overlay_blocks"] == 4
    await vm.stop()


async def test_eviction_and_an_unreachable_cache_mean_reading_the_base(
    fake: FakeBroker, image: tuple[Path, bytes], tmp_path: Path
) -> None:
    path, data = image
    vm = await start_vm(fake, path, tmp_path / "a.overlay")
    assert await vm.read(0, IMAGE_BLOCKS) == data
    await vm.backend.wait_for_cache_puts()
    shared_pool(fake).clear()  # the broker evicted everything
    assert await vm.read(0, IMAGE_BLOCKS) == data
    assert vm.backend.stats["base_reads"] == 2 * IMAGE_BLOCKS
    await vm.backend.wait_for_cache_puts()
    # the broker cannot be reached: the cache's gets fail, reads of unwritten blocks do not
    fake.down = True
    assert await vm.read(10, 4) == data[10 * BLOCK_SIZE : 14 * BLOCK_SIZE]
    assert vm.backend.stats["cache_errors"] >= 1
    await vm.backend.wait_for_cache_puts()
    fake.down = False
    await vm.stop()


async def test_random_workload_with_random_eviction_matches_a_model(
    fake: FakeBroker, image: tuple[Path, bytes], tmp_path: Path
) -> None:
    path, data = image
    size = (IMAGE_BLOCKS + 8) * BLOCK_SIZE  # an export larger than its image: zeros past it
    vms = [await start_vm(fake, path, tmp_path / f"{i}.overlay", size=size) for i in range(2)]
    models = [bytearray(data) + bytearray(size - len(data)) for _ in vms]
    rng = random.Random(7)
    for step in range(400):
        i = rng.randrange(2)
        vm, model = vms[i], models[i]
        offset = rng.randrange(size - 1)
        length = rng.randrange(1, min(3 * BLOCK_SIZE, size - offset) + 1)
        action = rng.random()
        if action < 0.5:
            assert await vm.dispatcher.read(offset, length) == model[offset : offset + length]
        elif action < 0.8:
            payload = rng.randbytes(length)
            await vm.dispatcher.write(offset, payload)
            model[offset : offset + length] = payload
        elif action < 0.9:
            await vm.dispatcher.zero(offset, length)
            model[offset : offset + length] = bytes(length)
        else:
            await vm.dispatcher.flush()
        if step % 37 == 0:
            pages = shared_pool(fake)
            for key in rng.sample(sorted(pages), len(pages) // 2):
                pages.pop(key, None)  # eviction at any moment
    for vm, model in zip(vms, models, strict=True):
        assert await vm.dispatcher.read(0, size) == model
        await vm.stop()


async def test_a_changed_base_is_refused(
    fake: FakeBroker, image: tuple[Path, bytes], tmp_path: Path
) -> None:
    path, data = image
    vm = await start_vm(fake, path, tmp_path / "a.overlay")
    assert await vm.read(0, 4) == data[: 4 * BLOCK_SIZE]
    await vm.dispatcher.write(8 * BLOCK_SIZE, b"\x01" * BLOCK_SIZE)
    await vm.backend.wait_for_cache_puts()
    with path.open("r+b") as f:  # in place, same size
        f.seek(20 * BLOCK_SIZE)
        f.write(b"changed")
    os.utime(path, ns=(1, 1))
    with pytest.raises(BaseImageChanged, match="changed under the export"):
        await vm.read(20)
    with pytest.raises(BaseImageChanged):
        await vm.read(0)  # cached, but of a version that is gone
    assert await vm.read(8) == b"\x01" * BLOCK_SIZE  # the VM's own writes still read
    await vm.stop()


async def test_a_changed_header_is_refused_even_with_the_old_mtime(tmp_path: Path) -> None:
    path = tmp_path / "base.raw"
    write_image(path)
    st = path.stat()
    base = BaseImage.open(str(path), header_check_s=0)
    with path.open("r+b") as f:
        f.write(b"new superblock")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(BaseImageChanged, match="first MiB"):
        base.read_blocks([1])
    base.close()


async def test_images_get_their_own_cache_keys(tmp_path: Path) -> None:
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    write_image(a, seed=1)
    write_image(b, seed=2)
    one, two = BaseImage.open(str(a)), BaseImage.open(str(b))
    assert one.cache_tag != two.cache_tag
    # copies of one content share a key by content, not by stat
    b.write_bytes(a.read_bytes())
    three = BaseImage.open(str(b))
    assert three.cache_tag != one.cache_tag
    four = BaseImage.open(str(a), identity="content")
    five = BaseImage.open(str(b), identity="content")
    assert four.cache_tag == five.cache_tag
    cache_a = SharedCache(FakeClient(), 1, UUID, one.cache_tag)  # type: ignore[arg-type]
    cache_b = SharedCache(FakeClient(), 1, UUID, two.cache_tag)  # type: ignore[arg-type]
    assert cache_a.handle(3) != cache_b.handle(3)
    oid, index = cache_a.handle((1 << 32) - 1)
    assert oid < 1 << 192 and index == (1 << 32) - 1
    for base in (one, two, three, four, five):
        base.close()


class FakeClient:
    """Nothing: the handle arithmetic needs no broker."""


async def test_the_overlay_survives_a_restart(
    fake: FakeBroker, image: tuple[Path, bytes], tmp_path: Path
) -> None:
    path, data = image
    fake.cap_pages = 2  # some writes go to the overlay's fallback file
    vm = await start_vm(fake, path, tmp_path / "a.overlay")
    writes = {b: bytes([b]) * BLOCK_SIZE for b in (1, 2, 3, 4)}
    for block, payload in writes.items():
        await vm.dispatcher.write(block * BLOCK_SIZE, payload)
    await vm.dispatcher.trim(6 * BLOCK_SIZE, BLOCK_SIZE)
    await vm.stop()
    assert fake.persistent_pages() == 2  # the pool is kept at the broker

    again = await start_vm(fake, path, tmp_path / "a.overlay")
    for block, payload in writes.items():
        assert await again.read(block) == payload
    assert await again.read(6) == ZERO_BLOCK
    assert await again.read(7) == block_of(data, 7)
    assert again.backend.stats["overlay_blocks"] == 5
    await again.stop()

    # a copy of the image (another inode, the same version) still fits the overlay
    copy = tmp_path / "copy.raw"
    shutil.copy2(path, copy)
    moved = await start_vm(fake, copy, tmp_path / "a.overlay")
    assert await moved.read(1) == writes[1]
    await moved.stop()

    # over another image, the overlay would be another disk: refused
    other = tmp_path / "other.raw"
    write_image(other, seed=3)
    with pytest.raises(ValueError, match="another version of the base image"):
        await start_vm(fake, other, tmp_path / "a.overlay")


async def test_memory_overlay_without_a_cache(image: tuple[Path, bytes]) -> None:
    path, data = image
    base = BaseImage.open(str(path))
    backend = CowBackend(MemoryBackend(), base, size=base.size)
    assert await backend.read_blocks([0, 1]) == [block_of(data, 0), block_of(data, 1)]
    await backend.write_blocks([(1, b"\x07" * BLOCK_SIZE)])
    assert await backend.read_blocks([1]) == [b"\x07" * BLOCK_SIZE]
    assert backend.stats["base_reads"] == 2
    await backend.close()
    await asyncio.sleep(0)


async def test_a_shed_saves_the_overlay_map_at_once(
    fake: FakeBroker, image: tuple[Path, bytes], tmp_path: Path
) -> None:
    path, _ = image
    vm = await start_vm(fake, path, tmp_path / "a.overlay")
    for block in (1, 2, 3):
        await vm.dispatcher.write(block * BLOCK_SIZE, bytes([block]) * BLOCK_SIZE)
    await vm.dispatcher.flush()
    moved = await vm.dispatcher.exclusive(lambda: vm.backend.shed(2))
    assert moved == 2
    state = vm.backend.state
    assert state is not None
    reread = OverlayState(state.path, base=state.base, block_count=state.block_count)
    loaded = reread.load()
    assert loaded is not None
    _, written, location = loaded
    assert [written[b] for b in (1, 2, 3)] == [1, 1, 1]
    assert location.count(FALLBACK) == 2  # a crash now still finds the shed blocks
    for block in (1, 2, 3):
        assert await vm.read(block) == bytes([block]) * BLOCK_SIZE
    await vm.stop()


def test_report_names_fit_the_brokers_alphabet() -> None:
    assert report_name("tmem") == "tmem"
    assert report_name("my disk/1") == "my_disk_1"
    assert report_name("") == "_"
    assert len(report_name("x" * 100)) == 64


@pytest.mark.parametrize(
    "content",
    [b"", b"something else\n", b"TMEMCOW1\n{not json}\n", b'TMEMCOW1\n{"blocks": 1}\n'],
)
def test_a_damaged_state_file_is_refused_with_a_clear_error(
    tmp_path: Path, image: tuple[Path, bytes], content: bytes
) -> None:
    path, _ = image
    base = BaseImage.open(str(path))
    state_path = tmp_path / "x.overlay.state"
    state_path.write_bytes(content)
    state = OverlayState(str(state_path), base=base.version, block_count=IMAGE_BLOCKS)
    with pytest.raises(ValueError, match="not an overlay state file"):
        state.load()
    base.close()
