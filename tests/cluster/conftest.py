"""Fixtures for the cluster tests: a real 3-master + 3-replica Redis Cluster on free loopback
ports (session-wide), a private one per fault test, and a fresh PostgreSQL database per test.

Tests that share the session cluster keep apart by key namespace (``cluster_namespace``), never
by flushing it.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cluster.brokers import ClusterBrokers
from tests.cluster.redis_proc import RedisClusterProc, start_cluster
from tests.db.pg import temp_database

RedisClusterFactory = Callable[..., RedisClusterProc]


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProc]:
    """The session's 3 masters + 3 replicas (appendfsync always), stopped at the end."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run scripts/system-deps.sh")
    proc = start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield proc
    finally:
        proc.down()


@pytest.fixture
def make_redis_cluster(tmp_path: Path) -> Iterator[RedisClusterFactory]:
    """Start private clusters (for tests that kill, stop or reshard nodes); all stopped after."""
    started: list[RedisClusterProc] = []

    def make(masters: int = 3, replicas: int = 1, maxmemory: str | None = None) -> RedisClusterProc:
        proc = start_cluster(tmp_path / f"rc{len(started)}", masters, replicas, maxmemory)
        started.append(proc)
        return proc

    try:
        yield make
    finally:
        for proc in started:
            proc.down()


@pytest.fixture
def cluster_namespace() -> str:
    """A key prefix of this test's own, so tests share the session cluster without colliding."""
    return f"t{secrets.token_hex(4)}"


@pytest.fixture
def two_brokers(
    tmp_path: Path, redis_cluster: RedisClusterProc, pg_url: str
) -> Iterator[ClusterBrokers]:
    """Two broker processes of one cluster on the session's Redis Cluster (lease 1.5 s), for
    the tests of agents following a guest's home (``ClusterBrokers.guest_away``)."""
    with ClusterBrokers(tmp_path, redis_cluster.seeds, pg_url, n=2, lease_s=1.5) as brokers:
        yield brokers


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test (dropped at the end): brokers register there,
    beat and hold leases, so one test's brokers (a killed one still "live" for its lease, its
    guests orphans) must never be seen by the next test's (~1 s a database). A module-scoped
    fixture makes its own with ``temp_database``."""
    with temp_database() as url:
        yield url
