"""Bearer tokens: the admin token and the guests' tokens.

Guest tokens are ``secrets.token_urlsafe(32)`` (256 random bits), shown once and stored only as
their SHA-256. A fast unsalted hash is enough here, unlike for passwords: a slow or salted hash
defends a *guessable* secret against offline guessing, and 256 random bits cannot be guessed,
so a stolen hash gives no way back to the token. Being fast matters, because every page request
is authenticated: the hot path hashes the presented token once and looks the hash up in an
in-memory dict (:class:`TokenRegistry`), never in SQL. The admin token is compared with
``hmac.compare_digest``. A guest token is found by its digest instead: the dict compares
digests, never the token, so timing it tells an attacker at most how many leading bytes of a
SHA-256 digest matched, and steering a digest's prefix is a preimage search; this is what lets
the hot path stay one dict lookup. Tokens are never logged: only guest ids are.

This module is the one authentication path of the HTTP shell: the FastAPI dependencies
(``deps.py``), the plain Starlette page routes (``guest_pages.py``) and the notice WebSocket all
do::

    token = bearer_token(scope)               # the Authorization: Bearer header, parsed once
    guest_id = tokens.guest(token)            # or tokens.admin(token); 401/403 when refused
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from starlette.types import Scope

from broker.api.errors import Forbidden, Unauthorised

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin-token"


def new_token() -> str:
    """A fresh token of 256 random bits (URL-safe text)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> bytes:
    """The 32-byte SHA-256 of a token, as stored in SQL and in the registry."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class TokenRegistry:
    """Maps token hashes to guest ids, in memory, loaded from SQL at start.

    ``guest_for(header)`` is the hot-path check: one hash and one dict lookup.
    """

    def __init__(self, admin_token: str) -> None:
        self._admin_hash = hash_token(admin_token)
        self._guests: dict[bytes, int] = {}

    def add(self, token_hash: bytes, guest_id: int) -> None:
        self._guests[token_hash] = guest_id

    def remove_guest(self, guest_id: int) -> None:
        for key in [k for k, g in self._guests.items() if g == guest_id]:
            del self._guests[key]

    def guest_for_token(self, token: str) -> int | None:
        """The guest id of ``token``, or ``None``."""
        return self._guests.get(hash_token(token))

    def is_admin(self, token: str) -> bool:
        return hmac.compare_digest(hash_token(token), self._admin_hash)

    def guest(self, token: str | None) -> int:
        """The guest id of ``token``; :class:`Unauthorised` when it is missing or unknown,
        :class:`Forbidden` when it is the admin token (which is not a guest's)."""
        if token is None:
            raise Unauthorised("missing bearer token")
        guest_id = self._guests.get(hash_token(token))
        if guest_id is not None:
            return guest_id
        if self.is_admin(token):
            raise Forbidden("this endpoint is for guests; the admin token is not a guest's")
        raise Unauthorised("unknown token")

    def admin(self, token: str | None) -> None:
        """Returns when ``token`` is the admin token; :class:`Unauthorised` when it is missing or
        unknown, :class:`Forbidden` when it is a guest's."""
        if token is None:
            raise Unauthorised("missing bearer token")
        if self.is_admin(token):
            return
        if self.guest_for_token(token) is not None:
            raise Forbidden("this endpoint needs the admin token")
        raise Unauthorised("unknown token")

    def __len__(self) -> int:
        return len(self._guests)


def bearer_token(scope: Scope) -> str | None:
    """The token of the request's ``Authorization: Bearer <token>`` header, or ``None``.

    Reads the raw ASGI headers (no ``Headers`` object: this runs on every page request).
    """
    for name, value in scope["headers"]:
        if name == b"authorization":
            return bearer_value(value)
    return None


def bearer_value(value: bytes | None) -> str | None:
    """The token of an ``Authorization`` header's value (``Bearer <token>``), or ``None``."""
    if value is None or value[:7].lower() != b"bearer ":
        return None
    return value[7:].strip().decode("latin-1") or None


def load_or_create_admin_token(data_dir: Path) -> tuple[str, Path, bool]:
    """The admin token kept in ``data_dir/admin-token`` (mode 0600), made at first start.

    Returns ``(token, path, created)``.
    """
    path = data_dir / ADMIN_TOKEN_FILE
    if path.exists():
        token = path.read_text(encoding="utf-8").strip()
        if token:
            return token, path, False
    data_dir.mkdir(parents=True, exist_ok=True)
    token = new_token()
    # O_EXCL + 0600 at creation: the token is never readable by others, not even briefly.
    tmp = path.with_name(f".{ADMIN_TOKEN_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    os.replace(tmp, path)
    log.warning("generated an admin token; it is in %s (mode 0600)", path)
    return token, path, True
