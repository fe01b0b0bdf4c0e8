"""The NBD server against the in-memory backend, driven frame by frame."""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from guest_agent.nbd import protocol as p
from guest_agent.nbd.backend import MemoryBackend
from guest_agent.nbd.dispatcher import Dispatcher
from guest_agent.nbd.server import NbdServer
from tests.nbd.nbd_client import RawNbdClient

pytestmark = pytest.mark.timeout(30)

SIZE = 4 * 1024 * 1024 + 1000  # not a multiple of 4 KiB: the last block is partial


@dataclass
class Served:
    server: NbdServer
    backend: MemoryBackend
    dispatcher: Dispatcher
    port: int


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    backend = MemoryBackend()
    dispatcher = Dispatcher(backend)
    dispatcher.start()
    server = NbdServer(dispatcher, size=SIZE, name="tmem", max_block=1 << 20)
    port = await server.listen_tcp("127.0.0.1", 0)
    yield Served(server, backend, dispatcher, port)
    await server.close()
    await dispatcher.stop()


async def connected(served: Served) -> RawNbdClient:
    client = await RawNbdClient.connect(served.port)
    await client.go(b"tmem")
    return client


async def closed(client: RawNbdClient) -> bool:
    """True when the server hung up (EOF without further bytes)."""
    data = await asyncio.wait_for(client.reader.read(1), 5)
    return data == b""


# --- handshake ---------------------------------------------------------------------------


async def test_greeting_offers_fixed_newstyle_and_no_zeroes(served: Served) -> None:
    client = await RawNbdClient.connect(served.port)
    assert client.handshake_flags == p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES
    await client.close()


async def test_unknown_client_flags_hang_up(served: Served) -> None:
    client = await RawNbdClient.connect(served.port, client_flags=0x80)
    assert await closed(client)
    await client.close()


async def test_list_names_the_export(served: Served) -> None:
    client = await RawNbdClient.connect(served.port)
    replies = await client.option(p.OPT_LIST)
    assert [r.type for r in replies] == [p.REP_SERVER, p.REP_ACK]
    (length,) = struct.unpack(">I", replies[0].data[:4])
    assert replies[0].data[4 : 4 + length] == b"tmem"
    bad = await client.option(p.OPT_LIST, b"x")
    assert [r.type for r in bad] == [p.REP_ERR_INVALID]
    await client.close()


@pytest.mark.parametrize("option", [p.OPT_STRUCTURED_REPLY, p.OPT_STARTTLS, 10, 99, 0xFFFF])
async def test_unknown_options_are_unsupported_and_negotiation_goes_on(
    served: Served, option: int
) -> None:
    client = await RawNbdClient.connect(served.port)
    replies = await client.option(option, b"some data")
    assert [(r.option, r.type) for r in replies] == [(option, p.REP_ERR_UNSUP)]
    await client.go()
    assert await client.read(0, 10) == bytes(10)
    await client.close()


async def test_info_reports_export_and_block_sizes(served: Served) -> None:
    client = await RawNbdClient.connect(served.port)
    data = client.info_data(b"tmem", (p.INFO_NAME, p.INFO_DESCRIPTION, p.INFO_BLOCK_SIZE))
    replies = await client.option(p.OPT_INFO, data)
    assert replies[-1].type == p.REP_ACK
    infos = {struct.unpack(">H", r.data[:2])[0]: r.data for r in replies[:-1]}
    assert set(infos) == {p.INFO_EXPORT, p.INFO_NAME, p.INFO_DESCRIPTION, p.INFO_BLOCK_SIZE}
    _, size, flags = p.INFO_EXPORT_BODY.unpack(infos[p.INFO_EXPORT])
    assert size == SIZE
    for flag in (p.TFLAG_SEND_FLUSH, p.TFLAG_SEND_FUA, p.TFLAG_SEND_TRIM):
        assert flags & flag
    assert flags & p.TFLAG_SEND_WRITE_ZEROES
    assert p.INFO_BLOCK_SIZE_BODY.unpack(infos[p.INFO_BLOCK_SIZE])[1:] == (1, 4096, 1 << 20)
    assert infos[p.INFO_NAME][2:] == b"tmem"
    # INFO does not enter transmission: GO still works on the same connection
    await client.go(b"tmem")
    assert await client.read(0, 1) == b"\0"
    await client.close()


