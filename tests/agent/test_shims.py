"""Frontswap and Cleancache over the in-memory broker: declines, outages, stale copies."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from guest_agent import Cleancache, Frontswap, TmemClient
from guest_agent.errors import NotInitialised, PageUnavailable, ProtocolError
from guest_agent.shims import RetryPolicy, frontswap_handle
from guest_agent.transport import MockTransport, Response
from schemas.batch import OP_FLUSH_PAGE, OP_GET, decode_request
from schemas.wire import Notice

from .fake_broker import FakeBroker

pytestmark = pytest.mark.timeout(60)


def page(type: int, offset: int, version: int = 0) -> bytes:
    return (type.to_bytes(4, "big") + offset.to_bytes(4, "big") + version.to_bytes(8, "big")) * 256


class Clock:
    """Manual time: sleeping advances it, so retry backoff costs no wall-clock time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


_OPEN: list[Frontswap] = []


@pytest.fixture(autouse=True)
def _close_fallbacks() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def make(
    broker: FakeBroker, *, retry: RetryPolicy | None = None, max_batch_ops: int = 64
) -> tuple[Frontswap, Clock]:
    clock = Clock()
    client = TmemClient(
        "http://b", "tok", transport=broker.transport(), max_batch_ops=max_batch_ops
    )
    fs = Frontswap(client, None, retry=retry, sleep=clock.sleep, clock=clock)
    _OPEN.append(fs)
    return fs, clock


def notice(type: str, seq: int = 1, **fields: object) -> Notice:
    return Notice.model_validate(
        {"seq": seq, "type": type, "issued_at": datetime.now(UTC), **fields}
    )


def test_xen_handle_mapping() -> None:
    assert frontswap_handle(0, 0) == (0, 0)
    assert frontswap_handle(1, 0x123) == ((1 << 4) | 3, 0x12)
    assert frontswap_handle(3, 2**36 - 1) == ((3 << 4) | 0xF, 2**32 - 1)


def test_round_trip_with_a_quota_spills_to_the_fallback() -> None:
    broker = FakeBroker(cap_pages=100)
    fs, _ = make(broker)
    fs.init(0)
    fs.init(1)
    where = [fs.store(t, off, page(t, off)) for t in (0, 1) for off in range(150)]
    assert sum(where) == 100  # the shim stops offering once at its cap
    assert fs.cap_pages == 100
    assert broker.persistent_pages() == 100 and fs.fallback_pages == 200
    for t in (0, 1):
        for off in range(150):
            assert fs.load(t, off) == page(t, off)
    with pytest.raises(KeyError):
        fs.load(0, 10_000)
    with pytest.raises(NotInitialised):
        fs.store(7, 0, page(7, 0))


def test_declines_are_honoured_even_without_a_known_cap() -> None:
    broker = FakeBroker(capacity_pages=10)
    fs, _ = make(broker)
    fs.init(0)
    assert [fs.store(0, i, page(0, i)) for i in range(12)] == [True] * 10 + [False] * 2
    assert fs.stats["declined"] == 2
    assert all(fs.load(0, i) == page(0, i) for i in range(12))
    # A broker page overwritten while the broker is full: the new version is what loads.
    broker.frozen = True
    assert fs.store(0, 3, page(0, 3, 1)) is False
    assert fs.where(0, 3) == "fallback"
    assert fs.load(0, 3) == page(0, 3, 1)


def test_quota_decline_stops_offering_until_pages_are_freed() -> None:
    broker = FakeBroker()
    fs, _ = make(broker)
    fs.init(0)
    for i in range(5):
        assert fs.store(0, i, page(0, i))
    broker.cap_pages = 5
    assert fs.store(0, 5, page(0, 5)) is False  # declined with quota
    sent = len(broker.requests)
    assert fs.store(0, 6, page(0, 6)) is False  # not even offered
    assert len(broker.requests) == sent
    fs.invalidate_page(0, 0)
    assert broker.persistent_pages() == 4
    assert fs.store(0, 7, page(0, 7)) is True


def test_quota_and_freeze_notices() -> None:
    broker = FakeBroker()
    fs, _ = make(broker)
    fs.init(0)
    assert fs.handle_notice(notice("quota", cap_pages=2)) is None
    assert [fs.store(0, i, page(0, i)) for i in range(3)] == [True, True, False]
    fs.handle_notice(notice("quota", cap_pages=10))
    fs.handle_notice(notice("freeze"))
    assert fs.store(0, 9, page(0, 9)) is False
    fs.handle_notice(notice("thaw"))
    assert fs.store(0, 9, page(0, 9)) is True
    fs.handle_notice(notice("evicted"))


