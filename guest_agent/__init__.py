"""The tmem guest agent: what runs inside a guest (VM, container or simulator).

::

    from guest_agent import TmemClient, Frontswap, Cleancache

    client = TmemClient("http://127.0.0.1:8470", token)
    fs = Frontswap(client, fallback="/var/lib/tmem/swap.fallback")

Depends on ``schemas`` and its own dependencies only, never on ``broker``. Modules: ``client``
(sync and async clients), ``transport`` (keep-alive HTTP/1.1 and the in-memory twin),
``errors`` (the exception tree), ``shims`` (frontswap, cleancache), ``placement`` (broker or
fallback: the rules and the retry policy every persistent caller shares), ``fallback`` (the
local swap file), ``notices`` (notice stream and runner), ``admin`` (the admin API's client,
for operators' tools and the simulator), ``cli`` (``tmem-agent``).
"""

from __future__ import annotations

from guest_agent.client import AsyncTmemClient, PutResult, TmemClient
from guest_agent.shims import Cleancache, Frontswap

__all__ = ["AsyncTmemClient", "Cleancache", "Frontswap", "PutResult", "TmemClient"]
