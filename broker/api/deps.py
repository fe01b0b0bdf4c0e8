"""FastAPI dependencies of the JSON routes, as ``Annotated`` aliases.

``ServiceDep`` is the broker; ``GuestDep`` authenticates a guest token (and charges the guest's
request rate) and is its guest id; ``AdminDep`` authenticates the admin token. Both go through
``auth`` (``bearer_token`` and the ``TokenRegistry``), the same path the page routes take.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.openapi.models import HTTPBearer as HTTPBearerModel
from fastapi.security.base import SecurityBase
from starlette.requests import HTTPConnection

from broker.api.auth import bearer_token
from broker.api.service import BrokerService
from broker.cluster.routing import guest_of


class BearerToken(SecurityBase):
    """The request's bearer token (or ``None``), parsed by :func:`broker.api.auth.bearer_token`.

    A ``SecurityBase`` so that OpenAPI documents the operations that use it with the
    ``HTTPBearer`` scheme, as FastAPI's own ``HTTPBearer`` would.
    """

    def __init__(self) -> None:
        self.model = HTTPBearerModel(description="the admin token or a guest token")
        self.scheme_name = "HTTPBearer"

    async def __call__(self, conn: HTTPConnection) -> str | None:
        return bearer_token(conn.scope)


_Token = Annotated[str | None, Depends(BearerToken())]


async def get_service(request: Request) -> BrokerService:
    service: BrokerService | None = request.app.state.box.service
    if service is None:
        raise RuntimeError("the broker has not started")
    if not service.ready.is_set():
        await service.ready.wait()  # the journal is still being reloaded
    return service


ServiceDep = Annotated[BrokerService, Depends(get_service)]


async def require_guest(service: ServiceDep, token: _Token, request: Request) -> int:
    if service.cluster is None and not service.moved:
        guest_id = service.tokens.guest(token)
    else:
        guest_id = await guest_of(service, request.scope)  # NotHome: a 307 to the home
    if service.limits.enabled:
        service.limits.charge(guest_id)  # 429 when over the guest's own request rate
    return guest_id


async def require_admin(service: ServiceDep, token: _Token) -> None:
    service.tokens.admin(token)


GuestDep = Annotated[int, Depends(require_guest)]
AdminDep = Annotated[None, Depends(require_admin)]
