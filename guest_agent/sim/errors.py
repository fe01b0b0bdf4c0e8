"""Errors of the simulator.

::

    SimError                     base of everything the simulator raises itself
    ├── ImageError               the OS image tree is missing, unreadable or empty
    ├── WorkloadError            an unknown workload or impossible sizes
    └── BrokerSetupError         guests could not be created or reached on the broker

Errors of the agent (``guest_agent.errors``) pass through unchanged: a broker that answers
with a 5xx during a simulation is a bug the user must see, not a statistic.
"""

from __future__ import annotations


class SimError(Exception):
    """Base of the simulator's own errors."""


class ImageError(SimError):
    """The directory tree standing for a guest's OS image cannot be used."""


class WorkloadError(SimError):
    """An unknown workload name or sizes that cannot work (e.g. a step larger than RAM)."""


class BrokerSetupError(SimError):
    """Guests could not be created or reached on the broker."""
