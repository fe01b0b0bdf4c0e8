"""Any broker answers any guest: the redirects to a guest's home broker.

A broker that is not a guest's home answers the guest's calls with ``307`` and ``Location`` on
the home's URL and the same path (:class:`broker.api.errors.NotHome`); the agents follow it and
remember the new address (``guest_agent.redirects``). Why a redirect and not a forward: a
forwarded page crosses the network twice and costs a second broker's CPU on every call for as
long as the agent keeps calling the wrong broker, while a redirect costs one extra round trip
once per move (docs/scale.md, "Redirects").

The same redirect answers the token of a guest moved away by ``tmem-broker migrate`` (the old
broker remembers where it went), and an admin's per-guest change sent to another broker than
the guest's home (:class:`AdminHomeRedirect`).

Use, in a guest route::

    guest_id = await guest_of(service, scope)   # 401/403, or NotHome (307), or the guest
"""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from broker.api.auth import bearer_token, hash_token
from broker.api.errors import NotHome, Unauthorised, error_response
from broker.api.service import BrokerService, ServiceBox
from broker.cluster.errors import ClusterUnavailable, Fenced


def target_of(scope: Scope) -> str:
    """The request's path with its query string, as a redirect repeats it."""
    query = scope.get("query_string") or b""
    path = scope.get("root_path", "") + scope["path"]
    return f"{path}?{query.decode('latin-1')}" if query else path


async def guest_of(service: BrokerService, scope: Scope) -> int:
    """Authenticate the guest of ``scope`` and make sure this broker serves it.

    Raises :class:`Unauthorised`/``Forbidden`` as ``TokenRegistry.guest`` does, and
    :class:`NotHome` when the guest lives at another broker (a cluster, or a migration)."""
    guest_id = await guest_of_token(service, bearer_token(scope), scope)
    cluster = service.cluster
    if cluster is not None and not cluster.serves(guest_id):
        await cluster.route(guest_id, target_of(scope), fresh=was_redirected(scope))
    return guest_id


async def guest_of_token(service: BrokerService, token: str | None, scope: Scope) -> int:
    """The guest of ``token`` (also one created through another broker since the last sync,
    or moved away by a migration: :class:`NotHome`); refusals as ``TokenRegistry.guest``."""
    try:
        return service.tokens.guest(token)
    except Unauthorised:
        return await _unknown_token(service, token, scope)


REDIRECTED = b"x-tmem-redirected"  # set by the agents on a request they resend after a 307


def was_redirected(scope: Scope) -> bool:
    return any(name == REDIRECTED for name, _ in scope["headers"])


async def _unknown_token(service: BrokerService, token: str | None, scope: Scope) -> int:
    if token is not None:
        url = service.moved.get(hash_token(token)) if service.moved else None
        if url is not None:
            raise NotHome(url.rstrip("/") + target_of(scope), "migrated")
        if service.cluster is not None:
            # a guest created through another broker since the last sync: one indexed
            # lookup of the token's hash (the token is unknown here, so this is no hot path)
            guest_id = await service.cluster.learn_token(hash_token(token))
            if guest_id is not None:
                return guest_id
    return service.tokens.guest(token)  # raises the right refusal


async def fenced_redirect(service: BrokerService | None, exc: Fenced, scope: Scope) -> Exception:
    """What to answer when the page store refused a write because another broker holds the
    guest at a higher epoch: the redirect to its home (this broker stops serving it)."""
    if service is None or service.cluster is None:
        return ClusterUnavailable(str(exc))
    return await service.cluster.fenced(exc.guest_id, target_of(scope))


async def handle_fenced(request: Request, exc: Any) -> Response:
    """The app's exception handler for :class:`Fenced` (JSON routes): the same redirect."""
    service = request.app.state.box.service
    return error_response(await fenced_redirect(service, exc, request.scope))


# /v1/guests/{id} and its per-guest actions: the home broker changes the guest's core state
_ADMIN_GUEST = re.compile(r"^/v1/guests/(\d{1,10})(?:/(freeze|thaw|flush|export|pools))?$")


class AdminHomeRedirect:
    """ASGI middleware (cluster mode): an admin's change of one guest (PATCH or DELETE of
    ``/v1/guests/{id}``, freeze, thaw, flush, export) or a read of its pools' figures made at a
    broker that is not the guest's home is redirected there, where the guest's state lives.
    ``GET /v1/guests/{id}`` is answered by any broker from SQL and the home's published
    figures."""

    def __init__(self, app: ASGIApp, box: ServiceBox) -> None:
        self.app = app
        self.box = box

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = self.box.service
        if scope["type"] != "http" or service is None or service.cluster is None:
            await self.app(scope, receive, send)
            return
        match = _ADMIN_GUEST.match(scope["path"])
        if match is None or (scope["method"] == "GET" and match.group(2) is None):
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        guest_id = int(match.group(1))
        if token is not None and service.tokens.is_admin(token):
            await service.cluster.know(guest_id)
        if token is None or not service.tokens.is_admin(token) or guest_id not in service.guests:
            await self.app(scope, receive, send)  # the route refuses it as usual
            return
        try:
            await service.cluster.route(guest_id, target_of(scope), fresh=was_redirected(scope))
        except NotHome as exc:
            await error_response(exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)
