"""Several brokers as one pool (``tmem-broker serve --cluster``): docs/scale.md.

The control plane (who serves whom: ``leases``, ``routing``, ``control``, ``aggregate``) keeps
its state in PostgreSQL; the data plane (``engine`` and the Redis modules) keeps page bytes and
handle maps in a Redis Cluster.
"""
