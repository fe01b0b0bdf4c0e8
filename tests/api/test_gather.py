"""Batch answers written as their page buffers (``broker.api.gather``): the bytes a client
reads are the encoded results, whether the socket takes them at once or in pieces, and a
borrowed body (``Request.borrow``) parses to the same pages."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator

import pytest

from broker.api.gather import Gathered, write_gathered
from guest_agent import TmemClient
from guest_agent.transport import HTTPTransport, Request
from schemas.batch import (
    BATCH_CONTENT_TYPE,
    OP_GET,
    OP_PUT,
    encode_request,
    encode_results,
    result_parts,
)
from tests.e2e.brokerproc import BrokerProcess

pytestmark = pytest.mark.timeout(180)


def page(i: int) -> bytes:
    return i.to_bytes(8, "big") * 512


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    with BrokerProcess(tmp_path_factory.mktemp("gather") / "data", durability="none") as b:
        yield b


def test_result_parts_join_to_the_encoded_results() -> None:
    results = [(0, page(1)), (1, None), (0, page(2)), (2, None), (0, None)]
    parts, size = result_parts(results)
    assert b"".join(parts) == encode_results(results)
    assert size == len(encode_results(results)) == 5 + 2 * 4096
    assert parts[1] is results[0][1]  # the page itself, not a copy


async def _written(parts: list[bytes], *, queued: bytes = b"", reader_delay: float = 0) -> bytes:
    """What the peer of a real asyncio socket transport reads after ``write_gathered``."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    try:
        if queued:
            transport.pause_reading()
            transport.write(queued)
        total = len(queued) + sum(map(len, parts))
        write_gathered(transport, b"HEAD", Gathered(parts, total - len(queued)))
        if reader_delay:
            await asyncio.sleep(reader_delay)
        got = bytearray()
        while len(got) < total + 4:
            got += await loop.sock_recv(theirs, 1 << 20)
        return bytes(got)
    finally:
        transport.close()
        theirs.close()


@pytest.mark.parametrize("pages", [1, 256, 2100])  # 2100: more buffers than one writev takes
async def test_write_gathered_sends_every_byte_in_order(pages: int) -> None:
    parts = [b"\x00" + page(i) for i in range(pages)]
    got = await _written(parts, reader_delay=0.05)  # the socket fills: the rest is queued
    assert got == b"HEAD" + b"".join(parts)


async def test_write_gathered_behind_queued_bytes_keeps_the_order() -> None:
    parts = [page(i) for i in range(64)]
    # the transport queues what the socket does not take: the gathered write goes behind it
    queued = os.urandom(8 << 20)
    got = await _written(parts, queued=queued, reader_delay=0.05)
    assert got == queued + b"HEAD" + b"".join(parts)


def test_get_many_through_the_served_broker(broker: BrokerProcess) -> None:
    _, token = broker.new_guest("gather")
    with TmemClient(broker.url, token, max_batch_ops=1024) as client:
        pool = client.create_pool("persistent")
        stored = [(i >> 8, i, page(i)) for i in range(1024)]
        assert all(client.put_many(pool, stored))
        handles = [(oid, index) for oid, index, _ in stored] + [(9, 99_999)]
        for _ in range(3):  # a 4 MiB answer, bigger than the socket takes at once
            got = client.get_many(pool, handles)
            assert got[:-1] == [p for _, _, p in stored] and got[-1] is None
            assert all(type(p) is bytes for p in got[:-1])
        # the raw answer is the encoded results, byte for byte
        transport = HTTPTransport(broker.url)
        try:
            ops = [(OP_GET, oid, index, None) for oid, index in handles[-1000:]]
            headers = [("authorization", f"Bearer {token}"), ("content-type", BATCH_CONTENT_TYPE)]
            raw = transport.handle_request(
                Request("POST", f"/v1/pools/{pool}/batch", encode_request(ops), headers)
            )
            expected = encode_results([(0, p) for _, _, p in stored[-999:]] + [(1, None)])
            assert raw.status == 200 and raw.body == expected and raw.view is None
            borrowed = transport.handle_request(
                Request("POST", f"/v1/pools/{pool}/batch", encode_request(ops), headers, True)
            )
            assert borrowed.view is not None and borrowed.view == expected
            # a put batch answers status bytes only (no pages: a plain answer)
            put = encode_request([(OP_PUT, 1, 1, page(5))])
            answer = transport.handle_request(
                Request("POST", f"/v1/pools/{pool}/batch", put, headers)
            )
            assert answer.status == 200 and answer.body == b"\x00"
        finally:
            transport.close()
