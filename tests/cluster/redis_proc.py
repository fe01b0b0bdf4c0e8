"""The tests' name for :mod:`scripts.redis_proc` (a real Redis Cluster on loopback), shared
with the demo and the benchmarks."""

from scripts.redis_proc import (
    NODE_TIMEOUT_MS,
    RedisClusterProc,
    free_base_port,
    pid_alive,
    start_cluster,
)

__all__ = ["NODE_TIMEOUT_MS", "RedisClusterProc", "free_base_port", "pid_alive", "start_cluster"]
