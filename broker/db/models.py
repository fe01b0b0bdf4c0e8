"""SQLAlchemy 2 tables of the broker's metadata (typed ``Mapped[]`` models).

The naming convention gives every constraint a stable name, so Alembic migrations (including
SQLite batch rebuilds) can refer to them. Wire schemas live in ``schemas.wire``; these are the
tables only.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class GuestRow(Base):
    """A guest (Xen: client). ``id`` is the guest id of the wire contract."""

    __tablename__ = "guests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    # sha256 of the guest token; the token itself is never stored.
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    weight: Mapped[int] = mapped_column(Integer, default=100)
    cap_pages: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    dedup_domain: Mapped[str] = mapped_column(String(64), default="default")
    # null: the guest takes its dedup domain's compression mode, else the broker's
    compress: Mapped[bool | None] = mapped_column(Boolean, nullable=True, default=None)
    frozen: Mapped[bool] = mapped_column(Boolean, default=False)
    # The last notice sequence number issued to this guest; bumped atomically per notice so
    # sequence numbers stay strictly increasing across restarts.
    notice_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DomainRow(Base):
    """A dedup domain's settings; domains named only by guests have no row (defaults)."""

    __tablename__ = "domains"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    trusted: Mapped[bool] = mapped_column(Boolean, default=False)
    # never / always / pressure; null: the broker's default
    compress: Mapped[str | None] = mapped_column(String(16), nullable=True, default=None)


class PoolRow(Base):
    """A guest's pool; ``pool_id`` is per guest (0..max_pools_per_guest-1)."""

    __tablename__ = "pools"

    guest_id: Mapped[int] = mapped_column(
        ForeignKey("guests.id", ondelete="CASCADE"), primary_key=True
    )
    pool_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    shared: Mapped[bool] = mapped_column(Boolean, default=False)
    uuid: Mapped[str | None] = mapped_column(String(36), nullable=True)
    exclusive_gets: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class SharedAuthRow(Base):
    """An admin's permission for a guest to create or join the shared pool ``uuid``."""

    __tablename__ = "shared_auth"

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    guest_id: Mapped[int] = mapped_column(
        ForeignKey("guests.id", ondelete="CASCADE"), primary_key=True
    )


class NoticeRow(Base):
    """A notice sent to a guest, with its ack once the guest sends one."""

    __tablename__ = "notices"

    guest_id: Mapped[int] = mapped_column(
        ForeignKey("guests.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    type: Mapped[str] = mapped_column(String(16))
    issued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    cap_pages: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    pages: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    pool_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    acked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    pages_returned: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class SettingRow(Base):
    """A broker setting an admin changed at run time (JSON text value); it wins over the
    flag it overrides after a restart."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class BrokerRow(Base):
    """A broker of a cluster (``serve --cluster``): its advertised URL, its heartbeat and the
    figures it last published (the JSON of its ``/v1/stats``), which any broker sums for the
    pool's stats. A broker whose heartbeat is older than the lease time is dead."""

    __tablename__ = "brokers"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    url: Mapped[str] = mapped_column(String(512))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    figures: Mapped[str | None] = mapped_column(Text, nullable=True)


class GuestHomeRow(Base):
    """A guest's home broker: the only writer of its handles, held as a lease.

    ``epoch`` is the fencing number: it grows by one every time the holder changes, and the
    page store refuses writes made under an older one. ``broker_id`` null: released, nobody
    holds it (the next holder bumps the epoch)."""

    __tablename__ = "guest_homes"

    guest_id: Mapped[int] = mapped_column(
        ForeignKey("guests.id", ondelete="CASCADE"), primary_key=True
    )
    broker_id: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class GuestMoveRow(Base):
    """A guest moved to another broker by ``tmem-broker migrate``: its token (hash) now
    belongs there, and this broker answers that token's calls with a redirect to ``url``."""

    __tablename__ = "guest_moves"

    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    url: Mapped[str] = mapped_column(String(512))
    moved_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class NbdExportRow(Base):
    """An NBD export the broker serves itself (``--nbd-dir``): re-created at start over the
    same persistent pool, so it outlives a broker restart; gone with ``DELETE`` or its guest."""

    __tablename__ = "nbd_exports"

    guest_id: Mapped[int] = mapped_column(
        ForeignKey("guests.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    pool_id: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
