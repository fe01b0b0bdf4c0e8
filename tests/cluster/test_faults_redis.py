"""Redis faults under load, each ending with the audit: every acknowledged persistent page
reads back byte-exact, reference counts match the handle maps, no leak after collection.

Each test takes a private cluster (it kills, stops or reshards nodes). The engines stand for
brokers; ``ClusterUnavailable`` is the 503 a guest would get (nothing acknowledged).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from broker.cluster.collector import Collector
from broker.cluster.engine import ClusterEngine
from broker.cluster.errors import ClusterUnavailable
from broker.cluster.redis_store import ref_of, with_tail
from broker.cluster.redis_tables import HIT
from schemas.batch import OP_PUT, STATUS_DONE
from tests.cluster.conftest import RedisClusterFactory
from tests.cluster.engines import add_guest, audit, make_engine
from tests.cluster.redis_proc import RedisClusterProc

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]  # failovers take seconds each

GUEST = 7


class Load:
    """Batches of puts to one guest, remembering what was acknowledged."""

    def __init__(self, engine: ClusterEngine, pool: int) -> None:
        self.engine = engine
        self.pool = pool
        self.acked: dict[tuple[int, int], bytes] = {}
        # a failed put leaves its handle either as acknowledged before or as the new page
        self.maybe: dict[tuple[int, int], set[bytes]] = {}
        self.failed = 0
        self.last_error: Exception | None = None
        self.done = 0
        self.n = 0

    def batch(self, size: int = 16) -> bool:
        ops = []
        for _ in range(size):
            self.n += 1
            handle = (self.n % 97, self.n % 13)
            data = os.urandom(4096) if self.n % 3 else (b"%d" % (self.n % 5)).ljust(4096, b".")
            ops.append((OP_PUT, handle[0], handle[1], data))
        try:
            res = self.engine.batch(GUEST, self.pool, ops)
        except ClusterUnavailable as exc:
            self.last_error = exc
            self.failed += 1
            for _op, oid, index, data in ops:
                self.maybe.setdefault((oid, index), set()).add(data)
            return False
        for (_op, oid, index, data), (status, _page) in zip(ops, res, strict=True):
            assert status == STATUS_DONE
            self.acked[(oid, index)] = data
            self.maybe.pop((oid, index), None)
        self.done += 1
        return True

    def check(self, engine: ClusterEngine | None = None) -> None:
        """Every acknowledged page reads back (or a later unacknowledged put's page)."""
        engine = engine or self.engine
        for (oid, index), data in self.acked.items():
            got = engine.get(GUEST, self.pool, oid, index)
            assert got == data or got in self.maybe.get((oid, index), ()), (oid, index)


def _settle_and_audit(proc: RedisClusterProc, load: Load, seeds: list[str], ns: str) -> None:
    """Retry until puts work again, read everything through a fresh broker, collect, audit."""
    proc.wait_ok()
    for _ in range(100):
        if load.batch():
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"puts never came back after the fault: {load.last_error}")
    fresh = make_engine(seeds, ns, "b-audit")
    try:
        add_guest(fresh, GUEST)
        fresh.adopt(GUEST, 99)  # another broker takes the guest: its view is Redis's
        load.check(fresh)
        collector = Collector(fresh.pages)
        t = collector.server_time()
        while collector.server_time() <= t + fresh.pages.grace_s:
            time.sleep(0.2)
        collector.collect()
        aud = audit(fresh.pages)
        assert aud.consistent, aud
        assert aud.handles > 0
    finally:
        fresh.pages.close()


def _start(make: RedisClusterFactory, ns: str) -> tuple[RedisClusterProc, ClusterEngine, Load]:
    proc = make()
    engine = make_engine(proc.seeds, ns, "b1")
    pool = add_guest(engine, GUEST)
    engine.adopt(GUEST, 1)
    load = Load(engine, pool)
    for _ in range(5):
        assert load.batch()
    return proc, engine, load


def test_kill_a_master_during_puts(make_redis_cluster: RedisClusterFactory) -> None:
    proc, engine, load = _start(make_redis_cluster, "kill")
    try:
        victim = proc.master_for_key(engine.pages.objs_key(GUEST))  # the guest's handle maps
        replica = proc.replica_of(victim)
        killer = threading.Timer(0.05, proc.kill, (victim, signal.SIGKILL))
        killer.start()
        deadline = time.monotonic() + 60
        while load.failed == 0 and time.monotonic() < deadline:
            load.batch()
        killer.join()
        assert load.failed > 0  # puts in the gap were declined, not acknowledged
        proc.wait_promoted(replica)
        load.check()  # gets work from the promoted replica
        proc.restart(victim)  # rejoins as a replica: puts are durable again
        _settle_and_audit(proc, load, proc.seeds, "kill")
    finally:
        engine.pages.close()


