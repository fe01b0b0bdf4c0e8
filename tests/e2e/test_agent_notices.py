"""Notices end to end: a quota change from the admin API reaches a Frontswap over the
WebSocket of a real broker process; a shed (no admin route can make the broker issue one
yet) is injected through the broker's in-process NoticeHub of an app served by uvicorn on a
real socket, and answered by the agent end to end: pages back into the fallback, flushed at
the broker, the ack recorded."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from broker.app import create_app
from broker.settings import Settings
from guest_agent import Frontswap, TmemClient
from guest_agent.notices import NoticeHandler, NoticeStream
from tests.e2e.brokerproc import ADMIN, BrokerProcess, free_port

pytestmark = pytest.mark.timeout(120)


def page(i: int) -> bytes:
    return i.to_bytes(8, "big") * 512


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


def test_quota_notice_reaches_the_frontswap_over_the_websocket(tmp_path: Path) -> None:
    with BrokerProcess(tmp_path / "data") as broker:
        guest_id, token = broker.new_guest("watched")
        with TmemClient(broker.url, token) as client:
            fs = Frontswap(client, tmp_path / "fb")
            handler = NoticeHandler(fs, poll_wait=5)
            try:
                fs.init(0)
                handler.start()
                wait_for(lambda: handler.stream.transport_in_use == "websocket")
                broker.json("PATCH", f"/v1/guests/{guest_id}", {"cap_pages": 3})
                wait_for(lambda: fs.cap_pages == 3)
                assert [fs.store(0, i, page(i)) for i in range(5)] == [True] * 3 + [False] * 2
                assert all(fs.load(0, i) == page(i) for i in range(5))
                broker.json("POST", f"/v1/guests/{guest_id}/freeze", expect=204)
                wait_for(lambda: handler.handled >= 2)
                assert fs.store(0, 9, page(9)) is False
                broker.json("POST", f"/v1/guests/{guest_id}/thaw", expect=204)
                wait_for(lambda: handler.handled >= 3)
                broker.json("PATCH", f"/v1/guests/{guest_id}", {"cap_pages": 100})
                wait_for(lambda: fs.cap_pages == 100)
                assert fs.store(0, 9, page(9)) is True
                assert handler.errors == []
            finally:
                handler.stop()
                fs.close()


async def test_stream_resumes_after_a_broker_restart(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path / "data")
    broker.start()
    try:
        guest_id, token = broker.new_guest("resumer")
        stream = NoticeStream(broker.url, token, backoff=0.05, max_backoff=0.2)
        it = stream.__aiter__()
        try:
            broker.json("POST", f"/v1/guests/{guest_id}/freeze", expect=204)
            first = await asyncio.wait_for(it.__anext__(), 30)
            assert (first.seq, first.type) == (1, "freeze")
            await asyncio.to_thread(broker.kill)
            await asyncio.to_thread(broker.start)
            broker.json("POST", f"/v1/guests/{guest_id}/thaw", expect=204)
            second = await asyncio.wait_for(it.__anext__(), 30)
            # sequence numbers survive the restart; nothing is repeated
            assert (second.seq, second.type) == (2, "thaw")
            assert stream.transport_in_use == "websocket"
        finally:
            await it.aclose()  # type: ignore[attr-defined]
            await stream.aclose()
    finally:
        broker.stop()


class InProcessBroker:
    """The broker app served by uvicorn in a thread, so a test can reach its NoticeHub."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        settings = Settings(port=self.port, data_dir=data_dir, admin_token=ADMIN, durability="none")
        self.app = create_app(settings)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self.server.serve(),), daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> InProcessBroker:
        self.thread.start()
        wait_for(lambda: self.server.started)
        wait_for(lambda: self.service.ready.is_set())
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.loop.close()

    @property
    def service(self) -> Any:
        return self.app.state.box.service

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)


@pytest.fixture
def inproc(tmp_path: Path) -> Iterator[InProcessBroker]:
    with InProcessBroker(tmp_path / "data") as b:
        yield b


def test_shed_injected_through_the_notice_hub_is_answered_end_to_end(
    inproc: InProcessBroker, tmp_path: Path
) -> None:
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", inproc.port, timeout=30)
    conn.request(
        "POST",
        "/v1/guests",
        body=json.dumps({"name": "shedder"}),
        headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
    )
    created = json.loads(conn.getresponse().read())
    conn.close()
    guest_id, token = created["guest_id"], created["token"]
    with TmemClient(inproc.url, token) as client:
        fs = Frontswap(client, tmp_path / "fb")
        acked: list[tuple[int, int | None]] = []
        handler = NoticeHandler(fs, on_notice=lambda n, r: acked.append((n.seq, r)))
        try:
            fs.init(0)
            assert all(fs.store_many(0, [(i, page(i)) for i in range(1000)]))
            handler.start()
            wait_for(lambda: handler.stream.transport_in_use == "websocket")
            notice = inproc.run(inproc.service.hub.publish(guest_id, "shed", pages=300))
            wait_for(lambda: bool(acked))
            assert acked == [(notice.seq, 300)]
            # the pages left the broker, went home to the fallback, and all still load
            assert sum(p.pages for p in client.self_info().pools) == 700
            assert fs.fallback_pages == 300 and fs.broker_pages == 700
            assert fs.load_many(0, list(range(1000))) == [page(i) for i in range(1000)]
            records = inproc.service.repo.notices_after(guest_id, 0)
            shed = next(r for r in records if r.seq == notice.seq)
            assert shed.pages_returned == 300 and shed.acked_at is not None
            assert handler.errors == []
        finally:
            handler.stop()
            fs.close()
