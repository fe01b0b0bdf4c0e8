"""FastAPI dependencies of the JSON routes, as ``Annotated`` aliases.

``ServiceDep`` is the broker; ``GuestDep`` authenticates a guest token and is its guest id;
``AdminDep`` authenticates the admin token. The page routes (``pages.py``) do the same checks
inline, without FastAPI's dependency machinery.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from broker.api.errors import Forbidden, Unauthorised
from broker.api.service import BrokerService

_bearer = HTTPBearer(auto_error=False, description="the admin token or a guest token")
_Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def get_service(request: Request) -> BrokerService:
    service: BrokerService | None = request.app.state.box.service
    if service is None:
        raise RuntimeError("the broker has not started")
    if not service.ready.is_set():
        await service.ready.wait()  # the journal is still being reloaded
    return service


ServiceDep = Annotated[BrokerService, Depends(get_service)]


def guest_id_of(service: BrokerService, token: str | None) -> int:
    """The guest id of a token, or the fitting 401/403."""
    if token is None:
        raise Unauthorised("missing bearer token")
    guest_id = service.tokens.guest_for_token(token)
    if guest_id is not None:
        return guest_id
    if service.tokens.is_admin(token):
        raise Forbidden("this endpoint is for guests; the admin token is not a guest's")
    raise Unauthorised("unknown token")


async def require_guest(service: ServiceDep, credentials: _Credentials) -> int:
    guest_id = guest_id_of(service, credentials.credentials if credentials else None)
    if service.limits.enabled:
        service.limits.charge(guest_id)  # 429 when over the guest's own request rate
    return guest_id


async def require_admin(service: ServiceDep, credentials: _Credentials) -> None:
    if credentials is None:
        raise Unauthorised("missing bearer token")
    if service.tokens.is_admin(credentials.credentials):
        return
    if service.tokens.guest_for_token(credentials.credentials) is not None:
        raise Forbidden("this endpoint needs the admin token")
    raise Unauthorised("unknown token")


GuestDep = Annotated[int, Depends(require_guest)]
AdminDep = Annotated[None, Depends(require_admin)]
