"""Real broker processes in cluster mode for the cluster's end-to-end and fault tests.

::

    with ClusterBrokers(tmp_path, redis_cluster.seeds, pg_url, n=3, lease_s=1.5) as brokers:
        gid, token = brokers[0].new_guest("vm-1")
        home = brokers.home_of(gid)        # the BrokerProcess serving it
        ...
        brokers.audit(token, pool, written)  # every acknowledged page, byte-exact, via any broker

Each broker has its own data dir, port and id (``b0``, ``b1``, ...), and all share one Redis
key namespace and one PostgreSQL database.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from guest_agent.client import TmemClient
from scripts.procs import BrokerProcess, free_port


class ClusterBrokers:
    """``n`` broker processes of one cluster (see the module doc)."""

    def __init__(
        self,
        tmp_path: Path,
        seeds: list[str],
        pg_url: str,
        *,
        n: int = 2,
        lease_s: float = 1.5,
        namespace: str | None = None,
        capacity: str = "256MiB",
    ) -> None:
        self.lease_s = lease_s
        self.namespace = namespace or f"t{secrets.token_hex(4)}"
        self.brokers: list[BrokerProcess] = []
        for i in range(n):
            port = free_port()
            self.brokers.append(
                BrokerProcess(
                    tmp_path / f"b{i}",
                    durability="none",
                    capacity=capacity,
                    port=port,
                    extra_args=[
                        "--cluster",
                        "redis://" + ",".join(seeds),
                        "--database-url",
                        pg_url,
                        "--broker-id",
                        f"b{i}",
                        "--advertise-url",
                        f"http://127.0.0.1:{port}",
                        "--lease",
                        str(lease_s),
                    ],
                    env={"TMEM_CLUSTER_NAMESPACE": self.namespace},
                )
            )

    def __enter__(self) -> ClusterBrokers:
        for b in self.brokers:
            b.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for b in self.brokers:
            b.stop()

    def __getitem__(self, i: int) -> BrokerProcess:
        return self.brokers[i]

    def __iter__(self) -> Iterator[BrokerProcess]:
        return iter(self.brokers)

    def by_id(self, broker_id: str) -> BrokerProcess:
        return self.brokers[int(broker_id.removeprefix("b"))]

    def id_of(self, broker: BrokerProcess) -> str:
        return f"b{self.brokers.index(broker)}"

    def alive(self) -> list[BrokerProcess]:
        return [b for b in self.brokers if b.proc is not None and b.proc.poll() is None]

    def guest(self, gid: int) -> dict[str, Any]:
        info: dict[str, Any] = self.alive()[0].json("GET", f"/v1/guests/{gid}")
        return info

    def guest_away(self, name: str) -> tuple[int, str, BrokerProcess, BrokerProcess]:
        """A new guest (made at ``b0``) once it has a home: ``(id, token, its home, another
        broker)``, for the tests that hand an agent the broker that is not the home."""
        gid, token = self.brokers[0].new_guest(name)
        home = self.by_id(self.wait_home(gid))
        other = next(b for b in self.brokers if b is not home)
        return gid, token, home, other

    def wait_home(self, gid: int, *, not_on: str | None = None, timeout: float = 30) -> str:
        """The guest's home broker id, once it has one (other than ``not_on``)."""
        deadline = time.monotonic() + timeout
        while True:
            home = self.guest(gid).get("home_broker")
            if home is not None and home != not_on:
                return str(home)
            assert time.monotonic() < deadline, f"guest {gid} found no home (not {not_on})"
            time.sleep(0.1)

    def audit(self, token: str, pool: int, written: dict[tuple[int, int], bytes]) -> None:
        """Every acknowledged page reads back byte-exact through every live broker (each
        answers, or redirects to the home, which the client follows)."""
        items = sorted(written.items())
        for b in self.alive():
            with TmemClient(b.url, token, timeout=30) as client:
                got = client.get_many(pool, [h for h, _ in items])
            for (handle, want), page in zip(items, got, strict=True):
                assert page == want, (b.url, handle)
