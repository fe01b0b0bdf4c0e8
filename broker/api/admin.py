"""Admin: the JSON routes that need the admin token (guests, freeze/thaw/flush, shared-pool
authorisation, stats, settings) and the guests' export and import (``migration.py``)."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from broker.api import migration
from broker.api.deps import AdminDep, ServiceDep
from broker.api.errors import BadInput, NotACluster
from broker.api.pressure_loop import PressureSettingsPatch, PressureSettingsView
from broker.api.service import BrokerService
from broker.cluster.aggregate import pooled_stats
from broker.cluster.errors import ClusterUnavailable
from broker.cluster.leases import UnknownBroker
from broker.core.figures import as_json
from broker.settings import Size
from schemas.export import EXPORT_CONTENT_TYPE
from schemas.wire import (
    CompressMode,
    DomainInfo,
    DomainPut,
    GuestCreate,
    GuestCreated,
    GuestInfo,
    GuestPatch,
    Imported,
    Pressure,
    SharedAuth,
    ShedIssued,
    ShedRequest,
)

# Ids are bounded by what their SQL columns hold (INTEGER), so an absurd id is a 422, never a
# database error.
GuestId = Annotated[int, Path(ge=0, le=0x7FFFFFFF)]

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["admin"])


class PressureView(Pressure):
    received_at: str


class AdminGuestInfo(GuestInfo):
    """A guest as admins see it: ``GuestInfo`` plus its latest pressure report (and, in a
    cluster, its home broker)."""

    pressure: PressureView | None = None
    home_broker: str | None = None
    home_url: str | None = None
    home_epoch: int | None = None


class HomeMove(BaseModel):
    model_config = ConfigDict(extra="forbid")

    broker: Annotated[str, Field(min_length=1, max_length=128)]


class BrokerSettings(PressureSettingsView):
    capacity_bytes: int
    compress: CompressMode


class SettingsPatch(PressureSettingsPatch):
    model_config = ConfigDict(extra="forbid")

    capacity: Annotated[Size, Field(ge=4096)] | None = None
    compress: CompressMode | None = None


DomainName = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]


# guests, stats, settings ------------------------------------------------------------------


@router.post("/guests", status_code=201, response_model=GuestCreated)
async def create_guest(body: GuestCreate, service: ServiceDep, _: AdminDep) -> dict[str, Any]:
    """Create a guest; the answer carries its token, which is never shown again."""
    record, token = await service.create_guest(body)
    return {**service.guest_info(record.guest_id), "token": token}


def _admin_info(service: BrokerService, guest_id: int) -> dict[str, Any]:
    info = service.guest_info(guest_id)
    cluster = service.cluster
    if cluster is not None:
        info.update(cluster.home_of(guest_id))
        if guest_id not in cluster.serving:
            # its state lives at its home: the figures the home published last
            info["stats"] = cluster.guest_stats_elsewhere(guest_id) or {}
    return info


@router.get("/guests", response_model=list[AdminGuestInfo])
async def list_guests(service: ServiceDep, _: AdminDep) -> list[dict[str, Any]]:
    """Every guest, with its pools, stats and latest pressure report (and its home broker)."""
    if service.cluster is not None:
        await service.cluster.sync_guests()
    return [_admin_info(service, gid) for gid in sorted(service.guests)]


@router.get("/guests/{guest_id}", response_model=AdminGuestInfo)
async def show_guest(guest_id: GuestId, service: ServiceDep, _: AdminDep) -> dict[str, Any]:
    """One guest, with its pools, stats and latest pressure report (and its home broker)."""
    if service.cluster is not None:
        await service.cluster.know(guest_id)
    return _admin_info(service, guest_id)


@router.post("/guests/{guest_id}/home", response_model=AdminGuestInfo)
async def move_guest(
    guest_id: GuestId, body: HomeMove, service: ServiceDep, _: AdminDep
) -> dict[str, Any]:
    """Cluster mode: make ``broker`` the guest's home (no page bytes move; the epoch grows,
    so the old home's late writes are refused)."""
    if service.cluster is not None:
        await service.cluster.know(guest_id)
    service.guest_record(guest_id)
    if service.cluster is None:
        raise NotACluster("this broker is not in a cluster (serve --cluster)")
    try:
        await service.cluster.move(guest_id, body.broker)
    except UnknownBroker as exc:
        raise BadInput(str(exc)) from exc
    return _admin_info(service, guest_id)