def test_shed_moves_the_oldest_pages_home_and_flushes_them() -> None:
    broker = FakeBroker()
    fs, _ = make(broker, max_batch_ops=4)
    fs.init(0)
    for i in range(10):
        fs.store(0, i, page(0, i))
    assert fs.handle_notice(notice("shed", pages=6)) == 6
    assert broker.persistent_pages() == 4
    assert [fs.where(0, i) for i in range(10)] == ["fallback"] * 6 + ["broker"] * 4
    assert all(fs.load(0, i) == page(0, i) for i in range(10))
    assert fs.shed(100) == 4
    assert broker.persistent_pages() == 0 and fs.shed(1) == 0


def test_shed_takes_back_the_pages_the_broker_names_coldest_first() -> None:
    broker = FakeBroker()
    fs, _ = make(broker, max_batch_ops=4)
    fs.init(0)
    for i in range(10):
        fs.store(0, i, page(0, i))
    # the guest reads its oldest pages again: the broker's coldest are now 5..9 (last access)
    assert [fs.load(0, i) for i in range(5)] == [page(0, i) for i in range(5)]
    assert fs.shed(3) == 3
    assert [fs.where(0, i) for i in range(10)] == ["broker"] * 5 + ["fallback"] * 3 + ["broker"] * 2
    assert ("GET", "/v1/self/shed-candidates") in broker.requests
    # a broker that cannot name pages (an older one: 404): the oldest stored go first
    real = broker.handle

    def older(request: Any) -> Any:
        if "shed-candidates" in request.target:
            return Response(404, b'{"error": {"code": "not_found", "message": "no"}}', {})
        return real(request)

    fs.client = TmemClient("http://b", "tok", transport=MockTransport(older), max_batch_ops=4)
    assert fs.shed(2) == 2
    assert [fs.where(0, i) for i in range(2)] == ["fallback"] * 2
    assert all(fs.load(0, i) == page(0, i) for i in range(10))


def test_shed_syncs_the_fallback_before_the_broker_flushes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = FakeBroker()
    fs, _ = make(broker, max_batch_ops=4)
    fs.init(0)
    for i in range(6):
        fs.store(0, i, page(0, i))
    order: list[str] = []
    real_sync = fs.fallback.sync
    monkeypatch.setattr(fs.fallback, "sync", lambda: (order.append("sync"), real_sync())[1])
    real_handle = broker.handle

    def handle(request: Any) -> Any:
        if request.method == "POST" and request.target.endswith("/batch"):
            op = decode_request(request.body, 1024)[0][0]
            order.append("flush" if op == OP_FLUSH_PAGE else "get" if op == OP_GET else str(op))
        return real_handle(request)

    monkeypatch.setattr(broker, "handle", handle)
    client = TmemClient("http://b", "tok", transport=broker.transport(), max_batch_ops=4)
    fs.client = client
    assert fs.shed(6) == 6
    # per batch of 4: the pages are fetched, synced in the fallback, and only then flushed
    assert order == ["get", "sync", "flush", "get", "sync", "flush"]
    assert all(fs.load(0, i) == page(0, i) for i in range(6))


def test_unreachable_broker_stores_locally_and_loads_fail_only_after_retries() -> None:
    broker = FakeBroker()
    retry = RetryPolicy(attempts=4, backoff=0.1, multiplier=2, max_backoff=0.25, down_interval=1)
    fs, clock = make(broker, retry=retry)
    fs.init(0)
    for i in range(4):
        assert fs.store(0, i, page(0, i))
    broker.down = True
    assert fs.store(0, 10, page(0, 10)) is False  # goes to the fallback
    assert fs.load(0, 10) == page(0, 10)
    with pytest.raises(PageUnavailable, match="4 attempts"):
        fs.load(0, 1)
    assert clock.sleeps == [0.1, 0.2, 0.25]
    broker.down = False
    assert fs.load(0, 1) == page(0, 1)  # back: the page was never lost
    assert fs.load_many(0, [0, 1, 2, 3, 10, 99]) == [page(0, i) for i in (0, 1, 2, 3, 10)] + [None]


