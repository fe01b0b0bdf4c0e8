"""Several brokers as one pool (``tmem-broker serve --cluster``; docs/scale.md).

The data plane: page bytes and persistent handle maps in a Redis Cluster.

* :mod:`broker.cluster.redis_store` — the Redis side: content values with their reference
  count, handle maps per guest fenced by epoch, pipelines per node, durability (``WAIT``).
* :mod:`broker.cluster.lua` — the Lua scripts those run, each on one hash slot.
* :mod:`broker.cluster.redis_tables` — the core's content table and journal seams in cluster mode.
* :mod:`broker.cluster.engine` — :class:`ClusterEngine`, the Tmem-compatible core of a broker
  in cluster mode (``open_cluster_engine``).
* :mod:`broker.cluster.collector` — reclaims references leaked by crashes, while brokers run.
* :mod:`broker.cluster.errors` — what they raise.

The control plane: who serves whom, kept in PostgreSQL.

* :mod:`broker.cluster.leases` — brokers, heartbeats, guests' home leases and epochs.
* :mod:`broker.cluster.control` — a broker's loop: adopt, release, take over, route.
* :mod:`broker.cluster.routing` — the 307 redirects to a guest's home.
* :mod:`broker.cluster.aggregate` — the pool's ``/v1/stats`` summed over the brokers.
"""
