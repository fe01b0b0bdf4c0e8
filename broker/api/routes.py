"""The JSON routes of /v1: admin (guests, freeze/thaw/flush, shared-pool authorisation,
stats, settings) and guest (pools, self, pressure, notices). The page routes and the batch are
plain Starlette routes in ``pages.py``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response, WebSocket, WebSocketDisconnect
from pydantic import ConfigDict, Field

from broker.api.auth import bearer
from broker.api.deps import AdminDep, GuestDep, ServiceDep
from broker.api.errors import (
    ApiError,
    BadInput,
    Forbidden,
    RateLimited,
    Unauthorised,
    UnknownNotice,
    error_response,
)
from broker.api.notices import MAX_WAIT_SECONDS
from broker.api.pressure_loop import PressureSettingsPatch, PressureSettingsView
from broker.api.service import BrokerService
from broker.core.figures import as_json
from broker.settings import Size
from schemas.wire import (
    Ack,
    GuestCreate,
    GuestCreated,
    GuestInfo,
    GuestPatch,
    Notice,
    PoolCreate,
    PoolInfo,
    Pressure,
    SelfInfo,
    SharedAuth,
)

log = logging.getLogger(__name__)

# Ids are bounded by what their SQL columns hold (INTEGER, BIGINT), so an absurd id is a 422,
# never a database error.
GuestId = Annotated[int, Path(ge=0, le=0x7FFFFFFF)]
PoolId = Annotated[int, Path(ge=0, le=0x7FFFFFFF)]
Seq = Annotated[int, Path(ge=0, le=(1 << 63) - 1)]
After = Annotated[int, Query(ge=0, le=(1 << 63) - 1)]

admin = APIRouter(prefix="/v1", tags=["admin"])
guest = APIRouter(prefix="/v1", tags=["guest"])


class PressureView(Pressure):
    received_at: str


class AdminGuestInfo(GuestInfo):
    """A guest as admins see it: ``GuestInfo`` plus its latest pressure report."""

    pressure: PressureView | None = None


class BrokerSettings(PressureSettingsView):
    capacity_bytes: int


class SettingsPatch(PressureSettingsPatch):
    model_config = ConfigDict(extra="forbid")

    capacity: Annotated[Size, Field(ge=4096)] | None = None


# admin ------------------------------------------------------------------------------------


@admin.post("/guests", status_code=201, response_model=GuestCreated)
async def create_guest(body: GuestCreate, service: ServiceDep, _: AdminDep) -> dict[str, Any]:
    """Create a guest; the answer carries its token, which is never shown again."""
    record, token = await service.create_guest(body)
    return {**service.guest_info(record.guest_id), "token": token}


@admin.get("/guests", response_model=list[AdminGuestInfo])
async def list_guests(service: ServiceDep, _: AdminDep) -> list[dict[str, Any]]:
    """Every guest, with its pools, stats and latest pressure report."""
    return [service.guest_info(gid) for gid in sorted(service.guests)]


@admin.get("/guests/{guest_id}", response_model=AdminGuestInfo)
async def show_guest(guest_id: GuestId, service: ServiceDep, _: AdminDep) -> dict[str, Any]:
    """One guest, with its pools, stats and latest pressure report."""
    return service.guest_info(guest_id)


@admin.patch("/guests/{guest_id}", response_model=AdminGuestInfo)
async def patch_guest(
    guest_id: GuestId, body: GuestPatch, service: ServiceDep, _: AdminDep
) -> dict[str, Any]:
    """Change weight, cap_pages (sends a ``quota`` notice), compress or dedup_domain."""
    changes = body.model_dump(include=body.model_fields_set)
    for key in ("weight", "compress", "dedup_domain"):
        if key in changes and changes[key] is None:
            del changes[key]  # null means "unchanged" for these; only cap_pages can be null
    service.guest_record(guest_id)
    if changes:
        await service.update_guest(guest_id, changes)
    return service.guest_info(guest_id)


@admin.delete("/guests/{guest_id}", status_code=204, response_class=Response)
async def delete_guest(guest_id: GuestId, service: ServiceDep, _: AdminDep) -> None:
    """Delete a guest: every page of it is gone, its token stops working."""
    await service.delete_guest(guest_id)


@admin.post("/guests/{guest_id}/freeze", status_code=204, response_class=Response)
async def freeze_guest(guest_id: GuestId, service: ServiceDep, _: AdminDep) -> None:
    """Freeze a guest: its puts are declined with ``frozen`` until thawed."""
    await service.set_frozen(guest_id, True)


@admin.post("/guests/{guest_id}/thaw", status_code=204, response_class=Response)
async def thaw_guest(guest_id: GuestId, service: ServiceDep, _: AdminDep) -> None:
    """Thaw a frozen guest."""
    await service.set_frozen(guest_id, False)


@admin.post("/guests/{guest_id}/flush", status_code=204, response_class=Response)
async def flush_guest(guest_id: GuestId, service: ServiceDep, _: AdminDep) -> None:
    """Flush every page of every pool of a guest; the pools stay."""
    await service.flush_guest(guest_id)


@admin.post("/shared-auth", status_code=204, response_class=Response)
async def shared_auth(body: SharedAuth, service: ServiceDep, _: AdminDep) -> None:
    """Allow (or stop allowing) a guest to create or join the shared pool ``uuid``."""
    await service.set_shared_auth(str(body.uuid), body.guest_id, body.allow)


@admin.get("/stats")
async def stats(service: ServiceDep, _: AdminDep) -> dict[str, Any]:
    """Global figures (capacity, use, dedup, counters) and one entry per guest."""
    return as_json(service.stats())


@admin.get("/settings", response_model=BrokerSettings)
async def get_settings(service: ServiceDep, _: AdminDep) -> BrokerSettings:
    """The settings an admin can change at run time."""
    return _settings_view(service)


def _settings_view(service: BrokerService) -> BrokerSettings:
    pressure = service.pressure_loop.settings.as_dict() if service.pressure_loop else {}
    return BrokerSettings(capacity_bytes=service.core.capacity_bytes, **pressure)


@admin.patch("/settings", response_model=BrokerSettings)
async def patch_settings(body: SettingsPatch, service: ServiceDep, _: AdminDep) -> BrokerSettings:
    """Change the capacity or pressure tunables (kept in SQL; they win over the flags after a
    restart)."""
    changes = body.pressure_changes()
    if changes and service.pressure_loop is not None:
        try:
            service.pressure_loop.settings.updated(changes)
        except ValueError as exc:
            raise BadInput(f"pressure settings: {exc}") from exc
    if body.capacity is not None:
        await service.set_capacity(body.capacity)
    if changes and service.pressure_loop is not None:
        await service.pressure_loop.update_settings(changes)
    return _settings_view(service)


# guest ------------------------------------------------------------------------------------


@guest.post("/pools", status_code=201, response_model=PoolInfo)
async def create_pool(body: PoolCreate, service: ServiceDep, guest_id: GuestDep) -> PoolInfo:
    """Create a pool (persistent: frontswap; ephemeral: cleancache; shared: by UUID)."""
    return await service.create_pool(guest_id, body)


@guest.delete("/pools/{pool_id}", status_code=204, response_class=Response)
async def destroy_pool(pool_id: PoolId, service: ServiceDep, guest_id: GuestDep) -> None:
    """Destroy a pool and every page in it (idempotent)."""
    await service.destroy_pool(guest_id, pool_id)


@guest.get("/self", response_model=SelfInfo)
async def self_info(service: ServiceDep, guest_id: GuestDep) -> dict[str, Any]:
    """The calling guest, its quota, its pools and its own stats."""
    info = service.guest_info(guest_id)
    info.pop("pressure", None)
    return info


@guest.post("/self/pressure", status_code=204, response_class=Response)
async def pressure(body: Pressure, service: ServiceDep, guest_id: GuestDep) -> None:
    """Report the guest's own memory pressure (the latest report is kept)."""
    service.record_pressure(guest_id, body)


