"""Figures that guests' block exports report: ``PUT /v1/self/exports/{name}`` (guest),
``GET /v1/self/exports`` (guest), ``GET /v1/exports`` (admin).

A base-image export (``tmem-agent nbd --base``) reports how many blocks it read from the base
image and how many the shared cache answered, so an operator sees the disk I/O the cache
saved. The broker keeps the latest report of each export in memory, as given (the figures
are the agent's own counters; they are informational and not kept across a broker restart).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from pydantic import Field

from broker.api.deps import AdminDep, GuestDep, ServiceDep
from broker.api.errors import BadInput

router = APIRouter(prefix="/v1", tags=["exports"])

MAX_EXPORTS_PER_GUEST = 16
_ExportName = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
_Figure = Annotated[int, Field(ge=0, lt=1 << 63)]


def _table(request: Request) -> dict[int, dict[str, dict[str, Any]]]:
    table: dict[int, dict[str, dict[str, Any]]] | None = getattr(
        request.app.state, "export_figures", None
    )
    if table is None:
        table = request.app.state.export_figures = {}
    return table


@router.put("/self/exports/{name}", status_code=204, response_class=Response)
async def report(
    name: _ExportName,
    body: dict[Annotated[str, Field(max_length=40)], _Figure],
    request: Request,
    guest_id: GuestDep,
) -> None:
    """Report an export's figures, up to 32 counters (the latest report replaces the last)."""
    if len(body) > 32:
        raise BadInput("at most 32 figures per export")
    mine = _table(request).setdefault(guest_id, {})
    if name not in mine and len(mine) >= MAX_EXPORTS_PER_GUEST:
        raise BadInput(f"at most {MAX_EXPORTS_PER_GUEST} exports per guest")
    mine[name] = {"name": name, "figures": dict(body), "reported_at": time.time()}


@router.get("/self/exports")
async def own_exports(request: Request, guest_id: GuestDep) -> list[dict[str, Any]]:
    """The guest's exports and their latest figures."""
    return list(_table(request).get(guest_id, {}).values())


@router.get("/exports")
async def all_exports(
    request: Request, service: ServiceDep, _admin: AdminDep
) -> list[dict[str, Any]]:
    """Every guest's exports and their latest figures, with the guest id."""
    out: list[dict[str, Any]] = []
    for guest_id, exports in sorted(_table(request).items()):
        if guest_id not in service.guests:
            continue  # a removed guest's exports go with it
        out.extend({"guest_id": guest_id, **entry} for entry in exports.values())
    return out
