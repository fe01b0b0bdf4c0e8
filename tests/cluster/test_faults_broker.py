"""Broker faults with real processes: 2-3 brokers in cluster mode, the session's Redis Cluster
(3 masters + 3 replicas) and PostgreSQL. Each test ends with an audit: every acknowledged
persistent page reads back byte-exact through every live broker.

* ``kill -9`` of the home during puts: another broker takes the guest over within the lease
  time (plus a control step), and the agent's puts carry on there after following the 307.
* ``SIGSTOP`` of the home past its lease, then ``SIGCONT``: the guest has moved at a higher
  epoch; the resumed broker serves nothing from memory and redirects instead, and a write it
  had in flight cannot land (the epoch fence).
* An admin move between live brokers copies no page bytes and keeps every page.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
from pathlib import Path

import pytest

from guest_agent.client import TmemClient
from guest_agent.errors import BrokerUnavailable, TmemClientError
from tests.cluster.brokers import ClusterBrokers
from tests.cluster.pg_private import PrivatePostgres
from tests.cluster.redis_proc import RedisClusterProc

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(240)]

LEASE = 1.5


def _page(n: int) -> bytes:
    return n.to_bytes(8, "little") * 512


def _put_until(
    client: TmemClient, pool: int, written: dict[tuple[int, int], bytes], start: int, count: int
) -> int:
    """Put pages ``start..start+count``; a page counts as written only when acknowledged.
    Unavailability (the home died mid-call) is retried until a broker takes the guest."""
    n = start
    deadline = time.monotonic() + 60
    while n < start + count:
        try:
            r = client.put(pool, 1, n, _page(n))
        except (BrokerUnavailable, TmemClientError):
            assert time.monotonic() < deadline, "no broker took the guest over"
            time.sleep(0.1)
            continue
        if r:
            written[(1, n)] = _page(n)
        n += 1
    return n


def test_kill_9_the_home_during_puts(
    tmp_path: Path, redis_cluster: RedisClusterProc, pg_url: str
) -> None:
    with ClusterBrokers(tmp_path, redis_cluster.seeds, pg_url, n=3, lease_s=LEASE) as brokers:
        gid, token = brokers[0].new_guest("vm-kill")
        home = brokers.wait_home(gid)
        other = next(b for b in brokers if b is not brokers.by_id(home))
        written: dict[tuple[int, int], bytes] = {}
        # the agent starts at a broker that is not the home: it follows the 307
        with TmemClient(other.url, token, timeout=10) as client:
            pool = client.create_pool("persistent")
            assert client.base_url == brokers.by_id(home).url
            n = _put_until(client, pool, written, 0, 200)
            brokers.by_id(home).kill()
            # puts go on: the survivors take the guest within the lease (+ a step)
            with TmemClient(other.url, token, timeout=10) as again:
                _put_until(again, pool, written, n, 200)
        new_home = brokers.wait_home(gid, not_on=home)
        assert new_home != home
        assert brokers.guest(gid)["home_epoch"] >= 2
        brokers.audit(token, pool, written)


def test_sigstop_past_the_lease_then_sigcont(
    tmp_path: Path, redis_cluster: RedisClusterProc, pg_url: str
) -> None:
    with ClusterBrokers(tmp_path, redis_cluster.seeds, pg_url, n=2, lease_s=LEASE) as brokers:
        gid, token = brokers[0].new_guest("vm-stop")
        home = brokers.by_id(brokers.wait_home(gid))
        survivor = next(b for b in brokers if b is not home)
        written: dict[tuple[int, int], bytes] = {}
        with TmemClient(home.url, token, timeout=10) as client:
            pool = client.create_pool("persistent")
            _put_until(client, pool, written, 0, 100)
        assert home.proc is not None
        os.kill(home.proc.pid, signal.SIGSTOP)
        try:
            # the survivor takes the guest over once the lease ran out
            deadline = time.monotonic() + 30
            while survivor.json("GET", f"/v1/guests/{gid}")["home_broker"] != brokers.id_of(
                survivor
            ):
                assert time.monotonic() < deadline, "the guest was not taken over"
                time.sleep(0.1)
            with TmemClient(survivor.url, token, timeout=10) as client:
                # a new write at the new home, to the same handle the stale home held
                assert client.put(pool, 1, 0, _page(10_000))
                written[(1, 0)] = _page(10_000)
        finally:
            os.kill(home.proc.pid, signal.SIGCONT)
        # the resumed broker does not serve the guest from memory: it redirects
        status, body = home.call("GET", f"/v1/pools/{pool}/objects/1/pages/0", token=token)
        assert status == 307, body[:300]
        # a write sent to it lands at the new home (followed), never at the stale one
        with TmemClient(home.url, token, timeout=10) as client:
            assert client.put(pool, 1, 1, _page(10_001))
            written[(1, 1)] = _page(10_001)
            assert client.base_url == survivor.url
        brokers.audit(token, pool, written)


def test_admin_move_keeps_every_page(
    tmp_path: Path, redis_cluster: RedisClusterProc, pg_url: str
) -> None:
    with ClusterBrokers(tmp_path, redis_cluster.seeds, pg_url, n=2, lease_s=LEASE) as brokers:
        gid, token = brokers[0].new_guest("vm-move")
        home = brokers.wait_home(gid)
        target = "b1" if home == "b0" else "b0"
        written: dict[tuple[int, int], bytes] = {}
        with TmemClient(brokers[0].url, token, timeout=10) as client:
            pool = client.create_pool("persistent")
            _put_until(client, pool, written, 0, 300)
            before = brokers.guest(gid)["home_epoch"]
            moved = brokers[0].json("POST", f"/v1/guests/{gid}/home", {"broker": target})
            assert moved["home_broker"] == target and moved["home_epoch"] == before + 1
            # the agent follows on its next call and keeps writing
            _put_until(client, pool, written, 300, 50)
            assert client.base_url == brokers.by_id(target).url
        brokers.audit(token, pool, written)


def test_restart_postgresql_under_load(tmp_path: Path, redis_cluster: RedisClusterProc) -> None:
    """A private PostgreSQL restarted while a guest writes: the brokers keep their leases
    (or give the guest up only until PostgreSQL is back), puts carry on after retries, and
    every acknowledged page is there at the end."""
    with (
        PrivatePostgres() as pg,
        ClusterBrokers(tmp_path, redis_cluster.seeds, pg.url, n=2, lease_s=3.0) as brokers,
    ):
        gid, token = brokers[0].new_guest("vm-pg")
        brokers.wait_home(gid)
        written: dict[tuple[int, int], bytes] = {}
        with TmemClient(brokers[0].url, token, timeout=10) as client:
            pool = client.create_pool("persistent")
            n = _put_until(client, pool, written, 0, 100)
            pg.restart()
            n = _put_until(client, pool, written, n, 100)
        assert len(written) >= 150  # most puts were acknowledged across the restart
        brokers.audit(token, pool, written)
        # PostgreSQL away: a broker that must ask it where the guest lives answers 503
        # cluster_unavailable (retry later), never a 500 and never a guess
        home = brokers.wait_home(gid)
        away = brokers[1] if home == "b0" else brokers[0]
        pg.pause()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", away.port, timeout=30)
            conn.request(
                "GET",
                f"/v1/pools/{pool}/objects/1/pages/0",
                headers={"Authorization": f"Bearer {token}", "X-Tmem-Redirected": "1"},
            )
            answer = conn.getresponse()
            body = answer.read()
            conn.close()
            assert answer.status == 503, body[:300]
            assert json.loads(body)["error"]["code"] == "cluster_unavailable"
        finally:
            pg.resume()
        # the control plane works again: an admin move succeeds
        target = "b1" if home == "b0" else "b0"
        assert brokers[0].json("POST", f"/v1/guests/{gid}/home", {"broker": target})
