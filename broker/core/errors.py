"""Errors of the tmem core: malformed input and unknown names. A declined put is *not* an
error: :meth:`broker.core.Tmem.put` returns a :class:`broker.core.Status` for it.

Every class carries the HTTP ``status`` and the snake_case ``code`` the shell answers with::

    TmemError                      (500, "tmem_error"; never raised itself)
    ├── BadRequest                 400 bad_request
    │   ├── BadPageSize            400 bad_page_size    a page that is not exactly 4096 bytes
    │   └── BadHandle              400 bad_handle       oid or index out of range
    ├── UnknownGuest               404 unknown_guest
    ├── UnknownPool                404 unknown_pool
    ├── NotAuthorised              403 not_authorised   shared pool without authorisation
    └── Conflict                   409 conflict
        ├── TooManyPools           409 too_many_pools   every pool id of the guest is in use
        └── GuestExists            409 guest_exists     add_guest with an id already known

A raised error changes nothing in the core.
"""

from __future__ import annotations


class TmemError(Exception):
    """Base of every core error; ``status`` and ``code`` say how the shell answers it."""

    status: int = 500
    code: str = "tmem_error"


class BadRequest(TmemError):
    """Malformed input (400)."""

    status = 400
    code = "bad_request"


class BadPageSize(BadRequest):
    """A page that is not exactly 4096 bytes."""

    code = "bad_page_size"


class BadHandle(BadRequest):
    """An oid outside 0 <= oid < 2**192 or an index outside 0 <= index < 2**32."""

    code = "bad_handle"


class UnknownGuest(TmemError):
    """No guest with that id."""

    status = 404
    code = "unknown_guest"


class UnknownPool(TmemError):
    """The guest has no pool with that id."""

    status = 404
    code = "unknown_pool"


class NotAuthorised(TmemError):
    """The guest is not authorised for that shared-pool UUID."""

    status = 403
    code = "not_authorised"


class Conflict(TmemError):
    """The request conflicts with the current state (409)."""

    status = 409
    code = "conflict"


class TooManyPools(Conflict):
    """Every pool id of the guest is in use."""

    code = "too_many_pools"


class GuestExists(Conflict):
    """A guest with that id exists already."""

    code = "guest_exists"
