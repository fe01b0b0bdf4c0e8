"""Service settings: every ``tmem-broker serve`` flag, also read as ``TMEM_<FLAG>``.

Build one with ``Settings()`` (environment only) or ``Settings(port=0, data_dir=...)``; pass it
explicitly to :func:`broker.app.create_app`. Sizes take ``B``, ``KiB``, ``MiB``, ``GiB`` (and
``TiB``) suffixes, or a plain number of bytes.
"""

from __future__ import annotations

import re
import socket
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from broker.core.host import auto_capacity
from broker.core.pressure import PressureSettings
from broker.hostmem import read_host_memory
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


def _seeds(value: object) -> object:
    """``redis://h:p,h:p`` (or ``h:p,h:p``, or a list of either) as a list of ``host:port``."""
    if value is None or value == "":
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        return value
    seeds = []
    for item in items:
        text = str(item).strip()
        text = text.removeprefix("redis://").strip("/")
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"not a Redis node: {item!r} (use redis://HOST:PORT[,HOST:PORT...])")
        seeds.append(f"{host}:{int(port)}")
    return seeds


def _size_or_auto(value: object) -> object:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return _size(value)


class Settings(BaseSettings):
    """The broker's configuration; field names are the CLI flags with ``-`` as ``_``."""

    model_config = SettingsConfigDict(env_prefix="TMEM_", extra="forbid")

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8470
    # also listen on this Unix domain socket (agents on the same host: ``unix:PATH``)
    uds: Path | None = None
    # serve NBD exports from the broker on Unix sockets in this directory (mode 0700; guests
    # create them with PUT /v1/self/nbd/{name}: docs/nbd.md, "Exports served by the broker")
    nbd_dir: Path | None = None
    data_dir: Path = Path("./var")
    # page storage: a size, or "auto" (sized from the host: docs/pressure.md, "Host-aware
    # capacity"; resolved when the settings are made, an unreadable host is an error then)
    capacity: Annotated[int | Literal["auto"], BeforeValidator(_size_or_auto)] = 1 << 30
    # what "auto" leaves to the rest of the host (none: max(15 %, 512 MiB))
    capacity_reserve: Size | None = None
    # watch the host's MemAvailable and PSI and shrink the capacity while it runs short
    # (none: watch when capacity is auto)
    host_watch: bool | None = None
    # where the host's /proc and /sys are (tests point it at recorded files)
    host_root: Path = Path("/")
    # the compression mode of guests and domains that set none (docs/pressure.md)
    compress: Literal["never", "always", "pressure"] = "never"
    database_url: str | None = None
    durability: Literal["sync", "none"] = "sync"
    # the durable journal's write-ahead log (docs/durability.md); 0: every round commits to
    # LMDB before it is answered
    journal_log: Size = 64 << 20
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
    # Memory-pressure policy (docs/pressure.md; the defaults are PressureSettings'). An admin
    # changes them at run time with PATCH /v1/settings (kept in SQL, winning over these).
    high_watermark: Annotated[float, Field(gt=0, le=1)] = 0.95
    low_watermark: Annotated[float, Field(gt=0, le=1)] = 0.85
    persistent_share: Annotated[float, Field(gt=0, le=1)] = 0.75
    release_share: Annotated[float, Field(gt=0, le=1)] = 0.60
    shed_deadline_s: Annotated[float, Field(gt=0)] = 30.0
    pressure_boost: Annotated[float, Field(ge=0)] = 1.0
    pressure_ttl_s: Annotated[float, Field(gt=0)] = 30.0
    admission_min_hit_rate: Annotated[float, Field(ge=0, le=1)] = 0.05
    admission_min_samples: Annotated[int, Field(ge=0)] = 512
    admission_floor: Annotated[float, Field(gt=0, le=1)] = 0.10
    admission_window: Annotated[int, Field(ge=1)] = 8192
    evicted_notice_interval_s: Annotated[float, Field(gt=0)] = 5.0
    # what a guest's MemAvailable means (docs/pressure.md, "Feedback from the guest")
    pressure_low_available_bytes: Size = 256 << 20
    pressure_free_available_bytes: Size = 1 << 30
    pressure_free_discount: Annotated[float, Field(ge=0, lt=1)] = 0.5
    # which page of an eviction account goes (docs/pressure.md, "Ephemeral policy")
    ephemeral_policy: Literal["lru", "tinylfu"] = "lru"
    # keep idle lz4 pages as zstd (docs/pressure.md, "Recompressing idle pages")
    recompress: bool = False
    pressure_interval_s: Annotated[float, Field(gt=0, le=3600)] = 1.0
    # Several brokers as one pool (docs/scale.md): the Redis Cluster's seed nodes (given as
    # redis://H:P[,H:P...] or a list of "host:port"); empty: single-host mode (the default)
    cluster: Annotated[list[str], NoDecode, BeforeValidator(_seeds)] = Field(default_factory=list)
    # this broker's id among the brokers (none: hostname:port) and the URL guests are sent to
    broker_id: str | None = None
    advertise_url: str | None = None
    # how long a broker may go without a heartbeat before its guests are taken over
    lease_s: Annotated[float, Field(ge=0.2, le=600)] = 10.0
    # the Redis keys' prefix (brokers of one pool share it; tests keep apart by it) and how
    # long a durable write waits for a replica's acknowledgement (WAIT 1 <ms>)
    cluster_namespace: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")] = "tmem"
    cluster_wait_ms: Annotated[int, Field(ge=1, le=60_000)] = 500
    # how long a Redis node may send nothing before it counts as hung and is marked down for
    # 0.5 s (its writes declined 503, its reads sent to its replica); none: cluster_wait_ms +
    # 500 (raise it where fsyncs stall longer: docs/scale-data.md, "A master that dies")
    cluster_timeout_ms: Annotated[int | None, Field(ge=10, le=600_000)] = None

    @field_validator("capacity")
    @classmethod
    def _capacity_holds_a_page(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < PAGE_SIZE:
            raise ValueError(f"capacity must hold at least one page ({PAGE_SIZE} bytes)")
        return value

    @model_validator(mode="after")
    def _auto_capacity(self) -> Settings:
        if self.capacity == "auto":
            # HostMemoryError is a ValueError naming the file that could not be read
            host = read_host_memory(self.host_root)
            self.capacity = auto_capacity(host, self.capacity_reserve)
            if self.host_watch is None:
                self.host_watch = True
        return self

    @property
    def capacity_bytes(self) -> int:
        """The capacity in bytes ("auto" is resolved when the settings are made)."""
        assert isinstance(self.capacity, int)
        return self.capacity

    @field_validator("journal_log")
    @classmethod
    def _journal_log_size(cls, value: int) -> int:
        if value and not (4 << 20) <= value <= (64 << 30):
            raise ValueError("journal_log must be 0 (off) or between 4MiB and 64GiB")
        return value

    @model_validator(mode="after")
    def _cluster_needs_postgresql(self) -> Settings:
        if self.cluster and not (self.database_url or "").startswith("postgresql"):
            raise ValueError(
                "cluster mode (--cluster) needs PostgreSQL, shared by the brokers: "
                "--database-url postgresql+psycopg://USER@HOST/DB"
            )
        if self.advertise_url is not None and not re.match(r"^https?://[^/]+", self.advertise_url):
            raise ValueError(f"advertise_url must be an http(s) URL, not {self.advertise_url!r}")
        return self

    @property
    def cluster_broker_id(self) -> str:
        """This broker's id in a cluster: ``broker_id``, or ``hostname:port``."""
        return self.broker_id or f"{socket.gethostname()}:{self.port}"

    @property
    def cluster_url(self) -> str:
        """The URL other brokers send this broker's guests to."""
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @model_validator(mode="after")
    def _pressure_is_consistent(self) -> Settings:
        self.pressure_settings()  # raises ValueError on contradictions (low above high, ...)
        return self

    def pressure_settings(self) -> PressureSettings:
        """The memory-pressure tunables as the policy takes them."""
        names = {f.name for f in fields(PressureSettings)}
        return PressureSettings(**{n: getattr(self, n) for n in names})

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
