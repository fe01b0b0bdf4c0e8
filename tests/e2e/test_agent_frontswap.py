"""Frontswap through a real ``tmem-broker serve``: 100k pages under a small quota, and a
broker killed and restarted mid-run with no page lost."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_agent import Frontswap, TmemClient
from guest_agent.errors import PageUnavailable
from guest_agent.shims import RetryPolicy
from tests.e2e.brokerproc import BrokerProcess

pytestmark = pytest.mark.timeout(600)


def page(type: int, offset: int, version: int) -> bytes:
    # unique per (type, offset, version): a stale or misplaced page cannot pass for the right one
    return struct.pack(">QQQQ", 0x7A6D656D, type, offset, version) * 128


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    with BrokerProcess(tmp_path / "data") as proc:
        yield proc


def guest(broker: BrokerProcess, name: str, cap_pages: int | None) -> str:
    created = broker.json("POST", "/v1/guests", {"name": name, "cap_pages": cap_pages}, expect=201)
    return str(created["token"])


def test_frontswap_100k_pages_with_a_small_quota(broker: BrokerProcess, tmp_path: Path) -> None:
    cap = 20_000
    token = guest(broker, "swapper", cap)
    n = 100_000
    with TmemClient(broker.url, token) as client:
        fs = Frontswap(client, tmp_path / "swap.fallback")
        try:
            fs.init(0)
            fs.init(1)
            assert fs.cap_pages == cap
            in_broker = 0
            # most pages in batches (as a kernel's swap-out clusters would), some one by one
            for start in range(0, 95_000, 4096):
                stop = min(start + 4096, 95_000)
                placed = fs.store_many(0, [(off, page(0, off, 1)) for off in range(start, stop)])
                in_broker += sum(placed)
            for off in range(5_000):
                in_broker += fs.store(1, off, page(1, off, 1))
            # overwrite some pages that live in the broker and some that live in the fallback
            for off in (0, 1, 2, 50_000, 94_999):
                fs.store(0, off, page(0, off, 2))
            assert in_broker == cap
            assert fs.broker_pages == cap and fs.fallback_pages == n - cap
            info = client.self_info()
            assert sum(p.pages for p in info.pools) == cap
            for start in range(0, 95_000, 4096):
                offs = list(range(start, min(start + 4096, 95_000)))
                got = fs.load_many(0, offs)
                for off, data in zip(offs, got, strict=True):
                    version = 2 if off in (0, 1, 2, 50_000, 94_999) else 1
                    assert data == page(0, off, version), off
            for off in range(5_000):
                assert fs.load(1, off) == page(1, off, 1)
            fs.invalidate_area(1)
            fs.invalidate_area(0)
            assert sum(p.pages for p in client.self_info().pools) == 0
        finally:
            fs.close()


def test_broker_killed_and_restarted_mid_run_loses_no_page(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    token = guest(broker, "survivor", None)
    retry = RetryPolicy(attempts=3, backoff=0.05, max_backoff=0.2, down_interval=0.2)
    with TmemClient(broker.url, token, timeout=10) as client:
        fs = Frontswap(client, tmp_path / "swap.fallback", retry=retry)
        try:
            fs.init(0)
            expected: dict[int, bytes] = {}
            for off in range(3000):
                expected[off] = page(0, off, 1)
            assert all(fs.store_many(0, list(expected.items())))
            broker.kill()  # SIGKILL mid-run
            # while it is down: new pages and overwrites go to the fallback...
            for off in range(2500, 3500):
                expected[off] = page(0, off, 2)
                assert fs.store(0, off, expected[off]) is False
            fs.invalidate_page(0, 7)
            del expected[7]
            # ...fallback pages load, broker-only pages fail clearly after the retries
            assert fs.load(0, 3100) == expected[3100]
            with pytest.raises(PageUnavailable):
                fs.load(0, 10)
            broker.start()  # same data dir: the journal brings the persistent pages back
            for off in range(3500):
                if off == 7:
                    with pytest.raises(KeyError):
                        fs.load(0, off)
                    continue
                assert fs.load(0, off) == expected[off], off
            # the stale broker copies of the overwritten/invalidated pages get flushed
            fs.store(0, 5000, page(0, 5000, 1))
            assert sum(p.pages for p in client.self_info().pools) == fs.broker_pages == 2500 - 1 + 1
        finally:
            fs.close()
