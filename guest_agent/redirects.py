"""Following a broker's ``307 Temporary Redirect`` to a guest's home broker.

In a cluster of brokers (docs/scale.md) every guest has one home broker; any other broker
answers the guest's calls with ``307`` and ``Location`` on the home's URL (the same path). The
clients resend the same request there, ``Authorization`` included (a 307 keeps the method and
the body), and remember the new address for the calls that follow, so one move costs one extra
round trip per client. A chain of redirects is bounded (:data:`MAX_HOPS`) and a loop (a broker
seen twice in one chain, as while a move is still settling) fails the call as
:class:`~guest_agent.errors.BrokerUnavailable`, which the agents' retry policy retries.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from guest_agent.errors import BrokerUnavailable, ProtocolError
from guest_agent.transport import Request, Response

MAX_HOPS = 4
REDIRECTS = frozenset((307, 308))
# sent with a request resent after a redirect: the broker then asks its database where the
# guest lives instead of trusting a view a few hundred ms old (which, just after a move, may
# still name the broker that redirected us)
REDIRECTED_HEADER = ("X-Tmem-Redirected", "1")


def resent(request: Request) -> Request:
    """``request`` as it is sent again after a redirect (with :data:`REDIRECTED_HEADER`)."""
    if REDIRECTED_HEADER in request.headers:
        return request
    return Request(
        request.method, request.target, request.body, [*request.headers, REDIRECTED_HEADER]
    )


def is_redirect(response: Response) -> bool:
    return response.status in REDIRECTS and "location" in response.headers


def new_base(target: str, response: Response) -> str:
    """The broker base URL a redirect of the request ``target`` points at: the ``Location``
    without the request's own path (a broker under a path prefix keeps its prefix)."""
    location = response.headers["location"]
    parts = urlsplit(location)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ProtocolError(f"the broker redirected to {location!r}, not an http(s) URL")
    if location.endswith(target):
        base = location[: len(location) - len(target)]
    else:
        base = f"{parts.scheme}://{parts.netloc}"
    return base.rstrip("/")


class Chain:
    """The brokers one request went through; :meth:`next` checks the bounds."""

    __slots__ = ("seen",)

    def __init__(self, first: str) -> None:
        self.seen = [first.rstrip("/")]

    def next(self, base: str) -> str:
        if base in self.seen:
            raise BrokerUnavailable(
                f"redirect loop {' -> '.join([*self.seen, base])}: the guest's home is moving"
            )
        if len(self.seen) > MAX_HOPS:
            raise BrokerUnavailable(f"more than {MAX_HOPS} redirects: {' -> '.join(self.seen)}")
        self.seen.append(base)
        return base