@guest.get("/notices", response_model=list[Notice])
async def notices(
    service: ServiceDep,
    guest_id: GuestDep,
    after: After = 0,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS)] = 0,
) -> list[Notice]:
    """Notices with ``seq > after``; waits up to ``wait`` seconds (<= 60) when there are none."""
    if wait <= 0:
        return await service.hub.poll(guest_id, after, 0)
    # A waiting poll holds a slot of the guest's bounded waiters (429 when none is free).
    with service.limits.waiter(guest_id):
        return await service.hub.poll(guest_id, after, wait)


@guest.post("/notices/{seq}/ack", status_code=204, response_class=Response)
async def ack_notice(seq: Seq, body: Ack, service: ServiceDep, guest_id: GuestDep) -> None:
    """Acknowledge a notice (for a shed: how many pages the guest returned)."""
    if not await service.hub.ack(guest_id, seq, body.pages_returned):
        raise UnknownNotice(f"no notice {seq}")
    if service.pressure_loop is not None:
        service.pressure_loop.acked(guest_id, seq, body.pages_returned)


@guest.websocket("/notices/ws")
async def notices_ws(websocket: WebSocket, after: After = 0) -> None:
    """Notices pushed as JSON text frames: first the backlog after ``after``, then new ones.

    The token goes in the ``Authorization`` header or the ``token`` query parameter.
    """
    service = websocket.app.state.box.service
    token = bearer(websocket.headers.get("authorization")) or websocket.query_params.get("token")
    guest_id = service.tokens.guest_for_token(token) if token else None
    if guest_id is None:
        # Refused at the handshake with the status a plain request would get (401, or 403 for
        # the admin token) where the server can answer HTTP; else close 1008 (clients see 403).
        if token and service.tokens.is_admin(token):
            await _refuse_ws(websocket, Forbidden("the notice WebSocket is for guests"))
        else:
            await _refuse_ws(websocket, Unauthorised("missing or unknown guest token"))
        return
    try:
        if service.limits.enabled:
            service.limits.charge(guest_id)
        with service.limits.waiter(guest_id):
            await _push_notices(websocket, service, guest_id, after)
    except RateLimited as exc:
        await _refuse_ws(websocket, exc)


async def _refuse_ws(websocket: WebSocket, exc: ApiError) -> None:
    """Refuse a handshake with ``exc``'s answer where the server can send one, else 1008."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(error_response(exc))
    else:
        await websocket.close(code=1008, reason=exc.code)


async def _push_notices(
    websocket: WebSocket, service: BrokerService, guest_id: int, after: int
) -> None:
    await websocket.accept()
    await service.ready.wait()

    async def drain() -> None:
        # Nothing is expected from the client; reading notices a disconnect at once.
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                await websocket.receive_text()

    reader = asyncio.create_task(drain())
    last = after
    try:
        while not reader.done() and not service.hub.closing:
            poll = asyncio.create_task(service.hub.poll(guest_id, last, MAX_WAIT_SECONDS))
            await asyncio.wait({poll, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not poll.done():
                poll.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poll
                break
            for notice in poll.result():
                await websocket.send_text(notice.model_dump_json())
                last = notice.seq
            if guest_id not in service.guests:
                break
    except WebSocketDisconnect:
        pass
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect):
            await reader
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        await websocket.close()
