"""A real Redis Cluster of redis-server processes on loopback, driven by scripts/redis-cluster.sh.

Tests get one from the fixtures in ``tests/cluster/conftest.py``; a fault test that kills or
stops nodes takes its own (``make_redis_cluster``) so the session's cluster stays whole.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "redis-cluster.sh"
NODE_TIMEOUT_MS = 1000


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base_port(count: int) -> int:
    """A base port B such that B..B+count-1 and their cluster-bus ports (+10000) are free."""
    for _ in range(200):
        base = random.randrange(20000, 45000 - count)
        ports = [base + i for i in range(count)]
        if all(_port_free(p) and _port_free(p + 10000) for p in ports):
            return base
    raise RuntimeError("no free run of loopback ports for a Redis Cluster")


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@dataclass
class RedisClusterProc:
    """One cluster under ``dir``: its node ports, pids, and the faults tests inject."""

    dir: Path
    ports: list[int]
    masters: int
    replicas: int
    pids: dict[int, int] = field(default_factory=dict)

    @property
    def seeds(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def _read_pid(self, port: int) -> int:
        pidfile = self.dir / str(port) / "redis.pid"
        for _ in range(100):
            if pidfile.exists():
                text = pidfile.read_text().strip()
                if text:
                    return int(text)
            time.sleep(0.02)
        raise RuntimeError(f"no pidfile for redis node {port}")

    def refresh_pids(self) -> None:
        self.pids = {p: self._read_pid(p) for p in self.ports if self.node_up(p)}

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def node_up(self, port: int) -> bool:
        try:
            with self.node(port) as r:
                return bool(r.ping())
        except redis.RedisError:
            return False

    def role(self, port: int) -> str:
        with self.node(port) as r:
            return str(r.info("replication")["role"])

    def master_ports(self) -> list[int]:
        return [p for p in self.ports if self.node_up(p) and self.role(p) == "master"]

    def replica_of(self, master_port: int) -> int:
        with self.node(master_port) as r:
            info = r.info("replication")
        return int(info["slave0"]["port"])

    def master_for_key(self, key: bytes | str) -> int:
        """The port of the master that serves ``key``'s slot right now."""
        with self.node(self.master_ports()[0]) as r:
            slot = int(r.execute_command("CLUSTER KEYSLOT", key))
            for start, end, master, *_ in r.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(master[1])
        raise RuntimeError(f"no master serves slot {slot}")

    def kill(self, port: int, sig: int = signal.SIGKILL) -> int:
        pid = self.pids.get(port) or self._read_pid(port)
        os.kill(pid, sig)
        if sig == signal.SIGKILL:
            for _ in range(200):
                if not pid_alive(pid):
                    break
                time.sleep(0.01)
        return pid

    def restart(self, port: int) -> None:
        subprocess.run(["bash", str(SCRIPT), "start-node", str(self.dir), str(port)], check=True)
        self.pids[port] = self._read_pid(port)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every live node reports cluster_state:ok and all slots have a master."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                live = [p for p in self.ports if self.node_up(p)]
                states = []
                for p in live:
                    with self.node(p) as r:
                        states.append(r.cluster("info")["cluster_state"] == "ok")
                if live and all(states):
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise TimeoutError("the Redis Cluster did not return to cluster_state:ok")

    def wait_promoted(self, port: int, timeout: float = 30.0) -> None:
        """Wait until the replica on ``port`` is a master."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.node_up(port) and self.role(port) == "master":
                return
            time.sleep(0.05)
        raise TimeoutError(f"redis node {port} was not promoted")

    def down(self) -> None:
        subprocess.run(["bash", str(SCRIPT), "down", str(self.dir)], check=True)


def start_cluster(
    dir: Path, masters: int = 3, replicas: int = 1, maxmemory: str | None = None
) -> RedisClusterProc:
    """Start a cluster under ``dir`` on free ports; the caller must call ``down()``."""
    count = masters * (1 + replicas)
    env = dict(os.environ, REDIS_NODE_TIMEOUT=str(NODE_TIMEOUT_MS))
    if maxmemory:
        env["REDIS_MAXMEMORY"] = maxmemory
    last = ""
    for _ in range(3):  # a port taken between the probe and the bind: try another run
        base = free_base_port(count)
        proc = RedisClusterProc(dir, [base + i for i in range(count)], masters, replicas)
        res = subprocess.run(
            ["bash", str(SCRIPT), "up", str(dir), str(base), str(masters), str(replicas)],
            env=env,
            capture_output=True,
            text=True,
        )
        if res.returncode == 0:
            proc.refresh_pids()
            return proc
        last = res.stderr
        proc.down()
    raise RuntimeError(f"could not start a Redis Cluster: {last}")