def test_a_page_overwritten_during_an_outage_never_comes_back_stale() -> None:
    broker = FakeBroker()
    fs, clock = make(broker)
    fs.init(0)
    fs.store(0, 5, page(0, 5, 1))
    fs.store(0, 6, page(0, 6, 1))
    broker.down = True
    assert fs.store(0, 5, page(0, 5, 2)) is False
    fs.invalidate_page(0, 6)
    broker.down = False
    # the map points at the fallback: the broker's version 1 is never read
    assert fs.load(0, 5) == page(0, 5, 2)
    with pytest.raises(KeyError):
        fs.load(0, 6)
    assert fs.broker_pages == 2  # two stale copies still charged to the guest
    clock.now += 10  # past the down interval: the next operation flushes them
    fs.store(0, 7, page(0, 7))
    pool = broker.pools[fs.pool_id or 0]
    assert frontswap_handle(0, 5) not in pool.pages
    assert frontswap_handle(0, 6) not in pool.pages
    assert fs.broker_pages == 1


def test_a_put_answered_with_garbage_goes_to_the_fallback_and_its_copy_is_flushed() -> None:
    broker = FakeBroker()
    fs, _ = make(broker)
    fs.init(0)
    garble = True
    real_handle = broker.handle

    def handle(request: Any) -> Any:
        response = real_handle(request)  # the broker applies the request ...
        if garble and request.method == "PUT":
            raise ProtocolError("an answer that is not HTTP")  # ... the answer is lost
        return response

    broker.handle = handle  # type: ignore[method-assign]
    fs.client = TmemClient("http://b", "tok", transport=broker.transport())
    assert fs.store(0, 1, page(0, 1)) is False  # kept, in the fallback
    assert fs.where(0, 1) == "fallback" and fs.load(0, 1) == page(0, 1)
    assert broker.persistent_pages() == 1 and fs.broker_pages == 1  # a stale copy, counted
    garble = False
    assert fs.store(0, 2, page(0, 2)) is True  # the next store flushes the stale copy first
    assert broker.persistent_pages() == 1 and fs.load(0, 1) == page(0, 1)


def test_a_refused_batch_leaves_only_older_copies_stale() -> None:
    broker = FakeBroker()
    fs, _ = make(broker)
    fs.init(0)
    fs.store(0, 1, page(0, 1))
    refuse = True
    real_handle = broker.handle

    def handle(request: Any) -> Any:
        if refuse and request.target.endswith("/batch"):
            return Response(400, b'{"error": {"code": "bad_batch", "message": "no"}}')
        return real_handle(request)

    broker.handle = handle  # type: ignore[method-assign]
    fs.client = TmemClient("http://b", "tok", transport=broker.transport())
    assert fs.store_many(0, [(1, page(0, 1, 1)), (2, page(0, 2))]) == [False, False]
    # the refusal changed nothing: offset 1's old broker copy is stale, offset 2 never landed
    assert fs.broker_pages == 1 and broker.persistent_pages() == 1
    assert fs.load_many(0, [1, 2]) == [page(0, 1, 1), page(0, 2)]
    refuse = False
    assert fs.store(0, 3, page(0, 3)) is True  # the next store flushes the stale copy first
    assert broker.persistent_pages() == 1 and fs.broker_pages == 1
    assert fs.load_many(0, [1, 2, 3]) == [page(0, 1, 1), page(0, 2), page(0, 3)]


def test_a_broker_that_lost_a_persistent_page_is_an_error_not_a_silent_miss() -> None:
    broker = FakeBroker()
    fs, _ = make(broker)
    fs.init(0)
    fs.store(0, 1, page(0, 1))
    broker.pools[fs.pool_id or 0].pages.clear()
    with pytest.raises(PageUnavailable, match="lost"):
        fs.load(0, 1)


def test_invalidate_area_flushes_every_object_of_the_type() -> None:
    broker = FakeBroker(capacity_pages=20)
    fs, _ = make(broker)
    fs.init(0)
    fs.init(1)
    for i in range(15):
        fs.store(0, i, page(0, i))
        fs.store(1, i, page(1, i))
    fs.invalidate_area(0)
    assert all(k[0] >> 4 == 1 for k in broker.pools[fs.pool_id or 0].pages)
    assert fs.load_many(0, list(range(15))) == [None] * 15
    assert fs.load_many(1, list(range(15))) == [page(1, i) for i in range(15)]
    with pytest.raises(NotInitialised):
        fs.store(0, 1, page(0, 1))


