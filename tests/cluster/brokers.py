"""The tests' name for :mod:`scripts.cluster_brokers` (broker processes in cluster mode),
shared with the demo and the benchmarks."""

from scripts.cluster_brokers import ClusterBrokers

__all__ = ["ClusterBrokers"]
