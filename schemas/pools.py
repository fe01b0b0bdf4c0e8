"""Per-pool figures: ``GET /v1/pools/{pool_id}`` (a guest, its own pool) and
``GET /v1/guests/{id}/pools`` (the admin, every pool of a guest)."""

from __future__ import annotations

import uuid as uuidlib

from pydantic import BaseModel, Field

from schemas.wire import PoolKind


class PutsDeclined(BaseModel):
    """Declined puts by reason (the reasons of a 409 ``not_stored``)."""

    quota: int = 0
    capacity: int = 0
    frozen: int = 0
    policy: int = 0


class PoolStats(BaseModel):
    """One pool's figures as its guest may see them.

    Pages and bytes count what the pool holds now; the operation counters count since the pool
    was created (or since the broker started). A shared pool's counters count every member's
    operations.
    """

    pool_id: int
    kind: PoolKind
    shared: bool
    uuid: uuidlib.UUID | None = None
    logical_pages: int = Field(description="handles holding a page")
    zero_pages: int = Field(description="handles holding an all-zero page (no storage)")
    charged_bytes: int = Field(description="what the pool's pages take, each on its own")
    compression_ratio: float
    puts: int
    puts_stored: int
    puts_declined: PutsDeclined
    gets: int
    get_hits: int
    flushes: int
    flushes_found: int
    object_flushes: int
    evictions: int
    compress_poor: int


class AdminPoolStats(PoolStats):
    """A pool's figures as the admin sees them: with ``dedup_hits`` (puts whose content was
    held already), which no guest may see."""

    dedup_hits: int
