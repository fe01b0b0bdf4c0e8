"""Guest control: the JSON routes a guest calls besides its pages (pools, self, pressure
reports, notices by long-poll and WebSocket). The pages are in ``guest_pages.py``."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response, WebSocket, WebSocketDisconnect

from broker.api.auth import bearer_token
from broker.api.deps import GuestDep, ServiceDep
from broker.api.errors import ApiError, RateLimited, UnknownNotice, error_response
from broker.api.notices import MAX_WAIT_SECONDS
from broker.api.service import BrokerService
from broker.cluster.routing import target_of
from schemas.wire import Ack, Notice, PoolCreate, PoolInfo, Pressure, SelfInfo, ShedCandidate

# Ids are bounded by what their SQL columns hold (INTEGER, BIGINT), so an absurd id is a 422,
# never a database error.
PoolId = Annotated[int, Path(ge=0, le=0x7FFFFFFF)]
Seq = Annotated[int, Path(ge=0, le=(1 << 63) - 1)]
After = Annotated[int, Query(ge=0, le=(1 << 63) - 1)]

router = APIRouter(prefix="/v1", tags=["guest"])


@router.post("/pools", status_code=201, response_model=PoolInfo)
async def create_pool(body: PoolCreate, service: ServiceDep, guest_id: GuestDep) -> PoolInfo:
    """Create a pool (persistent: frontswap; ephemeral: cleancache; shared: by UUID)."""
    return await service.create_pool(guest_id, body)


@router.delete("/pools/{pool_id}", status_code=204, response_class=Response)
async def destroy_pool(pool_id: PoolId, service: ServiceDep, guest_id: GuestDep) -> None:
    """Destroy a pool and every page in it (idempotent)."""
    await service.destroy_pool(guest_id, pool_id)


@router.get("/self", response_model=SelfInfo)
async def self_info(service: ServiceDep, guest_id: GuestDep) -> dict[str, Any]:
    """The calling guest, its quota, its pools and its own stats."""
    info = service.guest_info(guest_id)
    info.pop("pressure", None)
    return info


@router.post("/self/pressure", status_code=204, response_class=Response)
async def pressure(body: Pressure, service: ServiceDep, guest_id: GuestDep) -> None:
    """Report the guest's own memory pressure (the latest report is kept)."""
    service.record_pressure(guest_id, body)


@router.get("/self/shed-candidates", response_model=list[ShedCandidate])
async def shed_candidates(
    service: ServiceDep,
    guest_id: GuestDep,
    limit: Annotated[int, Query(ge=0, le=4096)] = 256,
) -> list[ShedCandidate]:
    """The guest's coldest persistent pages by last access, coldest first: return these first."""
    return [
        ShedCandidate(pool_id=pool_id, oid=str(oid), index=index)
        for pool_id, oid, index in service.core.shed_candidates(guest_id, limit)
    ]


@router.get("/notices", response_model=list[Notice])
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


@router.post("/notices/{seq}/ack", status_code=204, response_class=Response)
async def ack_notice(seq: Seq, body: Ack, service: ServiceDep, guest_id: GuestDep) -> None:
    """Acknowledge a notice (for a shed: how many pages the guest returned)."""
    if not await service.hub.ack(guest_id, seq, body.pages_returned):
        raise UnknownNotice(f"no notice {seq}")
    service.pressure_loop.acked(guest_id, seq, body.pages_returned)


@router.websocket("/notices/ws")
async def notices_ws(websocket: WebSocket, after: After = 0) -> None:
    """Notices pushed as JSON text frames: first the backlog after ``after``, then new ones.

    The token goes in the ``Authorization`` header or the ``token`` query parameter.
    """
    service: BrokerService = websocket.app.state.box.service
    token = bearer_token(websocket.scope) or websocket.query_params.get("token") or None
    try:
        guest_id = service.tokens.guest(token)
        if service.cluster is not None and not service.cluster.serves(guest_id):
            # the home pushes the guest's notices: a 307 there (docs/scale.md)
            await service.cluster.route(guest_id, target_of(websocket.scope))
        if service.limits.enabled:
            service.limits.charge(guest_id)
    except ApiError as exc:
        # Refused at the handshake with the status a plain request would get (401, 403 for the
        # admin token, 429) where the server can answer HTTP; else close 1008 (clients see 403).
        await _refuse_ws(websocket, exc)
        return
    try:
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