@pytest.mark.parametrize(
    "data",
    [
        b"",  # too short
        struct.pack(">I", 100) + b"tmem" + struct.pack(">H", 0),  # name longer than the data
        struct.pack(">I", 4) + b"tmem" + struct.pack(">H", 2) + b"\0\0",  # count too big
    ],
)
async def test_malformed_info_is_invalid(served: Served, data: bytes) -> None:
    client = await RawNbdClient.connect(served.port)
    for option in (p.OPT_INFO, p.OPT_GO):
        replies = await client.option(option, data)
        assert [r.type for r in replies] == [p.REP_ERR_INVALID]
    await client.close()


async def test_unknown_export_name(served: Served) -> None:
    client = await RawNbdClient.connect(served.port)
    for option in (p.OPT_INFO, p.OPT_GO):
        replies = await client.option(option, client.info_data(b"nope"))
        assert [r.type for r in replies] == [p.REP_ERR_UNKNOWN]
    # EXPORT_NAME cannot carry an error: the server hangs up
    await client.send_option(p.OPT_EXPORT_NAME, b"nope")
    assert await closed(client)
    await client.close()


@pytest.mark.parametrize("no_zeroes", [False, True])
async def test_export_name_enters_transmission(served: Served, no_zeroes: bool) -> None:
    flags = p.CLIENT_FIXED_NEWSTYLE | (p.CLIENT_NO_ZEROES if no_zeroes else 0)
    client = await RawNbdClient.connect(served.port, client_flags=flags)
    await client.send_option(p.OPT_EXPORT_NAME, b"")
    size, tflags = p.EXPORT_NAME_REPLY.unpack(await client.reader.readexactly(10))
    assert size == SIZE and tflags & p.TFLAG_HAS_FLAGS
    if not no_zeroes:
        assert await client.reader.readexactly(124) == bytes(124)
    await client.write(0, b"hello")
    assert await client.read(0, 5) == b"hello"
    await client.close()


async def test_abort_is_acked_then_closed(served: Served) -> None:
    client = await RawNbdClient.connect(served.port)
    replies = await client.option(p.OPT_ABORT)
    assert [r.type for r in replies] == [p.REP_ACK]
    assert await closed(client)
    await client.close()


async def test_oversized_option_is_skipped(served: Served) -> None:
    client = await RawNbdClient.connect(served.port)
    replies = await client.option(77, bytes(p.MAX_OPTION_DATA + 1))
    assert [r.type for r in replies] == [p.REP_ERR_TOO_BIG]
    await client.go()
    await client.close()


# --- transmission ------------------------------------------------------------------------


async def test_unaligned_writes_and_reads_match_a_model(served: Served) -> None:
    client = await connected(served)
    model = bytearray(SIZE)
    rng = random.Random(7)
    for _ in range(300):
        offset = rng.randrange(SIZE)
        length = rng.randrange(1, min(SIZE - offset, 20000) + 1)
        if rng.random() < 0.5:
            data = rng.randbytes(length)
            await client.write(offset, data)
            model[offset : offset + length] = data
        else:
            assert await client.read(offset, length) == model[offset : offset + length]
    for offset in range(0, SIZE, 1 << 20):  # maximum-size reads, the last one partial
        length = min(1 << 20, SIZE - offset)
        assert await client.read(offset, length) == model[offset : offset + length]
    await client.close()


async def test_trim_and_write_zeroes(served: Served) -> None:
    client = await connected(served)
    await client.write(0, b"\xff" * 5 * 4096)
    error, _ = await client.call(p.CMD_TRIM, 4096, 8192)
    assert error == 0
    # trimmed whole blocks read as zeros; their neighbours are untouched
    assert await client.read(0, 5 * 4096) == b"\xff" * 4096 + bytes(8192) + b"\xff" * 8192
    error, _ = await client.call(p.CMD_WRITE_ZEROES, 100, 4096 * 4, flags=p.CMD_FLAG_NO_HOLE)
    assert error == 0
    expected = b"\xff" * 100 + bytes(4096 * 4) + b"\xff" * (4096 - 100)
    assert await client.read(0, 5 * 4096) == expected
    # a block written with zeros holds nothing in the store
    assert 1 not in served.backend.blocks and 2 not in served.backend.blocks
    await client.close()