def test_store_many_and_load_many() -> None:
    broker = FakeBroker(cap_pages=50)
    fs, _ = make(broker, max_batch_ops=16)
    fs.init(2)
    items = [(i, page(2, i)) for i in range(80)]
    placed = fs.store_many(2, items)
    assert sum(placed) == 50 and broker.persistent_pages() == 50
    assert fs.load_many(2, list(range(80))) == [p for _, p in items]
    # repeated offsets in one call: the last copy wins, as with sequential stores
    assert fs.store_many(2, [(0, page(2, 0, 1)), (0, page(2, 0, 2))]) in (
        [True, True],
        [False, False],
    )
    assert fs.load(2, 0) == page(2, 0, 2)
    broker.down = True
    assert fs.store_many(2, [(1, page(2, 1, 3)), (200, page(2, 200))]) == [False, False]
    broker.down = False
    assert fs.load_many(2, [1, 200]) == [page(2, 1, 3), page(2, 200)]


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_match_a_dict_model(seed: int) -> None:
    """Random stores, loads, invalidations, sheds, quota changes and outages: every load
    returns the last stored bytes or, while the broker is down, raises PageUnavailable."""
    rng = random.Random(seed)
    broker = FakeBroker(cap_pages=rng.choice([None, 20, 60]), capacity_pages=rng.choice([None, 80]))
    fs, clock = make(broker, retry=RetryPolicy(attempts=2, backoff=0.01), max_batch_ops=8)
    model: dict[tuple[int, int], bytes] = {}
    for t in (0, 1):
        fs.init(t)
    for step in range(1500):
        clock.now += 0.05
        r = rng.random()
        t, off = rng.randrange(2), rng.randrange(120)
        if r < 0.35:
            data = page(t, off, step)
            fs.store(t, off, data)
            model[(t, off)] = data
        elif r < 0.45:
            offs = [rng.randrange(120) for _ in range(rng.randrange(1, 20))]
            pairs = [(o, page(t, o, step * 100 + j)) for j, o in enumerate(offs)]
            fs.store_many(t, pairs)
            for o, data in pairs:
                model[(t, o)] = data
        elif r < 0.7:
            try:
                got = fs.load(t, off)
            except KeyError:
                assert (t, off) not in model
            except PageUnavailable:
                assert broker.down and fs.where(t, off) == "broker"
            else:
                assert got == model[(t, off)]
        elif r < 0.78:
            offs = [rng.randrange(120) for _ in range(10)]
            try:
                pages = fs.load_many(t, offs)
            except PageUnavailable:
                assert broker.down
            else:
                assert pages == [model.get((t, o)) for o in offs]
        elif r < 0.86:
            fs.invalidate_page(t, off)
            model.pop((t, off), None)
        elif r < 0.9:
            fs.shed(rng.randrange(1, 30))
        elif r < 0.93:
            broker.down = not broker.down
        elif r < 0.95:
            cap = rng.choice([10, 40, 100])
            broker.cap_pages = cap
            fs.handle_notice(notice("quota", cap_pages=cap))
        elif r < 0.96:
            broker.frozen = not broker.frozen
        elif r < 0.965:
            fs.invalidate_area(t)
            for key in [k for k in model if k[0] == t]:
                del model[key]
            fs.init(t)
    broker.down = False
    broker.frozen = False
    for (t, off), data in model.items():
        assert fs.load(t, off) == data
    for t in (0, 1):
        got = fs.load_many(t, list(range(120)))
        assert got == [model.get((t, o)) for o in range(120)]
    # after the outage, stale copies are flushed and never outnumber what the guest holds
    clock.now += 100
    fs.store(0, 0, page(0, 0, 1))
    assert broker.persistent_pages() == fs.broker_pages


