"""The tests' name for :mod:`scripts.procs` (a real ``tmem-broker serve`` process and a plain
http.client caller), which lives under scripts/ so that the demo and the benchmarks start
brokers the same way without depending on the test tree."""

from scripts.procs import ADMIN, TMEM_BROKER, BrokerProcess, dies_with_us, free_port

__all__ = ["ADMIN", "TMEM_BROKER", "BrokerProcess", "dies_with_us", "free_port"]
