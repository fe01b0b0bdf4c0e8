"""The guest agent's one exception tree.

A declined put is **not** an exception: :meth:`TmemClient.put` returns a falsy
:class:`~guest_agent.client.PutResult` carrying the reason. A get that misses returns ``None``.
Everything below is a real failure::

    TmemClientError                   anything the agent raises on purpose
    ├── BrokerUnavailable             connect refused, reset, timeout, dropped connection
    ├── ProtocolError                 the answer is not HTTP/1.1 or not the contract's shape
    ├── BrokerError(status, code, message)   the broker answered with an error status
    │   ├── BadRequest                400, 413, 422: malformed request (nothing changed)
    │   ├── AuthError                 401: no or bad token
    │   ├── Forbidden                 403: not yours (e.g. a shared pool without authorisation)
    │   ├── NotFound                  404 other than a page miss
    │   │   ├── UnknownPool           404 ``unknown_pool``
    │   │   └── UnknownGuest          404 ``unknown_guest``
    │   ├── Conflict                  409 other than a declined put (e.g. ``too_many_pools``)
    │   ├── RateLimited               429 (``retry_after`` seconds when the broker said)
    │   └── ServerError               5xx: a broker bug, or 503 while it starts or reloads
    └── ShimError                     the frontswap/cleancache shims and their fallback store
        ├── PageUnavailable           a page only the broker holds could not be loaded after
        │                             the configured retries (the broker is unreachable)
        ├── FallbackFull              the local fallback file has no free slot left
        └── NotInitialised            an operation on a swap type that was never ``init``-ed

Catch :class:`BrokerUnavailable` to fall back locally, :class:`BrokerError` to inspect
``status`` and ``code``, and :class:`TmemClientError` for all of them.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BadRequest",
    "BrokerError",
    "BrokerUnavailable",
    "Conflict",
    "FallbackFull",
    "Forbidden",
    "NotFound",
    "NotInitialised",
    "PageUnavailable",
    "ProtocolError",
    "RateLimited",
    "ServerError",
    "ShimError",
    "TmemClientError",
    "UnknownGuest",
    "UnknownPool",
    "error_for_status",
]


class TmemClientError(Exception):
    """Root of every exception the guest agent raises on purpose."""


class BrokerUnavailable(TmemClientError):
    """The broker could not be reached or the connection broke before an answer arrived.

    Whether a non-idempotent request took effect is unknown when this is raised mid-request."""


class ProtocolError(TmemClientError):
    """The broker's answer could not be parsed (not HTTP/1.1, bad length, bad batch body)."""


class BrokerError(TmemClientError):
    """The broker answered with an error status; ``code`` is the contract's snake_case code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class BadRequest(BrokerError):
    """400, 413 or 422: the request was malformed and changed nothing."""


class AuthError(BrokerError):
    """401: the token is missing or wrong."""


class Forbidden(BrokerError):
    """403: the resource is not this guest's (e.g. an unauthorised shared pool)."""


class NotFound(BrokerError):
    """404 for anything but a page miss (a miss is a ``None`` result)."""


class UnknownPool(NotFound):
    """404 ``unknown_pool``: the pool id is not one of this guest's pools."""


class UnknownGuest(NotFound):
    """404 ``unknown_guest``."""


class Conflict(BrokerError):
    """409 other than a declined put, e.g. ``too_many_pools``."""


class RateLimited(BrokerError):
    """429: slow down; ``retry_after`` is the broker's hint in seconds, when it gave one."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(status, code, message)
        self.retry_after = retry_after


class ServerError(BrokerError):
    """5xx: a broker bug, or 503 while the broker is starting or reloading."""


class ShimError(TmemClientError):
    """Errors of the frontswap/cleancache shims and their local fallback store."""


class PageUnavailable(ShimError):
    """A page that only the broker holds could not be loaded after the configured retries."""


class FallbackFull(ShimError):
    """The local fallback store has no free slot (its size limit was reached)."""


class NotInitialised(ShimError):
    """The swap type was never initialised with :meth:`Frontswap.init`."""


def error_for_status(
    status: int, code: str, message: str, retry_after: float | None = None
) -> BrokerError:
    """The exception class the contract's ``status`` and ``code`` map to."""
    if status == 404:
        if code == "unknown_pool":
            return UnknownPool(status, code, message)
        if code == "unknown_guest":
            return UnknownGuest(status, code, message)
        return NotFound(status, code, message)
    if status == 429:
        return RateLimited(status, code, message, retry_after)
    if status >= 500:
        return ServerError(status, code, message)
    cls = _BY_STATUS.get(status, BrokerError)
    return cls(status, code, message)


_BY_STATUS: dict[int, type[BrokerError]] = {
    400: BadRequest,
    413: BadRequest,
    422: BadRequest,
    401: AuthError,
    403: Forbidden,
    409: Conflict,
}
