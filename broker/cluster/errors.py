"""Errors of ``broker.cluster``: the Redis Cluster data plane.

::

    StoreError (broker.store.errors)
     └── ClusterError            anything the data plane raises
          ├── ClusterUnavailable the cluster could not confirm a change (a node down, a
          │                      failover in progress, no replica acknowledged in time): what
          │                      was asked is NOT acknowledged; retry later (503 + Retry-After)
          └── Fenced             another broker holds the guest at a higher epoch: this broker
                                 is no longer its home (the API answers with a redirect)

Being ``StoreError``s, both are a 503 by default in the API's error map (never a 500), so a
route that does not know them yet still declines rather than acknowledges.
"""

from __future__ import annotations

from broker.store.errors import StoreError


class ClusterError(StoreError):
    """Base of every error ``broker.cluster`` raises."""


class ClusterUnavailable(ClusterError):
    """The cluster could not confirm a change; nothing asked for was acknowledged."""

    retry_after = 1


class Fenced(ClusterError):
    """This broker is not (any more) the home of ``guest_id``: another took it at an epoch
    higher than ours (``fence`` is the epoch found, when known)."""

    def __init__(self, guest_id: int, epoch: int, fence: int | None = None) -> None:
        super().__init__(f"guest {guest_id} is fenced: our epoch {epoch}, the fence {fence}")
        self.guest_id = guest_id
        self.epoch = epoch
        self.fence = fence