def test_cleancache_round_trip_and_exclusive_gets() -> None:
    broker = FakeBroker()
    client = TmemClient("http://b", "tok", transport=broker.transport())
    cc = Cleancache(client)
    pool = cc.init_fs()
    key = b"\x01" * 24
    assert cc.put_page(pool, key, 0, page(9, 0))
    assert cc.put_page(pool, 77, 1, page(9, 1))
    assert cc.get_page(pool, key, 0) == page(9, 0)
    assert cc.get_page(pool, key, 0) is None  # exclusive: the hit took it
    cc.put_page(pool, 77, 2, page(9, 2))
    cc.invalidate_page(pool, 77, 1)
    assert cc.get_page(pool, 77, 1) is None
    cc.invalidate_inode(pool, 77)
    assert cc.get_page(pool, 77, 2) is None
    shared = cc.init_shared_fs("0b8a7a4e-5a5c-4c43-9a47-8c9d6c1b2a11")
    assert cc.init_shared_fs("0b8a7a4e-5a5c-4c43-9a47-8c9d6c1b2a11") == shared
    cc.put_page(shared, 5, 5, page(5, 5))
    assert cc.get_page(shared, 5, 5) == page(5, 5)
    assert cc.get_page(shared, 5, 5) == page(5, 5)  # shared pools are never exclusive
    cc.invalidate_fs(shared)
    assert shared not in broker.pools
    with pytest.raises(ValueError):
        cc.put_page(pool, b"x" * 25, 0, page(0, 0))


def test_cleancache_outage_never_serves_an_old_copy() -> None:
    broker = FakeBroker()
    client = TmemClient("http://b", "tok", transport=broker.transport())
    cc = Cleancache(client)
    pool = cc.init_fs()
    shared = cc.init_shared_fs("0b8a7a4e-5a5c-4c43-9a47-8c9d6c1b2a11")
    cc.put_page(shared, 1, 1, page(1, 1, 1))
    cc.put_page(shared, 2, 1, page(2, 1, 1))
    broker.down = True
    assert cc.put_page(shared, 1, 1, page(1, 1, 2)) is False  # may or may not have landed
    cc.invalidate_inode(shared, 2)
    assert cc.get_page(shared, 1, 1) is None
    broker.down = False
    assert cc.get_page(shared, 1, 1) is None  # the old version 1 is flushed, not returned
    assert cc.get_page(shared, 2, 1) is None
    assert broker.pools[shared].pages == {}
    cc.put_page(pool, 3, 3, page(3, 3))
    broker.down = True
    cc.invalidate_fs(pool)
    assert cc.get_page(pool, 3, 3) is None
    broker.down = False
    assert cc.put_page(pool, 3, 3, page(3, 3)) is False
    assert pool not in broker.pools


def test_close_destroys_the_pool_unless_asked_not_to() -> None:
    broker = FakeBroker()
    fs, _ = make(broker)
    fs.init(0)
    fs.store(0, 1, page(0, 1))
    pool = fs.pool_id
    _OPEN.remove(fs)
    fs.close()
    assert pool not in broker.pools
    kept, _ = make(broker)
    kept.init(0)
    kept.store(0, 1, page(0, 1))
    _OPEN.remove(kept)
    broker.down = True
    kept.close()  # unreachable: best effort, no error
    broker.down = False
    assert kept.pool_id in broker.pools
    other, _ = make(broker)
    other.init(0)
    _OPEN.remove(other)
    other.close(destroy_pool=False)
    assert other.pool_id in broker.pools


def test_frontswap_invalidate_many_forgets_broker_and_fallback_copies() -> None:
    broker = FakeBroker(cap_pages=4)
    fs, _ = make(broker)
    fs.init(0)
    placed = fs.store_many(0, [(i, page(0, i)) for i in range(8)])
    assert sum(placed) == 4  # the rest went to the fallback file
    fs.invalidate_many(0, [0, 1, 6, 7, 99])
    assert broker.persistent_pages() == sum(placed[2:6])
    assert fs.load_many(0, list(range(8))) == [None, None] + [page(0, i) for i in range(2, 6)] + [
        None,
        None,
    ]


def test_cleancache_batches_match_the_per_page_calls() -> None:
    broker = FakeBroker()
    client = TmemClient("http://b", "tok", transport=broker.transport(), max_batch_ops=3)
    cc = Cleancache(client)
    pool = cc.init_fs()
    items = [(7, i, page(7, i)) for i in range(5)] + [(b"\x02" * 24, 0, page(8, 0))]
    assert cc.put_many(pool, items) == [None] * 6
    got = cc.get_many(pool, [(7, 0), (7, 4), (7, 9), (b"\x02" * 24, 0)])
    assert got == [page(7, 0), page(7, 4), None, page(8, 0)]
    assert cc.get_many(pool, [(7, 0)]) == [None]  # private pool: hits were exclusive
    broker.down = True
    assert cc.put_many(pool, [(7, 1, page(7, 1, 1))]) == ["unreachable"]
    broker.down = False
    # the copy whose fate was unknown is flushed before anything is read again
    assert cc.get_many(pool, [(7, 1)]) == [None]
