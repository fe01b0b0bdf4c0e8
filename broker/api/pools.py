"""Per-pool figures: a guest reads its own pool, the admin reads every pool of a guest.

The core computes them (``Tmem.pool_stats``); a guest's pool ids are its own namespace, so a
pool id the guest does not have is a 404 ``unknown_pool``, whoever else has one by that id.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from broker.api.deps import AdminDep, GuestDep, ServiceDep
from broker.core.figures import as_json
from schemas.pools import AdminPoolStats, PoolStats

router = APIRouter(prefix="/v1")

# The same bounds as the other routes' ids (what their SQL columns hold): an absurd id is a 422.
GuestId = Annotated[int, Path(ge=0, le=0x7FFFFFFF)]
PoolId = Annotated[int, Path(ge=0, le=0x7FFFFFFF)]


@router.get("/pools/{pool_id}", response_model=PoolStats, tags=["guest"])
async def pool_stats(pool_id: PoolId, service: ServiceDep, guest_id: GuestDep) -> Any:
    """The calling guest's pool: kind, pages, zero pages, charged bytes and its operations."""
    return as_json(service.core.pool_stats(guest_id, pool_id))


@router.get("/guests/{guest_id}/pools", response_model=list[AdminPoolStats], tags=["admin"])
async def guest_pools(guest_id: GuestId, service: ServiceDep, _: AdminDep) -> list[Any]:
    """Every pool of a guest with its figures, dedup hits included."""
    service.guest_record(guest_id)  # 404 unknown_guest
    return [
        as_json(service.core.pool_stats(guest_id, view.pool_id, admin=True))
        for view in service.core.pools(guest_id)
    ]
