"""The broker's only SQL: a small repository over a synchronous engine.

Every method is a short transaction and returns plain records, never live ORM objects, so the
callers (async routes, through the thread pool) never touch a session. Errors SQLAlchemy raises
for a duplicate name come back as :class:`broker.core.errors.GuestExists`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from broker.core.errors import GuestExists, UnknownGuest
from broker.db.models import (
    DomainRow,
    GuestHomeRow,
    GuestMoveRow,
    GuestRow,
    NbdExportRow,
    NoticeRow,
    PoolRow,
    SettingRow,
    SharedAuthRow,
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    # SQLite returns naive datetimes even for timezone=True columns; everything stored is UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class GuestRecord:
    guest_id: int
    name: str
    token_hash: bytes
    weight: int
    cap_pages: int | None
    dedup_domain: str
    compress: bool | None
    frozen: bool
    notice_seq: int


@dataclass(frozen=True, slots=True)
class DomainRecord:
    name: str
    trusted: bool
    compress: str | None


@dataclass(frozen=True, slots=True)
class PoolRecord:
    guest_id: int
    pool_id: int
    kind: str
    shared: bool
    uuid: str | None
    exclusive_gets: bool


@dataclass(frozen=True, slots=True)
class NbdExportRecord:
    """An NBD export the broker serves itself: its guest, name, size and pool."""

    guest_id: int
    name: str
    size: int
    pool_id: int


@dataclass(frozen=True, slots=True)
class NoticeRecord:
    guest_id: int
    seq: int
    type: str
    issued_at: datetime
    cap_pages: int | None = None
    pages: int | None = None
    deadline: datetime | None = None
    pool_id: int | None = None
    acked_at: datetime | None = None
    pages_returned: int | None = None


def _guest(row: GuestRow) -> GuestRecord:
    return GuestRecord(
        guest_id=row.id,
        name=row.name,
        token_hash=bytes(row.token_hash),
        weight=row.weight,
        cap_pages=row.cap_pages,
        dedup_domain=row.dedup_domain,
        compress=row.compress,
        frozen=row.frozen,
        notice_seq=row.notice_seq,
    )


def _pool(row: PoolRow) -> PoolRecord:
    return PoolRecord(row.guest_id, row.pool_id, row.kind, row.shared, row.uuid, row.exclusive_gets)


def _notice(row: NoticeRow) -> NoticeRecord:
    return NoticeRecord(
        guest_id=row.guest_id,
        seq=row.seq,
        type=row.type,
        issued_at=_aware(row.issued_at),
        cap_pages=row.cap_pages,
        pages=row.pages,
        deadline=_aware(row.deadline) if row.deadline is not None else None,
        pool_id=row.pool_id,
        acked_at=_aware(row.acked_at) if row.acked_at is not None else None,
        pages_returned=row.pages_returned,
    )


class Repository:
    """Guests, pools, shared-pool authorisations, notices and settings in SQL."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._session = sessionmaker(engine, expire_on_commit=False)

    def close(self, timeout: float = 5.0) -> None:
        """Wait (up to ``timeout`` s) for connections still in use by worker threads, then
        close every connection. A connection returned after ``dispose()`` would otherwise
        linger, unclosed, in the discarded pool."""
        checkedout = getattr(self.engine.pool, "checkedout", None)
        deadline = time.monotonic() + timeout
        while checkedout is not None and checkedout() > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.engine.dispose()

    def _begin(self) -> Session:
        return self._session()

    # guests -------------------------------------------------------------------------------

    def create_guest(
        self,
        *,
        name: str,
        token_hash: bytes,
        weight: int,
        cap_pages: int | None,
        dedup_domain: str,
        compress: bool | None,
    ) -> GuestRecord:
        row = GuestRow(
            name=name,
            token_hash=token_hash,
            weight=weight,
            cap_pages=cap_pages,
            dedup_domain=dedup_domain,
            compress=compress,
            frozen=False,
            notice_seq=0,
            created_at=utcnow(),
        )
        try:
            with self._begin() as session, session.begin():
                session.add(row)
                session.flush()
                return _guest(row)
        except IntegrityError as exc:
            raise GuestExists(f"a guest named {name!r} exists already") from exc

    def guests(self) -> list[GuestRecord]:
        with self._begin() as session:
            return [_guest(r) for r in session.scalars(select(GuestRow).order_by(GuestRow.id))]

    def guest(self, guest_id: int) -> GuestRecord:
        with self._begin() as session:
            row = session.get(GuestRow, guest_id)
            if row is None:
                raise UnknownGuest(f"no guest {guest_id}")
            return _guest(row)

    def update_guest(self, guest_id: int, changes: dict[str, Any]) -> GuestRecord:
        """Set the given columns (weight, cap_pages, compress, dedup_domain, frozen)."""
        with self._begin() as session, session.begin():
            row = session.get(GuestRow, guest_id)
            if row is None:
                raise UnknownGuest(f"no guest {guest_id}")
            for key, value in changes.items():
                setattr(row, key, value)
            session.flush()
            return _guest(row)

    def delete_guest(self, guest_id: int) -> None:
        with self._begin() as session, session.begin():
            # Explicit deletes rather than relying on ON DELETE CASCADE, which SQLite only
            # honours with the foreign_keys pragma on.
            for table in (NoticeRow, NbdExportRow, PoolRow, SharedAuthRow, GuestHomeRow):
                session.execute(delete(table).where(table.guest_id == guest_id))
            result = session.execute(delete(GuestRow).where(GuestRow.id == guest_id))
            if result.rowcount == 0:  # type: ignore[attr-defined]
                raise UnknownGuest(f"no guest {guest_id}")

    # pools --------------------------------------------------------------------------------

    def add_pool(self, record: PoolRecord) -> None:
        with self._begin() as session, session.begin():
            session.add(
                PoolRow(
                    guest_id=record.guest_id,
                    pool_id=record.pool_id,
                    kind=record.kind,
                    shared=record.shared,
                    uuid=record.uuid,
                    exclusive_gets=record.exclusive_gets,
                    created_at=utcnow(),
                )
            )

    def delete_pool(self, guest_id: int, pool_id: int) -> None:
        with self._begin() as session, session.begin():
            session.execute(
                delete(PoolRow).where(PoolRow.guest_id == guest_id, PoolRow.pool_id == pool_id)
            )

    # NBD exports served by the broker ----------------------------------------------------

    def add_nbd_export(self, record: NbdExportRecord) -> None:
        with self._begin() as session, session.begin():
            session.add(
                NbdExportRow(
                    guest_id=record.guest_id,
                    name=record.name,
                    size=record.size,
                    pool_id=record.pool_id,
                    created_at=utcnow(),
                )
            )

    def delete_nbd_export(self, guest_id: int, name: str) -> None:
        with self._begin() as session, session.begin():
            session.execute(
                delete(NbdExportRow).where(
                    NbdExportRow.guest_id == guest_id, NbdExportRow.name == name
                )
            )

    def nbd_exports(self) -> list[NbdExportRecord]:
        with self._begin() as session:
            rows = session.scalars(
                select(NbdExportRow).order_by(NbdExportRow.guest_id, NbdExportRow.name)
            )
            return [NbdExportRecord(r.guest_id, r.name, r.size, r.pool_id) for r in rows]

    def pools(self) -> list[PoolRecord]:
        with self._begin() as session:
            stmt = select(PoolRow).order_by(PoolRow.guest_id, PoolRow.pool_id)
            return [_pool(r) for r in session.scalars(stmt)]

    def pools_of(self, guest_id: int) -> list[PoolRecord]:
        with self._begin() as session:
            stmt = select(PoolRow).where(PoolRow.guest_id == guest_id).order_by(PoolRow.pool_id)
            return [_pool(r) for r in session.scalars(stmt)]

    def guest_by_token_hash(self, token_hash: bytes) -> GuestRecord | None:
        with self._begin() as session:
            row = session.scalars(select(GuestRow).where(GuestRow.token_hash == token_hash)).first()
            return None if row is None else _guest(row)

    # guests moved away (tmem-broker migrate) -----------------------------------------------

    def add_move(self, token_hash: bytes, name: str, url: str) -> None:
        """Remember that the guest with this token now lives at ``url`` (replacing any older
        move of the same token)."""
        with self._begin() as session, session.begin():
            row = session.get(GuestMoveRow, token_hash)
            if row is None:
                session.add(
                    GuestMoveRow(token_hash=token_hash, name=name, url=url, moved_at=utcnow())
                )
            else:
                row.name, row.url, row.moved_at = name, url, utcnow()

    def moves(self) -> dict[bytes, str]:
        """Token hash -> the URL of the broker its guest moved to."""
        with self._begin() as session:
            return {bytes(r.token_hash): r.url for r in session.scalars(select(GuestMoveRow))}

    def forget_move(self, token_hash: bytes) -> None:
        with self._begin() as session, session.begin():
            session.execute(delete(GuestMoveRow).where(GuestMoveRow.token_hash == token_hash))

    # shared-pool authorisations -----------------------------------------------------------

    def set_shared_auth(self, uuid: str, guest_id: int, allow: bool) -> None:
        with self._begin() as session, session.begin():
            if session.get(GuestRow, guest_id) is None:
                raise UnknownGuest(f"no guest {guest_id}")
            existing = session.get(SharedAuthRow, (uuid, guest_id))
            if allow and existing is None:
                session.add(SharedAuthRow(uuid=uuid, guest_id=guest_id))
            elif not allow and existing is not None:
                session.delete(existing)

    def shared_auths(self) -> list[tuple[str, int]]:
        with self._begin() as session:
            rows = session.scalars(select(SharedAuthRow))
            return [(r.uuid, r.guest_id) for r in rows]

    # notices ------------------------------------------------------------------------------

    def add_notice(
        self,
        guest_id: int,
        type_: str,
        *,
        cap_pages: int | None = None,
        pages: int | None = None,
        deadline: datetime | None = None,
        pool_id: int | None = None,
    ) -> NoticeRecord:
        """Store a notice under the guest's next sequence number (one transaction)."""
        with self._begin() as session, session.begin():
            # An atomic increment of the per-guest counter: no two notices share a number, and
            # the counter outlives deleted notices and restarts.
            seq = session.execute(
                update(GuestRow)
                .where(GuestRow.id == guest_id)
                .values(notice_seq=GuestRow.notice_seq + 1)
                .returning(GuestRow.notice_seq)
            ).scalar_one_or_none()
            if seq is None:
                raise UnknownGuest(f"no guest {guest_id}")
            row = NoticeRow(
                guest_id=guest_id,
                seq=seq,
                type=type_,
                issued_at=utcnow(),
                cap_pages=cap_pages,
                pages=pages,
                deadline=deadline,
                pool_id=pool_id,
            )
            session.add(row)
            session.flush()
            return _notice(row)

    def notices_after(self, guest_id: int, after: int, limit: int = 1000) -> list[NoticeRecord]:
        with self._begin() as session:
            stmt = (
                select(NoticeRow)
                .where(NoticeRow.guest_id == guest_id, NoticeRow.seq > after)
                .order_by(NoticeRow.seq)
                .limit(limit)
            )
            return [_notice(r) for r in session.scalars(stmt)]

    def prune_notices(self, guest_id: int, keep: int) -> int:
        """Delete the guest's oldest notices beyond its newest ``keep`` that no longer ask
        anything of it: acked ones, ones whose deadline passed, and informational ones (every
        type but an unacked ``shed``). Returns how many were deleted. The sequence counter is
        on the guest row, so numbers are never reused."""
        with self._begin() as session, session.begin():
            total = session.scalar(
                select(func.count()).select_from(NoticeRow).where(NoticeRow.guest_id == guest_id)
            )
            excess = (total or 0) - keep
            if excess <= 0:
                return 0
            done = or_(
                NoticeRow.acked_at.is_not(None),
                NoticeRow.type != "shed",
                NoticeRow.deadline < utcnow(),
            )
            seqs = list(
                session.scalars(
                    select(NoticeRow.seq)
                    .where(NoticeRow.guest_id == guest_id, done)
                    .order_by(NoticeRow.seq)
                    .limit(excess)
                )
            )
            if seqs:
                session.execute(
                    delete(NoticeRow).where(NoticeRow.guest_id == guest_id, NoticeRow.seq.in_(seqs))
                )
            return len(seqs)

    def ack_notice(self, guest_id: int, seq: int, pages_returned: int) -> NoticeRecord | None:
        """Record an ack; ``None`` when the guest has no notice ``seq``."""
        with self._begin() as session, session.begin():
            row = session.get(NoticeRow, (guest_id, seq))
            if row is None:
                return None
            row.acked_at = utcnow()
            row.pages_returned = pages_returned
            session.flush()
            return _notice(row)

    # settings -----------------------------------------------------------------------------

    # dedup domains --------------------------------------------------------------------------

    def domains(self) -> list[DomainRecord]:
        with self._begin() as session:
            rows = session.scalars(select(DomainRow).order_by(DomainRow.name))
            return [DomainRecord(r.name, r.trusted, r.compress) for r in rows]

    def put_domain(self, record: DomainRecord) -> None:
        """Insert or replace a domain's settings."""
        with self._begin() as session, session.begin():
            row = session.get(DomainRow, record.name)
            if row is None:
                session.add(
                    DomainRow(name=record.name, trusted=record.trusted, compress=record.compress)
                )
            else:
                row.trusted = record.trusted
                row.compress = record.compress

    def settings(self) -> dict[str, Any]:
        with self._begin() as session:
            return {r.key: json.loads(r.value) for r in session.scalars(select(SettingRow))}

    def set_setting(self, key: str, value: Any) -> None:
        with self._begin() as session, session.begin():
            row = session.get(SettingRow, key)
            if row is None:
                session.add(SettingRow(key=key, value=json.dumps(value)))
            else:
                row.value = json.dumps(value)
