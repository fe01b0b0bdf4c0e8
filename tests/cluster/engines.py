"""Helpers of the cluster tests: ClusterEngines standing for brokers, and the audit."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from broker.cluster.collector import Collector
from broker.cluster.engine import ClusterEngine
from broker.cluster.redis_store import RedisPages
from broker.core.model import CoreConfig


def make_engine(
    seeds: list[str],
    namespace: str,
    broker_id: str = "b1",
    *,
    capacity: int = 1 << 30,
    wait_ms: int = 500,
    grace_s: int = 4,
) -> ClusterEngine:
    pages = RedisPages(seeds, namespace, wait_ms=wait_ms, grace_s=grace_s)
    return ClusterEngine(CoreConfig(capacity_bytes=capacity), pages, broker_id)


def add_guest(engine: ClusterEngine, guest_id: int, domain: str = "default") -> int:
    """The guest with one persistent pool (id returned); what PostgreSQL would load."""
    engine.add_guest(guest_id, name=f"g{guest_id}", dedup_domain=domain)
    return engine.create_pool(guest_id, "persistent")


@contextmanager
def engines(
    seeds: list[str], namespace: str, count: int, **kw: int
) -> Iterator[list[ClusterEngine]]:
    made = [make_engine(seeds, namespace, f"b{i}", **kw) for i in range(count)]
    try:
        yield made
    finally:
        for e in made:
            e.pages.close()


@dataclass
class Audit:
    contents: int
    handles: int
    mismatched: dict[bytes, tuple[int, int]]  # content -> (refcount, handles) where they differ
    dangling: int  # handles whose content is missing
    counted: int  # the scripts' per-slot content counters, summed (the pool's figure)

    @property
    def consistent(self) -> bool:
        return not self.mismatched and not self.dangling and self.counted == self.contents


def audit(pages: RedisPages) -> Audit:
    """Reference counts against the handle maps of a namespace (run when no put is in flight)."""
    col = Collector(pages)
    contents = col.contents()
    counts = col.handle_counts()
    mismatched = {
        k: (n, counts.get(k, 0)) for k, (n, _t) in contents.items() if n != counts.get(k, 0)
    }
    dangling = sum(c for k, c in counts.items() if k not in contents)
    return Audit(len(contents), sum(counts.values()), mismatched, dangling, pages.count_contents())
