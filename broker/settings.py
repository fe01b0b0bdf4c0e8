"""Service settings: every ``tmem-broker serve`` flag, also read as ``TMEM_<FLAG>``.

Build one with ``Settings()`` (environment only) or ``Settings(port=0, data_dir=...)``; pass it
explicitly to :func:`broker.app.create_app`. Sizes take ``B``, ``KiB``, ``MiB``, ``GiB`` (and
``TiB``) suffixes, or a plain number of bytes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.batch import HEADER, PAGE_SIZE

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*([A-Za-z]*)\s*$")


def parse_size(value: str | int) -> int:
    """Bytes of a size such as ``"1GiB"``, ``"512 MiB"``, ``"4096B"`` or ``4096``.

    Only binary suffixes are accepted: ``1GB`` is refused rather than guessed.
    """
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _SIZE.match(value)
    if match is None:
        raise ValueError(f"not a size: {value!r} (use e.g. 4096, 64MiB, 1GiB)")
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"unknown size unit {unit!r} (use B, KiB, MiB, GiB or TiB)")
    return int(number) * factor


def _size(value: object) -> object:
    return parse_size(value) if isinstance(value, str | int) else value


Size = Annotated[int, BeforeValidator(_size)]


class Settings(BaseSettings):
    """The broker's configuration; field names are the CLI flags with ``-`` as ``_``."""

    model_config = SettingsConfigDict(env_prefix="TMEM_", extra="forbid")

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8470
    data_dir: Path = Path("./var")
    capacity: Size = 1 << 30
    database_url: str | None = None
    durability: Literal["sync", "none"] = "sync"
    admin_token: SecretStr | None = None
    max_batch_ops: Annotated[int, Field(ge=1, le=65536)] = 1024
    max_pools_per_guest: Annotated[int, Field(ge=1, le=1024)] = 16
    max_json_bytes: Size = 64 << 10
    migrations_dir: Path | None = None
    # Per-guest limits (see docs/security.md). Rate limits are token buckets per guest; 0 turns
    # one off, and both are off by default (a host that wants them sets them for its guests).
    rate_limit_requests: Annotated[float, Field(ge=0)] = 0.0
    rate_limit_pages: Annotated[float, Field(ge=0)] = 0.0
    rate_limit_burst: Annotated[float, Field(gt=0, le=3600)] = 2.0
    max_waiters_per_guest: Annotated[int, Field(ge=1, le=10_000)] = 16
    max_notices_per_guest: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("capacity")
    @classmethod
    def _capacity_holds_a_page(cls, value: int) -> int:
        if value < PAGE_SIZE:
            raise ValueError(f"capacity must hold at least one page ({PAGE_SIZE} bytes)")
        return value

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL; the embedded default is SQLite in the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'broker.sqlite3').resolve()}"

    @property
    def max_batch_bytes(self) -> int:
        """The largest legal batch body: ``max_batch_ops`` puts."""
        return self.max_batch_ops * (HEADER.size + PAGE_SIZE)