@router.get("/brokers")
async def list_brokers(service: ServiceDep, _: AdminDep) -> list[dict[str, Any]]:
    """Cluster mode: every broker that joined, alive or not, with its guests served; single
    host: an empty list."""
    if service.cluster is None:
        return []
    await service.cluster.step_views()
    homes = service.cluster.homes.values()
    return [
        {
            **{k: v for k, v in b.items() if k != "stats"},
            "guests": sorted(h.guest_id for h in homes if h.broker_id == b["broker_id"]),
        }
        for b in service.cluster.brokers
    ]


@router.patch("/guests/{guest_id}", response_model=AdminGuestInfo)
async def patch_guest(
    guest_id: GuestId, body: GuestPatch, service: ServiceDep, _: AdminDep
) -> dict[str, Any]:
    """Change weight, cap_pages (sends a ``quota`` notice), compress or dedup_domain."""
    changes = body.model_dump(include=body.model_fields_set)
    for key in ("weight", "dedup_domain"):
        if key in changes and changes[key] is None:
            del changes[key]  # null means "unchanged" for these
    # cap_pages null: no cap; compress null: inherit the domain's (else the broker's) mode
    service.guest_record(guest_id)
    if changes:
        await service.update_guest(guest_id, changes)
    return service.guest_info(guest_id)


@router.delete("/guests/{guest_id}", status_code=204, response_class=Response)
async def delete_guest(guest_id: GuestId, service: ServiceDep, _: AdminDep) -> None:
    """Delete a guest: every page of it is gone, its token stops working."""
    await service.delete_guest(guest_id)


@router.post("/guests/{guest_id}/freeze", status_code=204, response_class=Response)
async def freeze_guest(guest_id: GuestId, service: ServiceDep, _: AdminDep) -> None:
    """Freeze a guest: its puts are declined with ``frozen`` until thawed."""
    await service.set_frozen(guest_id, True)


@router.post("/guests/{guest_id}/thaw", status_code=204, response_class=Response)
async def thaw_guest(guest_id: GuestId, service: ServiceDep, _: AdminDep) -> None:
    """Thaw a frozen guest."""
    await service.set_frozen(guest_id, False)


@router.post("/guests/{guest_id}/flush", status_code=204, response_class=Response)
async def flush_guest(guest_id: GuestId, service: ServiceDep, _: AdminDep) -> None:
    """Flush every page of every pool of a guest; the pools stay."""
    await service.flush_guest(guest_id)


@router.post("/guests/{guest_id}/shed", response_model=ShedIssued)
async def shed_guest(
    guest_id: GuestId, body: ShedRequest, service: ServiceDep, _: AdminDep
) -> ShedIssued:
    """Ask a guest to return N persistent pages by a deadline (its coldest first)."""
    service.guest_record(guest_id)  # 404 unknown_guest
    asked, notice, cap = await service.pressure_loop.admin_shed(
        guest_id, body.pages, body.deadline_s
    )
    return ShedIssued(
        guest_id=guest_id,
        pages=asked,
        seq=None if notice is None else notice.seq,
        deadline=None if notice is None else notice.deadline,
        cap_pages=cap,
    )


@router.post("/shared-auth", status_code=204, response_class=Response)
async def shared_auth(body: SharedAuth, service: ServiceDep, _: AdminDep) -> None:
    """Allow (or stop allowing) a guest to create or join the shared pool ``uuid``."""
    await service.set_shared_auth(str(body.uuid), body.guest_id, body.allow)