@pytest.mark.parametrize(
    ("cmd", "offset", "length", "error"),
    [
        (p.CMD_READ, SIZE - 10, 11, p.EINVAL),
        (p.CMD_READ, SIZE, 1, p.EINVAL),
        (p.CMD_READ, 2**64 - 1, 1, p.EINVAL),
        (p.CMD_WRITE, SIZE - 10, 11, p.ENOSPC),
        (p.CMD_WRITE_ZEROES, SIZE - 10, 11, p.ENOSPC),
        (p.CMD_TRIM, SIZE - 10, 11, p.EINVAL),
        (p.CMD_READ, 0, (1 << 20) + 1, p.EINVAL),  # over the advertised maximum
        (p.CMD_FLUSH, 1, 0, p.EINVAL),
        (p.CMD_CACHE, 0, 10, p.EINVAL),  # not advertised
        (p.CMD_BLOCK_STATUS, 0, 10, p.EINVAL),  # no meta context negotiated
        (42, 0, 10, p.EINVAL),
    ],
)
async def test_requests_the_server_refuses(
    served: Served, cmd: int, offset: int, length: int, error: int
) -> None:
    client = await connected(served)
    data = bytes(length) if cmd == p.CMD_WRITE else b""
    got, payload = await client.call(cmd, offset, length, data)
    assert (got, payload) == (error, b"")
    # the connection stays usable
    await client.write(SIZE - 4, b"tail")
    assert await client.read(SIZE - 4, 4) == b"tail"
    await client.close()


@pytest.mark.parametrize(
    ("cmd", "flags"),
    [
        (p.CMD_READ, p.CMD_FLAG_NO_HOLE),
        (p.CMD_WRITE, p.CMD_FLAG_DF),
        (p.CMD_TRIM, p.CMD_FLAG_FAST_ZERO),
        (p.CMD_WRITE_ZEROES, p.CMD_FLAG_FAST_ZERO),
        (p.CMD_WRITE, 1 << 9),
    ],
)
async def test_unknown_command_flags_are_invalid(served: Served, cmd: int, flags: int) -> None:
    client = await connected(served)
    data = b"x" * 8 if cmd == p.CMD_WRITE else b""
    error, _ = await client.call(cmd, 0, 8, data, flags)
    assert error == p.EINVAL
    assert await client.read(0, 8) == bytes(8)  # the refused write changed nothing
    await client.close()


async def test_write_over_the_maximum_is_refused_and_its_payload_skipped(
    served: Served,
) -> None:
    client = await connected(served)
    error, _ = await client.call(p.CMD_WRITE, 0, (1 << 20) + 4096, b"\x01" * ((1 << 20) + 4096))
    assert error == p.EINVAL
    await client.write(0, b"ok")
    assert await client.read(0, 2) == b"ok"
    await client.close()


async def test_zero_length_requests_succeed(served: Served) -> None:
    client = await connected(served)
    for cmd in (p.CMD_READ, p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES):
        assert await client.call(cmd, 0, 0) == (0, b"")
    await client.close()


async def test_flush_and_fua_reach_the_backend(served: Served) -> None:
    client = await connected(served)
    assert await client.call(p.CMD_FLUSH) == (0, b"")
    await client.write(0, b"a" * 4096, flags=p.CMD_FLAG_FUA)
    assert served.backend.calls["flush"] == 2
    await client.close()


