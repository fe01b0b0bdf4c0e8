"""LeaseManager against the real PostgreSQL (a fresh database per test): acquire, renew,
release, epochs bumped on every change of holder, moves, takeover of a dead broker's guests
spread over the live ones, and races between brokers for the same guest."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, text

from broker.cluster.leases import LeaseManager, UnknownBroker, rendezvous
from broker.core.errors import UnknownGuest
from broker.db.engine import make_engine, upgrade
from tests.db.pg import temp_database

pytestmark = pytest.mark.postgres

LEASE = 0.6  # seconds: short, so expiry is waited for in tests, never timed


@pytest.fixture
def engine() -> Iterator[Engine]:
    with temp_database() as url:
        upgrade(url)
        eng = make_engine(url)
        try:
            yield eng
        finally:
            eng.dispose()


def _guests(engine: Engine, n: int) -> list[int]:
    ids = []
    with engine.begin() as conn:
        for i in range(n):
            ids.append(
                conn.execute(
                    text(
                        "INSERT INTO guests (name, token_hash, weight, dedup_domain, frozen, "
                        "notice_seq, created_at) VALUES (:n, :t, 100, 'default', false, 0, :c) "
                        "RETURNING id"
                    ),
                    {"n": f"g{i}", "t": bytes([i]) * 32, "c": datetime.now(UTC)},
                ).scalar_one()
            )
    return ids


def _manager(engine: Engine, name: str, grace_s: float = 0.0) -> LeaseManager:
    """A broker whose leases are taken as soon as they run out (``grace_s`` 0), unless told."""
    m = LeaseManager(engine, name, f"http://{name}:8470", lease_s=LEASE, grace_s=grace_s)
    m.register()
    return m


def _wait_expired(m: LeaseManager, guest_id: int) -> None:
    deadline = time.monotonic() + 10
    while m.home(guest_id).live:
        assert time.monotonic() < deadline, "the lease never ran out"
        time.sleep(0.05)


def test_sqlite_is_refused(tmp_path: object) -> None:
    eng = make_engine(f"sqlite:///{tmp_path}/x.sqlite3")
    with pytest.raises(ValueError, match="PostgreSQL"):
        LeaseManager(eng, "b1", "http://b1")
    eng.dispose()


def test_acquire_renew_release_and_epochs(engine: Engine) -> None:
    (g,) = _guests(engine, 1)
    a, b = _manager(engine, "a"), _manager(engine, "b")
    first = a.acquire(g)
    assert first is not None and first.broker_id == "a" and first.epoch == 1
    # renewing by the holder keeps the epoch; another broker cannot take a live lease
    again = a.acquire(g)
    assert again is not None and again.epoch == 1
    assert b.acquire(g) is None
    assert a.home(g).broker_id == "a" and a.home(g).url == "http://a:8470"
    # a release frees it; the next holder bumps the epoch
    assert a.release(g)
    assert not b.release(g)  # not b's to release
    taken = b.acquire(g)
    assert taken is not None and taken.broker_id == "b" and taken.epoch == 2
    # and back: every change of holder bumps it
    assert b.release(g)
    back = a.acquire(g)
    assert back is not None and back.epoch == 3


def test_unknown_guest(engine: Engine) -> None:
    a = _manager(engine, "a")
    with pytest.raises(UnknownGuest):
        a.acquire(999)
    with pytest.raises(UnknownGuest):
        a.move(999, "a")


def test_heartbeat_renews_and_reports_lost_leases(engine: Engine) -> None:
    g1, g2 = _guests(engine, 2)
    a, b = _manager(engine, "a"), _manager(engine, "b")
    assert a.acquire(g1) and a.acquire(g2)
    assert [x.guest_id for x in a.heartbeat({"pages": 3})] == [g1, g2]
    # an admin moves g2 to b: a's next heartbeat no longer holds it, and the epoch grew
    moved = a.move(g2, "b")
    assert moved.broker_id == "b" and moved.epoch == 2
    assert [x.guest_id for x in a.heartbeat()] == [g1]
    assert [x.guest_id for x in b.heartbeat()] == [g2]
    # figures published with the heartbeat are kept; a heartbeat without keeps the last ones
    infos = {i.broker_id: i for i in a.brokers()}
    assert infos["a"].figures == {"pages": 3} and infos["a"].alive
    with pytest.raises(UnknownBroker):
        a.move(g1, "nobody")


def test_expired_lease_is_taken_with_a_higher_epoch(engine: Engine) -> None:
    (g,) = _guests(engine, 1)
    a, b = _manager(engine, "a"), _manager(engine, "b")
    assert a.acquire(g) is not None
    _wait_expired(b, g)  # a stopped beating (paused, dead)
    lease = b.acquire(g)
    assert lease is not None and lease.broker_id == "b" and lease.epoch == 2
    # a wakes up: its heartbeat no longer returns g, and it cannot renew it by acquiring
    assert a.heartbeat() == []
    assert a.acquire(g) is None


def test_a_late_heartbeat_keeps_the_guests_within_the_grace_time(engine: Engine) -> None:
    """Issue #18: a home whose heartbeat is late (its lease ran out a moment ago) is not dead:
    the other broker leaves its guests alone during the grace time, whether by its loop
    (take_over) or on a guest's request (acquire), and the late heartbeat renews them at the
    same epoch. Without the grace the guests flipped to the other broker and back."""
    guests = _guests(engine, 6)
    a = _manager(engine, "a", grace_s=600.0)
    b = _manager(engine, "b", grace_s=600.0)
    for g in guests:
        assert a.acquire(g) is not None
    _wait_expired(b, guests[-1])  # a's heartbeat is late: every lease of a has run out
    b.heartbeat()
    assert b.take_over() == []
    assert all(b.acquire(g) is None for g in guests)
    assert {lease.guest_id: lease.epoch for lease in a.heartbeat()} == dict.fromkeys(guests, 1)
    # past the grace time a really is dead: a broker with a short grace takes its guests
    _wait_expired(b, guests[-1])
    c = _manager(engine, "c", grace_s=0.0)
    assert {lease.guest_id for lease in c.take_over()} == set(guests)
    assert {lease.epoch for lease in c.heartbeat()} == {2}


def test_grace_time_defaults_to_half_the_lease(engine: Engine) -> None:
    m = LeaseManager(engine, "d", "http://d:8470", lease_s=4.0)
    assert m.grace.total_seconds() == 2.0
    with pytest.raises(ValueError, match="grace"):
        LeaseManager(engine, "d", "http://d:8470", lease_s=4.0, grace_s=-1.0)


def test_takeover_spreads_a_dead_brokers_guests_over_the_live_ones(engine: Engine) -> None:
    guests = _guests(engine, 40)
    dead, b, c = (_manager(engine, n) for n in ("dead", "b", "c"))
    for g in guests:
        assert dead.acquire(g) is not None
    # dead stops beating; b and c keep beating until its leases run out
    deadline = time.monotonic() + 10
    while any(h.live for h in b.homes().values()):
        b.heartbeat()
        c.heartbeat()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    b.heartbeat()
    c.heartbeat()
    won_b = {lease.guest_id for lease in b.take_over()}
    won_c = {lease.guest_id for lease in c.take_over()}
    assert won_b | won_c == set(guests) and not won_b & won_c
    # rendezvous hashing over two brokers: both get a share (40 guests: never all on one)
    assert won_b and won_c
    assert all(lease.epoch == 2 for lease in b.heartbeat() + c.heartbeat())
    # every guest went where rendezvous puts it among the live brokers
    for g in guests:
        assert b.home(g).broker_id == rendezvous(g, ["b", "c"])


def test_new_and_released_guests_are_orphans_taken_at_once(engine: Engine) -> None:
    guests = _guests(engine, 6)
    a = _manager(engine, "a")
    assert {lease.guest_id for lease in a.take_over()} == set(guests)
    a.leave()
    b = _manager(engine, "b")
    won = b.take_over()
    # a left cleanly: its guests are free at once (no lease to wait out), epoch 2
    assert {lease.guest_id for lease in won} == set(guests)
    assert {lease.epoch for lease in won} == {2}
    assert [i.broker_id for i in b.brokers() if i.alive] == ["b"]


def test_a_broker_that_left_is_dead_to_brokers_with_a_longer_lease(engine: Engine) -> None:
    """Each broker judges liveness with its own lease: one that stopped cleanly must look
    dead to all, or a broker with a longer lease spreads orphans to it (rendezvous over the
    "live" ones) until its old heartbeat ages past that lease."""
    guests = _guests(engine, 6)
    short = _manager(engine, "a")  # LEASE
    short.take_over()
    short.leave()
    long = LeaseManager(engine, "b", "http://b:8470", lease_s=30.0)
    long.register()
    assert long.live_brokers() == ["b"]
    assert {lease.guest_id for lease in long.take_over()} == set(guests)


def test_racing_brokers_never_both_win(engine: Engine) -> None:
    guests = _guests(engine, 30)
    managers = [_manager(engine, f"r{i}") for i in range(4)]
    wins: dict[int, list[str]] = {g: [] for g in guests}
    lock = threading.Lock()
    start = threading.Barrier(len(managers))

    def race(m: LeaseManager) -> None:
        start.wait()
        for g in guests:
            lease = m.acquire(g)
            if lease is not None and lease.epoch == 1:
                with lock:
                    wins[g].append(m.broker_id)

    threads = [threading.Thread(target=race, args=(m,)) for m in managers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # exactly one broker won each guest, at epoch 1, and it is the one the table names
    for g, winners in wins.items():
        assert len(winners) == 1, (g, winners)
        assert managers[0].home(g).broker_id == winners[0]


def test_rendezvous_moves_only_the_dead_brokers_share() -> None:
    before = {g: rendezvous(g, ["a", "b", "c"]) for g in range(300)}
    after = {g: rendezvous(g, ["a", "b"]) for g in range(300)}
    for g, home in before.items():
        if home != "c":
            assert after[g] == home  # guests of live brokers stay where they are
    assert rendezvous(1, []) is None