def test_a_dead_masters_pages_are_read_from_its_replica(
    make_redis_cluster: RedisClusterFactory,
) -> None:
    """A master dies and its replica is kept from taking over (``cluster-replica-no-failover``):
    every acknowledged page still reads back, those of the dead master from its replica (it
    stays a replica throughout); puts that need the dead master are declined (503), never
    acknowledged, while the guest's other writes go on; the master's return ends the gap."""
    proc, engine, load = _start(make_redis_cluster, "ro")
    try:
        guest_master = proc.master_for_key(engine.pages.objs_key(GUEST))
        victim = next(p for p in proc.master_ports() if p != guest_master)
        replica = proc.replica_of(victim)
        with proc.node(replica) as r:
            r.config_set("cluster-replica-no-failover", "yes")
        on_victim = [
            h
            for h, data in load.acked.items()
            if proc.master_for_key(_name(engine, load.pool, data)) == victim
        ]
        assert on_victim  # (5 batches of 16 pages: a third of the contents on each master)
        proc.kill(victim)
        load.check()  # every acknowledged page, those of the dead master included
        assert proc.role(replica) == "slave"  # ... so those came from its replica
        before = dict(load.acked)
        assert not load.batch()  # 16 new contents: some for the dead master, declined
        assert load.acked == before
        zeros = [(OP_PUT, 1, i, bytes(4096)) for i in range(4)]  # no content: the guest's master
        assert [s for s, _ in engine.batch(GUEST, load.pool, zeros)] == [STATUS_DONE] * 4
        for oid, index in ((1, i) for i in range(4)):
            load.acked[(oid, index)] = bytes(4096)
            load.maybe.pop((oid, index), None)
        proc.restart(victim)
        _settle_and_audit(proc, load, proc.seeds, "ro")
    finally:
        engine.pages.close()


def _name(engine: ClusterEngine, pool_id: int, data: bytes) -> bytes:
    """The Redis name of a persistent page's content (k = 0) in the guest's pool."""
    pool = engine._reg.pool(GUEST, pool_id)[1]
    key = with_tail(engine._contents.hash(data) | pool.domain_bits, data)
    return engine.pages.content_name(ref_of(key))


def test_stopped_replica_then_dead_master_acknowledges_nothing(
    make_redis_cluster: RedisClusterFactory,
) -> None:
    proc, engine, load = _start(make_redis_cluster, "stop")
    try:
        master = proc.master_for_key(engine.pages.objs_key(GUEST))
        replica = proc.replica_of(master)
        proc.kill(replica, signal.SIGSTOP)
        before = dict(load.acked)
        for _ in range(3):
            assert not load.batch()  # no replica confirms: never acknowledged
        assert load.acked == before
        proc.kill(master, signal.SIGKILL)
        for _ in range(2):
            assert not load.batch()
        proc.kill(replica, signal.SIGCONT)
        proc.wait_promoted(replica)
        proc.restart(master)
        _settle_and_audit(proc, load, proc.seeds, "stop")
    finally:
        engine.pages.close()


def test_reshard_the_guests_slot_under_load(make_redis_cluster: RedisClusterFactory) -> None:
    proc, engine, load = _start(make_redis_cluster, "move")
    try:
        key = engine.pages.objs_key(GUEST)
        source = proc.master_for_key(key)
        target = next(p for p in proc.master_ports() if p != source)
        done = threading.Event()
        errors: list[BaseException] = []

        def reshard() -> None:
            try:
                _migrate_slot(proc, key, source, target)
            except BaseException as exc:  # reported by the test thread
                errors.append(exc)
            finally:
                done.set()

        mover = threading.Thread(target=reshard)
        mover.start()
        while not done.is_set():
            load.batch(4)
        mover.join()
        assert not errors, errors
        assert proc.master_for_key(key) == target
        for _ in range(3):
            assert load.batch()
        _settle_and_audit(proc, load, proc.seeds, "move")
    finally:
        engine.pages.close()


def _migrate_slot(proc: RedisClusterProc, key: bytes, source: int, target: int) -> None:
    """Move ``key``'s slot by hand (SETSLOT IMPORTING/MIGRATING, MIGRATE key by key, slowly)."""
    src, dst = proc.node(source), proc.node(target)
    slot = int(src.execute_command("CLUSTER KEYSLOT", key))
    src_id = src.execute_command("CLUSTER MYID")
    dst_id = dst.execute_command("CLUSTER MYID")
    dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
    src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
    while True:
        keys = src.execute_command("CLUSTER GETKEYSINSLOT", slot, 5)
        if not keys:
            break
        src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        time.sleep(0.05)  # puts keep coming meanwhile (ASK / TRYAGAIN)
    for port in proc.master_ports():
        proc.node(port).execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)


def test_a_hung_master_is_marked_down_and_its_pages_read_from_its_replica(
    make_redis_cluster: RedisClusterFactory,
) -> None:
    """A master that hangs (``SIGSTOP``: it accepts connections and answers nothing) is marked
    down at its first timeout, like one that refuses: a get of a page it holds is answered
    from its replica (or, once promoted, from the new master). Before, a timed-out node was
    retried, every try holding the call the whole socket timeout, then the call failed (503),
    and the slot map was not refreshed either. Puts meanwhile may fail (never acknowledged and
    then lost: the audit)."""
    proc, engine, load = _start(make_redis_cluster, "hung")
    try:
        guest_master = proc.master_for_key(engine.pages.objs_key(GUEST))
        victim = next(p for p in proc.master_ports() if p != guest_master)
        objects = engine._reg.pool(GUEST, load.pool)[1].objects
        on_victim = [
            (handle, data)
            for handle, data in load.acked.items()
            if proc.master_for_key(
                engine.pages.content_name(ref_of(objects[handle[0]][handle[1]] & ~HIT))
            )
            == victim
        ]
        assert on_victim  # 80 contents over 3 masters
        proc.kill(victim, signal.SIGSTOP)
        try:
            for (oid, index), data in on_victim[:5]:
                assert engine.get(GUEST, load.pool, oid, index) == data
            assert engine.pages.timeouts >= 1
            for _ in range(3):
                load.batch()  # acknowledged or not: the audit says nothing acknowledged is lost
        finally:
            proc.kill(victim, signal.SIGCONT)
        _settle_and_audit(proc, load, proc.seeds, "hung")
    finally:
        engine.pages.close()
