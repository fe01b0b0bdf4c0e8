"""TmemClient and AsyncTmemClient against a real broker process: the contract's outcomes,
the error tree, batches past the broker's limit and concurrent tasks on one async client."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from guest_agent import AsyncTmemClient, PutResult, TmemClient
from guest_agent.errors import AuthError, BadRequest, BrokerUnavailable, UnknownPool
from tests.e2e.brokerproc import BrokerProcess, free_port

pytestmark = pytest.mark.timeout(180)


def page(i: int) -> bytes:
    return i.to_bytes(8, "big") * 512


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    with BrokerProcess(tmp_path_factory.mktemp("agent-client") / "data", durability="none") as b:
        yield b


def test_outcomes_and_errors(broker: BrokerProcess) -> None:
    guest_id, token = broker.new_guest("outcomes")
    with TmemClient(broker.url, token) as client:
        pool = client.create_pool("persistent")
        big_oid = (1 << 192) - 1
        assert client.put(pool, big_oid, (1 << 32) - 1, page(1))
        assert client.get(pool, big_oid, (1 << 32) - 1) == page(1)
        assert client.get(pool, 5, 5) is None
        broker.json("POST", f"/v1/guests/{guest_id}/freeze", expect=204)
        declined = client.put(pool, big_oid, (1 << 32) - 1, page(2))
        assert declined == PutResult("frozen")
        # a declined put leaves nothing at the handle, not the old page
        assert client.get(pool, big_oid, (1 << 32) - 1) is None
        broker.json("POST", f"/v1/guests/{guest_id}/thaw", expect=204)
        client.flush_object(pool, big_oid)
        client.destroy_pool(pool)
        client.destroy_pool(pool)  # idempotent
        with pytest.raises(UnknownPool):
            client.get(pool, 1, 1)
        ephemeral = client.create_pool("ephemeral")
        assert client.put(ephemeral, 1, 1, page(3))
        assert client.get(ephemeral, 1, 1) == page(3)
        assert client.get(ephemeral, 1, 1) is None  # exclusive
        info = client.self_info()
        assert info.guest_id == guest_id and [p.kind for p in info.pools] == ["ephemeral"]
        client.report_pressure(psi_some_avg10=2.5, mem_available_bytes=1 << 30)
    with TmemClient(broker.url, "not-a-token") as bad, pytest.raises(AuthError):
        bad.self_info()
    with TmemClient(broker.url, token) as client, pytest.raises(BadRequest):
        client.create_pool("persistent", shared=True, uuid="1f0e0c2a-6f3c-4e55-9b1e-0d7f1f2a3b4c")
    nowhere = TmemClient(f"http://127.0.0.1:{free_port()}", token, timeout=2)
    with nowhere, pytest.raises(BrokerUnavailable):
        nowhere.self_info()


def test_batches_past_the_broker_limit(broker: BrokerProcess) -> None:
    _, token = broker.new_guest("batcher")
    with TmemClient(broker.url, token) as client:
        pool = client.create_pool("persistent")
        items = [(i % 7, i, page(i)) for i in range(3000)]  # three requests of <= 1024 ops
        assert all(client.put_many(pool, items))
        got = client.get_many(pool, [(oid, index) for oid, index, _ in items] + [(99, 0)])
        assert got == [p for _, _, p in items] + [None]
        client.flush_many(pool, [(i % 7, i) for i in range(0, 3000, 2)])
        got = client.get_many(pool, [(i % 7, i) for i in range(3000)])
        assert got == [None if i % 2 == 0 else page(i) for i in range(3000)]
        client.flush_objects(pool, list(range(7)))
        assert client.self_info().pools[0].pages == 0
    # a client configured past the broker's limit gets the whole request refused
    with TmemClient(broker.url, token, max_batch_ops=2000) as client:
        pool = client.create_pool("persistent")
        with pytest.raises(BadRequest):
            client.put_many(pool, [(1, i, page(i)) for i in range(1500)])
        assert client.get_many(pool, [(1, 0)]) == [None]  # nothing was applied


async def test_async_client_shared_by_concurrent_tasks(broker: BrokerProcess) -> None:
    _, token = broker.new_guest("async-tasks")
    async with AsyncTmemClient(broker.url, token, max_connections=3) as client:
        pool = await client.create_pool("persistent")

        async def worker(k: int) -> None:
            for i in range(200):
                assert await client.put(pool, k, i, page(k * 1000 + i))
            pages = await client.get_many(pool, [(k, i) for i in range(200)])
            assert pages == [page(k * 1000 + i) for i in range(200)]

        await asyncio.gather(*(worker(k) for k in range(8)))
        assert (await client.self_info()).pools[0].pages == 1600
        assert await client.get(pool, 3, 199) == page(3199)
        await client.destroy_pool(pool)
