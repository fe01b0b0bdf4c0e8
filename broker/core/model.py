"""Plain value types of the core: statuses, configuration, pool views."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final


class Status(enum.IntEnum):
    """The answer to a page operation; the same numbers as the batch status byte."""

    DONE = 0
    MISS = 1
    QUOTA = 2
    CAPACITY = 3
    FROZEN = 4
    POLICY = 5


class Unset(enum.Enum):
    """Type of :data:`UNSET`: "leave this setting as it is" where ``None`` is a real value."""

    UNSET = "UNSET"


UNSET: Final = Unset.UNSET

PERSISTENT: Final = "persistent"
EPHEMERAL: Final = "ephemeral"
KINDS: Final = frozenset((PERSISTENT, EPHEMERAL))


@dataclass
class CoreConfig:
    """How big the broker is and how it stores pages.

    ``capacity_bytes`` is page storage actually held (compressed length for compressed pages,
    nothing for zero pages); it can be changed later through ``Tmem.capacity_bytes``.
    ``compress_max_ratio``: lz4 output is kept only when ``len <= ratio * 4096``, otherwise the
    page is kept raw and counted as ``compress_poor``. ``compress_default``: the compression
    mode of a guest that sets none, in a domain that sets none: ``never``, ``always``, or
    ``pressure`` (compress new puts once storage is above the low watermark, and the coldest
    stored pages while above the high one). ``ephemeral_policy``: which page of an eviction
    account goes, ``lru`` or ``tinylfu`` (:mod:`broker.core.policy`); the pressure settings
    may change it later. ``recompress``: the idle pass keeps idle lz4 pages as zstd
    (:class:`broker.core.compression.IdleRecompressor`, ``Tmem.recompress_idle``).
    """

    capacity_bytes: int
    max_pools_per_guest: int = 16
    compress_max_ratio: float = 0.75
    compress_default: str = "never"
    ephemeral_policy: str = "lru"
    recompress: bool = False


@dataclass(frozen=True, slots=True)
class DomainView:
    """A dedup domain as the admin sees it (``GET /v1/domains``)."""

    name: str
    trusted: bool
    compress: str | None
    guests: int
    charged_bytes: int
    used_bytes: int


@dataclass(frozen=True, slots=True)
class PoolView:
    """A guest's view of one of its pools. ``pages`` counts the handles holding a page."""

    pool_id: int
    kind: str
    shared: bool
    uuid: str | None
    exclusive_gets: bool
    pages: int
