"""An NBD export a real kernel or qemu swaps to, backed by the broker (issue [nbd]).

Design, the block → handle mapping and figures: ``docs/nbd.md``. Layers, each usable alone:

- :mod:`.protocol`: wire constants and framing of the NBD protocol;
- :mod:`.backend`: the block store protocol (:class:`BlockBackend`) and an in-memory twin;
- :mod:`.dispatcher`: gathers the block operations of every request in flight into one batch
  per round, so queue depth turns into batch size;
- :mod:`.broker_backend`: the real store: one persistent broker pool, a fallback file;
- :mod:`.base_image`: a read-only raw base image, refused once it changes;
- :mod:`.cow_backend`: a copy-on-write export over a base image: the guest's overlay, a
  shared ephemeral cache of the image's blocks at the broker, the image;
- :mod:`.notices`: shed notices move broker blocks to the fallback file;
- :mod:`.server`: the asyncio NBD server (handshake and transmission);
- :mod:`.cli`: ``tmem-agent nbd``.
"""

from __future__ import annotations

from guest_agent.nbd.backend import BLOCK_SIZE, BlockBackend, MemoryBackend
from guest_agent.nbd.dispatcher import Dispatcher
from guest_agent.nbd.errors import BackendError, NbdError, ProtocolError
from guest_agent.nbd.server import NbdServer

__all__ = [
    "BLOCK_SIZE",
    "BackendError",
    "BlockBackend",
    "Dispatcher",
    "MemoryBackend",
    "NbdError",
    "NbdServer",
    "ProtocolError",
]