@router.get("/stats")
async def stats(service: ServiceDep, _: AdminDep) -> dict[str, Any]:
    """Global figures (capacity, use, dedup, counters) and one entry per guest; in a cluster,
    summed over the live brokers, with the per-broker breakdown in ``brokers``."""
    if service.cluster is None:
        return as_json(service.stats())
    cluster = service.cluster
    await cluster.step_views()  # the other brokers' latest published figures
    contents = None
    count = getattr(service.core, "count_contents", None)
    if count is not None:
        try:  # one script per master, ~50 ms: off the event loop
            contents = await asyncio.to_thread(count)
        except ClusterUnavailable as exc:  # the sum of the brokers' shares stays
            log.warning("the cluster's content count failed: %s", exc)
    return pooled_stats(cluster.figures(), cluster.broker_id, cluster.brokers, contents)


@router.get("/settings", response_model=BrokerSettings)
async def get_settings(service: ServiceDep, _: AdminDep) -> BrokerSettings:
    """The settings an admin can change at run time."""
    return _settings_view(service)


def _settings_view(service: BrokerService) -> BrokerSettings:
    pressure = service.pressure_loop.settings.as_dict()
    return BrokerSettings(
        capacity_bytes=service.core.capacity_bytes,
        compress=service.core.compress_default,
        **pressure,
    )


@router.patch("/settings", response_model=BrokerSettings)
async def patch_settings(body: SettingsPatch, service: ServiceDep, _: AdminDep) -> BrokerSettings:
    """Change the capacity or pressure tunables (kept in SQL; they win over the flags after a
    restart)."""
    changes = body.pressure_changes()
    if changes:
        try:
            service.pressure_loop.settings.updated(changes)
        except ValueError as exc:
            raise BadInput(f"pressure settings: {exc}") from exc
    if body.capacity is not None:
        await service.set_capacity(body.capacity)
    if body.compress is not None:
        await service.set_compress_default(body.compress)
    if changes:
        await service.pressure_loop.update_settings(changes)
    return _settings_view(service)


# dedup domains ----------------------------------------------------------------------------


@router.get("/domains", response_model=list[DomainInfo])
async def list_domains(service: ServiceDep, _: AdminDep) -> list[DomainInfo]:
    """Dedup domains: trust, compression mode, guests and the storage they take."""
    return service.domain_infos()


@router.put("/domains/{name}", response_model=DomainInfo)
async def put_domain(
    name: DomainName, body: DomainPut, service: ServiceDep, _: AdminDep
) -> DomainInfo:
    """Set a dedup domain's trust and compression mode (fields left out keep their value)."""
    return await service.put_domain(name, body)


# migration (Xen's tmem save/restore; migration.py) ----------------------------------------


@router.get(
    "/guests/{guest_id}/export",
    response_class=StreamingResponse,
    responses={200: {"content": {EXPORT_CONTENT_TYPE: {}}}},
)
async def export_guest(guest_id: int, service: ServiceDep, _admin: AdminDep) -> StreamingResponse:
    """Stream the guest's settings, persistent pools and pages (frozen while it streams)."""
    return await migration.export_guest(service, guest_id)


@router.post("/guests/import", status_code=201, response_model=Imported)
async def import_guest(
    request: Request, service: ServiceDep, _admin: AdminDep, keep_token: bool = False
) -> Imported:
    """Recreate an exported guest here: new id, same name, pools and pages; a new token, or
    with ``keep_token=true`` the one it had (the answer's ``token`` is then empty)."""
    return await migration.import_guest(service, request.stream(), keep_token=keep_token)


class MovedTo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Annotated[str, Field(min_length=8, max_length=512, pattern=r"^https?://[^/\s]+")]


@router.post("/guests/{guest_id}/moved", status_code=204, response_class=Response)
async def guest_moved(guest_id: GuestId, body: MovedTo, service: ServiceDep, _: AdminDep) -> None:
    """The guest now lives at the broker ``url`` (``tmem-broker migrate``, once it verified the
    copy there): it is deleted here and its token's calls are redirected (307) to ``url``."""
    await service.move_away(guest_id, body.url.rstrip("/"))
