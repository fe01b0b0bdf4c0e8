"""The cluster fixtures themselves: the session cluster is whole and durable, and `down` leaves
no redis-server process behind (even one that was SIGSTOPped)."""

from __future__ import annotations

import signal
from pathlib import Path

import redis
from redis.cluster import ClusterNode, RedisCluster

from tests.cluster.conftest import RedisClusterFactory
from tests.cluster.redis_proc import RedisClusterProc, pid_alive


def test_session_cluster_is_up_with_a_replica_per_master(redis_cluster: RedisClusterProc) -> None:
    masters = redis_cluster.master_ports()
    assert len(masters) == 3
    for port in masters:
        with redis_cluster.node(port) as r:
            assert r.cluster("info")["cluster_state"] == "ok"
            assert r.config_get("appendfsync")["appendfsync"] == "always"
            assert r.config_get("appendonly")["appendonly"] == "yes"
            assert r.info("replication")["connected_slaves"] == 1
    rc = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", redis_cluster.ports[0])])
    try:
        for i in range(30):  # keys spread over all three masters
            rc.set(f"fixture:{i}", b"x")
        assert rc.get("fixture:7") == b"x"
        node = rc.get_node_from_key("fixture:7")
        assert rc.execute_command("WAIT", 1, 2000, target_nodes=node) == 1
    finally:
        rc.delete(*[f"fixture:{i}" for i in range(30)])
        rc.close()


def test_down_leaves_no_process(make_redis_cluster: RedisClusterFactory, tmp_path: Path) -> None:
    proc = make_redis_cluster(masters=3, replicas=1)
    pids = dict(proc.pids)
    assert len(pids) == 6 and all(pid_alive(p) for p in pids.values())
    proc.kill(proc.ports[-1], signal.SIGSTOP)  # a stopped node must still be stopped by down
    proc.down()
    assert not any(pid_alive(p) for p in pids.values())
    for port in proc.ports:
        try:
            redis.Redis(port=port, socket_connect_timeout=0.5).ping()
            raise AssertionError(f"node {port} still answers")
        except redis.ConnectionError:
            pass