async def test_pipelined_requests_are_batched_and_ordered(served: Served) -> None:
    client = await connected(served)
    rng = random.Random(3)
    model = bytearray(SIZE)
    expected: dict[int, bytes] = {}
    # many requests on few blocks, sent without waiting: reads must see exactly the writes
    # queued before them, whatever the batching
    for _ in range(400):
        block = rng.randrange(8)
        offset = block * 4096 + rng.randrange(4096 - 512)
        if rng.random() < 0.6:
            data = rng.randbytes(512)
            client.send(p.CMD_WRITE, offset, 512, data)
            model[offset : offset + 512] = data
        else:
            handle = client.send(p.CMD_READ, offset, 512)
            expected[handle] = bytes(model[offset : offset + 512])
    client.send(p.CMD_FLUSH)
    await client.writer.drain()
    for _ in range(401):
        handle, error, data = await client.reply()
        assert error == 0
        if handle in expected:
            assert data == expected.pop(handle)
    assert not expected
    assert served.dispatcher.largest_round > 1  # queue depth became batch size
    await client.close()


@pytest.mark.timeout(30)
async def test_requests_split_anywhere_across_segments(served: Served) -> None:
    # The server parses whole requests out of whatever arrived; headers and payloads cut at
    # any byte (and an oversized write's payload, skipped partly from the same segment) must
    # not change a thing.
    client = await connected(served)
    rng = random.Random(7)
    stream = bytearray()
    model = bytearray(SIZE)
    expected: dict[int, tuple[int, bytes]] = {}  # handle -> (error, read data)
    handle = 0

    def request(cmd: int, offset: int, length: int, data: bytes = b"") -> int:
        nonlocal handle
        handle += 1
        stream.extend(p.REQUEST.pack(p.REQUEST_MAGIC, 0, cmd, handle, offset, length) + data)
        if cmd == p.CMD_READ:
            client._read_lengths[handle] = length
        return handle

    for i in range(60):
        if i == 30:
            big = (1 << 20) + 4096  # over the test server's maximum: EINVAL, payload dropped
            expected[request(p.CMD_WRITE, 0, big, b"\xff" * big)] = (p.EINVAL, b"")
        offset = rng.randrange(16) * 4096 + rng.randrange(2) * 100
        if rng.random() < 0.5:
            data = rng.randbytes(4096)
            expected[request(p.CMD_WRITE, offset, 4096, data)] = (0, b"")
            model[offset : offset + 4096] = data
        else:
            expected[request(p.CMD_READ, offset, 4096)] = (0, bytes(model[offset : offset + 4096]))
    pos = 0
    while pos < len(stream):
        step = rng.choice((1, 3, 27, 28, 29, 500, 4100, 9000, 70000))
        client.writer.write(bytes(stream[pos : pos + step]))
        await client.writer.drain()
        await asyncio.sleep(0)
        pos += step
    while expected:
        got, error, data = await client.reply()
        assert (error, data) == expected.pop(got)
    await client.close()


async def test_disconnect_answers_outstanding_requests_first(served: Served) -> None:
    client = await connected(served)
    handles = {client.send(p.CMD_WRITE, i * 4096, 4096, bytes([i]) * 4096) for i in range(32)}
    client.send(p.CMD_DISC)
    await client.writer.drain()
    for _ in range(32):
        handle, error, _ = await client.reply()
        assert error == 0
        handles.discard(handle)
    assert not handles
    assert await closed(client)
    await client.close()
    assert served.backend.blocks[31] == bytes([31]) * 4096


async def test_two_connections_share_the_export(served: Served) -> None:
    a = await connected(served)
    b = await connected(served)
    await a.write(12345, b"from a")
    assert await b.read(12345, 6) == b"from a"
    await a.close()
    await b.close()


async def test_garbage_in_transmission_hangs_up(served: Served) -> None:
    client = await connected(served)
    client.writer.write(b"\0" * 28)
    await client.writer.drain()
    assert await closed(client)
    await client.close()


async def test_unix_socket_serves_the_same_export(served: Served, tmp_path: Path) -> None:
    path = str(tmp_path / "nbd.sock")
    await served.server.listen_unix(path)
    tcp = await connected(served)
    await tcp.write(4096, b"over tcp")
    client = await RawNbdClient.connect(0, unix=path)
    await client.go(b"tmem")
    assert await client.read(4096, 8) == b"over tcp"
    await client.close()
    await tcp.close()
