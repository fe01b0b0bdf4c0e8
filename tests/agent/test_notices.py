"""NoticeStream (long-poll path) and NoticeHandler against the in-memory broker."""

from __future__ import annotations

import asyncio
import threading

import pytest

from guest_agent import AsyncTmemClient, Frontswap, TmemClient
from guest_agent.errors import BrokerUnavailable
from guest_agent.notices import NoticeHandler, NoticeStream, _ws_url, run_notices
from guest_agent.transport import MockTransport, Request, Response
from schemas.wire import Notice

from .fake_broker import FakeBroker

pytestmark = pytest.mark.timeout(30)


def page(i: int) -> bytes:
    return i.to_bytes(8, "big") * 512


def test_ws_url_keeps_the_base_path_and_scheme() -> None:
    assert _ws_url("http://h:1", 5) == "ws://h:1/v1/notices/ws?after=5"
    assert _ws_url("https://h/tmem/", 0) == "wss://h/tmem/v1/notices/ws?after=0"


async def test_long_poll_stream_resumes_after_outages_without_repeats() -> None:
    broker = FakeBroker()
    broker.add_notice("quota", cap_pages=10)
    broker.add_notice("freeze")
    flaky = {"left": 2}
    polls: list[str] = []

    def handler(request: Request) -> Response:
        polls.append(request.target)
        # every other poll fails: the stream must back off, retry and resume after its seq
        if request.target.startswith("/v1/notices") and flaky["left"] > 0:
            flaky["left"] -= 1
            raise BrokerUnavailable("down for a moment")
        return broker.handle(request)

    client = AsyncTmemClient("http://b", "tok", transport=MockTransport(handler))
    stream = NoticeStream(
        "http://b", "tok", use_websocket=False, poll_wait=0, backoff=0.001, client=client
    )
    got: list[Notice] = []
    async for notice in stream:
        got.append(notice)
        if len(got) == 2:
            broker.add_notice("thaw")
            flaky["left"] = 1
        if len(got) == 3:
            break
    assert [(n.seq, n.type) for n in got] == [(1, "quota"), (2, "freeze"), (3, "thaw")]
    assert stream.last_seq == 3 and stream.transport_in_use == "poll"
    # two failed polls, one answered; then one failed and one answered, resuming after seq 2
    assert [p.split("&")[0] for p in polls] == ["/v1/notices?after=0"] * 3 + [
        "/v1/notices?after=2"
    ] * 2


async def test_handler_answers_a_shed_and_acks_the_pages_returned() -> None:
    broker = FakeBroker()
    client = TmemClient("http://b", "tok", transport=broker.transport())
    fs = Frontswap(client)
    try:
        fs.init(0)
        for i in range(20):
            assert fs.store(0, i, page(i))
        broker.add_notice("quota", cap_pages=12)
        shed_seq = broker.add_notice("shed", pages=8)
        seen: list[tuple[int, int | None]] = []
        handler = NoticeHandler(
            fs,
            use_websocket=False,
            poll_wait=0,
            client=AsyncTmemClient("http://b", "tok", transport=broker.transport()),
            on_notice=lambda n, returned: seen.append((n.seq, returned)),
        )
        task = asyncio.create_task(handler.run())
        while handler.handled < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == [(1, None), (shed_seq, 8)]
        assert broker.acks == [(shed_seq, 8)]
        assert broker.persistent_pages() == 12 and fs.cap_pages == 12
        assert all(fs.load(0, i) == page(i) for i in range(20))
        assert fs.store(0, 100, page(100)) is False  # at the new cap
    finally:
        fs.close()


def test_handler_runs_in_a_thread_beside_the_guest() -> None:
    broker = FakeBroker()
    lock = threading.Lock()

    def handle(request: Request) -> Response:
        with lock:  # the fake is shared by two threads
            return broker.handle(request)

    fs = Frontswap(TmemClient("http://b", "tok", transport=MockTransport(handle)))
    try:
        fs.init(0)
        for i in range(50):
            fs.store(0, i, page(i))
        handler = NoticeHandler(
            fs,
            use_websocket=False,
            poll_wait=0,
            client=AsyncTmemClient("http://b", "tok", transport=MockTransport(handle)),
        )
        handler.start()
        with lock:
            seq = broker.add_notice("shed", pages=30)
        # the guest keeps storing and loading while the shed is answered
        done = threading.Event()
        for round_ in range(200):
            for i in range(50):
                assert fs.load(0, i) == page(i)
            if broker.acks:
                done.set()
                break
            fs.store(0, 50 + round_, page(50 + round_))
            threading.Event().wait(0.01)
        handler.stop()
        assert done.is_set()
        assert broker.acks == [(seq, 30)]
        assert handler.errors == []
    finally:
        fs.close()


async def test_run_notices_is_a_coroutine_for_tasks() -> None:
    broker = FakeBroker()
    fs = Frontswap(TmemClient("http://b", "tok", transport=broker.transport()))
    try:
        fs.init(0)
        broker.add_notice("freeze")
        task = asyncio.create_task(
            run_notices(
                fs,
                use_websocket=False,
                poll_wait=0,
                client=AsyncTmemClient("http://b", "tok", transport=broker.transport()),
            )
        )
        for _ in range(500):
            if fs.store(0, 1, page(1)) is False:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fs.store(0, 2, page(2)) is False  # frozen: not offered to the broker
    finally:
        fs.close()
