"""Who serves whom: brokers, their heartbeats and the guests' home leases, in PostgreSQL.

Each guest has one **home** broker at a time, the only writer of its handles. The home holds a
lease (``guest_homes.lease_until``) renewed by its heartbeat, and an **epoch**: a fencing
number that grows by one every time the holder changes. The page store refuses writes made
under an older epoch (``engine.adopt(guest, epoch)`` writes the fence), so a broker that lost
its lease while paused cannot overwrite the new home's pages when it wakes up.

Every change is one atomic statement evaluated against the database's clock (``now()``), never
a broker's: two brokers racing for the same guest cannot both win, and clock skew between
hosts does not matter. Use::

    leases = LeaseManager(engine, "b1", "http://10.0.0.1:8470", lease_s=10.0)
    leases.register()
    mine = leases.heartbeat({"pages": 12})     # renews my leases; the ones I still hold
    lease = leases.acquire(guest_id)           # None: another broker holds a live lease
    leases.take_over()                         # orphans (dead holder, released, new guests)
    leases.move(guest_id, "b2")                # an admin's move: the epoch grows
    leases.release(guest_id)

A broker is **alive** while its heartbeat is younger than the lease time. Orphaned guests (no
home row, released, or a lease that ran out more than the grace time ago: a late heartbeat is
not a dead broker) are spread over the live brokers by rendezvous hashing: each live broker
claims the ones whose highest score is its own, so after a broker dies its guests go to the
survivors in even shares, without any broker coordinating.

Cluster mode requires PostgreSQL (``INSERT ... ON CONFLICT ... WHERE``, ``RETURNING``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import xxhash
from sqlalchemy import Engine, text

from broker.core.errors import UnknownGuest


class UnknownBroker(LookupError):
    """No live broker has that id."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A guest's home: ``broker_id`` (None: nobody), the epoch and when the lease runs out."""

    guest_id: int
    broker_id: str | None
    epoch: int
    lease_until: datetime | None


@dataclass(frozen=True, slots=True)
class Home:
    """A guest's home as a router needs it: who, where, under which epoch, and whether the
    lease is still running (a dead home's guests are about to be taken over)."""

    guest_id: int
    broker_id: str | None
    url: str | None
    epoch: int
    live: bool


@dataclass(frozen=True, slots=True)
class BrokerInfo:
    """A broker of the cluster as the ``brokers`` table has it."""

    broker_id: str
    url: str
    started_at: datetime
    heartbeat_at: datetime
    alive: bool
    figures: dict[str, Any] | None


def rendezvous(guest_id: int, brokers: list[str]) -> str | None:
    """The broker of ``brokers`` that should take ``guest_id`` (highest random weight)."""
    best: tuple[int, str] | None = None
    for b in brokers:
        score = xxhash.xxh3_64_intdigest(f"{b}\0{guest_id}".encode())
        if best is None or (score, b) > best:
            best = (score, b)
    return None if best is None else best[1]


_ACQUIRE = text(
    """
    INSERT INTO guest_homes (guest_id, broker_id, epoch, lease_until)
    VALUES (:g, :me, 1, now() + :lease)
    ON CONFLICT (guest_id) DO UPDATE SET
        broker_id = :me,
        epoch = CASE WHEN guest_homes.broker_id = :me THEN guest_homes.epoch
                     ELSE guest_homes.epoch + 1 END,
        lease_until = now() + :lease
    WHERE guest_homes.broker_id IS NULL
       OR guest_homes.broker_id = :me
       OR guest_homes.lease_until IS NULL
       OR guest_homes.lease_until < now() - :grace
    RETURNING broker_id, epoch, lease_until
    """
)

_MOVE = text(
    """
    INSERT INTO guest_homes (guest_id, broker_id, epoch, lease_until)
    VALUES (:g, :to, 1, now() + :lease)
    ON CONFLICT (guest_id) DO UPDATE SET
        broker_id = :to,
        epoch = guest_homes.epoch + 1,
        lease_until = now() + :lease
    RETURNING broker_id, epoch, lease_until
    """
)

_RENEW = text(
    """
    UPDATE guest_homes SET lease_until = now() + :lease
    WHERE broker_id = :me
    RETURNING guest_id, broker_id, epoch, lease_until
    """
)

_HEARTBEAT = text(
    """
    INSERT INTO brokers (id, url, started_at, heartbeat_at, figures)
    VALUES (:me, :url, now(), now(), :figures)
    ON CONFLICT (id) DO UPDATE SET
        url = :url, heartbeat_at = now(),
        figures = COALESCE(:figures, brokers.figures)
    """
)

_ORPHANS = text(
    """
    SELECT g.id FROM guests g LEFT JOIN guest_homes h ON h.guest_id = g.id
    WHERE h.guest_id IS NULL OR h.broker_id IS NULL
       OR h.lease_until IS NULL OR h.lease_until < now() - :grace
    ORDER BY g.id
    """
)

_LEFT = timedelta(days=1)  # how far back a clean stop sets the heartbeat
_LIVE = text("SELECT id FROM brokers WHERE heartbeat_at > now() - :lease ORDER BY id")


class LeaseManager:
    """Brokers and guest homes for broker ``broker_id`` (advertised at ``url``).

    Every method is one short transaction on ``engine`` (synchronous: call it from a thread
    when on an event loop). ``lease_s`` is the lease time: how long a broker may go without a
    heartbeat before it counts as dead. ``grace_s`` (default ``lease_s / 2``): how long past
    its end another broker still leaves a lease alone, so a holder whose heartbeat is merely
    late (a loaded host, a slow step) renews it instead of losing its guests; a lease that
    was released (clean stop) or never held is taken at once.
    """

    def __init__(
        self,
        engine: Engine,
        broker_id: str,
        url: str,
        *,
        lease_s: float = 10.0,
        grace_s: float | None = None,
    ) -> None:
        if engine.dialect.name != "postgresql":
            raise ValueError("cluster mode needs PostgreSQL (--database-url postgresql+psycopg://)")
        if lease_s <= 0:
            raise ValueError("the lease time must be positive")
        grace_s = lease_s / 2 if grace_s is None else grace_s
        if grace_s < 0:
            raise ValueError("the grace time cannot be negative")
        self.engine = engine
        self.broker_id = broker_id
        self.url = url
        self.lease = timedelta(seconds=lease_s)
        self.grace = timedelta(seconds=grace_s)

    # brokers ------------------------------------------------------------------------------

    def register(self) -> None:
        """Insert or refresh this broker's row (its URL and a first heartbeat)."""
        with self.engine.begin() as conn:
            conn.execute(_HEARTBEAT, {"me": self.broker_id, "url": self.url, "figures": None})

    def heartbeat(self, figures: dict[str, Any] | None = None) -> list[Lease]:
        """Beat, publish ``figures`` and renew every lease this broker holds; returns them.

        A guest missing from the answer is no longer this broker's (moved by an admin, or
        taken over while this broker was paused): the caller stops serving it.
        """
        blob = None if figures is None else json.dumps(figures, separators=(",", ":"))
        with self.engine.begin() as conn:
            conn.execute(_HEARTBEAT, {"me": self.broker_id, "url": self.url, "figures": blob})
            rows = conn.execute(_RENEW, {"me": self.broker_id, "lease": self.lease}).all()
        return sorted((Lease(r[0], r[1], r[2], r[3]) for r in rows), key=lambda x: x.guest_id)

    def leave(self) -> None:
        """A clean stop: release every lease (survivors take them at once) and stop beating."""
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE guest_homes SET broker_id = NULL, lease_until = NULL "
                    "WHERE broker_id = :me"
                ),
                {"me": self.broker_id},
            )
            # dead to every broker, whatever its lease: each judges liveness with its own
            # (``_LIVE``), and a heartbeat set 2 x OUR lease back still looked live to a
            # broker with a longer one (a stopped 1.5 s-lease broker stayed "live" for 27 s to
            # the 30 s-lease brokers of the next test on the same database, which spread
            # orphans to it)
            conn.execute(
                text("UPDATE brokers SET heartbeat_at = now() - :old WHERE id = :me"),
                {"me": self.broker_id, "old": max(self.lease * 2, _LEFT)},
            )

    def brokers(self) -> list[BrokerInfo]:
        """Every broker that ever joined, with whether it is alive and its last figures."""
        with self.engine.begin() as conn:
            rows = conn.execute(
                text(
                    "SELECT id, url, started_at, heartbeat_at, figures, "
                    "heartbeat_at > now() - :lease FROM brokers ORDER BY id"
                ),
                {"lease": self.lease},
            ).all()
        return [
            BrokerInfo(r[0], r[1], r[2], r[3], bool(r[5]), json.loads(r[4]) if r[4] else None)
            for r in rows
        ]

    def live_brokers(self) -> list[str]:
        with self.engine.begin() as conn:
            return [r[0] for r in conn.execute(_LIVE, {"lease": self.lease})]

    # leases -------------------------------------------------------------------------------

    def acquire(self, guest_id: int) -> Lease | None:
        """Become ``guest_id``'s home if nobody holds a lease (or renew it if this broker
        does): free, released, or another broker's that ran out more than the grace time ago.
        The epoch grows when the holder changes. ``None``: another broker holds it."""
        try:
            with self.engine.begin() as conn:
                row = conn.execute(
                    _ACQUIRE,
                    {"g": guest_id, "me": self.broker_id, "lease": self.lease, "grace": self.grace},
                ).first()
        except Exception as exc:  # the foreign key: no such guest
            if _is_fk_violation(exc):
                raise UnknownGuest(f"no guest {guest_id}") from exc
            raise
        return None if row is None else Lease(guest_id, row[0], row[1], row[2])

    def release(self, guest_id: int) -> bool:
        """Give ``guest_id`` up (if this broker holds it); the next holder bumps the epoch."""
        with self.engine.begin() as conn:
            result = conn.execute(
                text(
                    "UPDATE guest_homes SET broker_id = NULL, lease_until = NULL "
                    "WHERE guest_id = :g AND broker_id = :me"
                ),
                {"g": guest_id, "me": self.broker_id},
            )
            return bool(result.rowcount)

    def move(self, guest_id: int, to_broker: str) -> Lease:
        """Make ``to_broker`` (a live broker) the home of ``guest_id``, whoever held it: an
        admin's move. The epoch grows, so the old home's late writes are refused."""
        try:
            with self.engine.begin() as conn:
                live = conn.execute(
                    text("SELECT 1 FROM brokers WHERE id = :b AND heartbeat_at > now() - :lease"),
                    {"b": to_broker, "lease": self.lease},
                ).first()
                if live is None:
                    raise UnknownBroker(f"no live broker {to_broker!r}")
                row = conn.execute(
                    _MOVE, {"g": guest_id, "to": to_broker, "lease": self.lease}
                ).one()
        except UnknownBroker:
            raise
        except Exception as exc:
            if _is_fk_violation(exc):
                raise UnknownGuest(f"no guest {guest_id}") from exc
            raise
        return Lease(guest_id, row[0], row[1], row[2])

    def take_over(self) -> list[Lease]:
        """Claim the orphaned guests that rendezvous hashing gives this broker among the live
        ones (a dead broker's, released ones, new guests). Returns the leases it won."""
        with self.engine.begin() as conn:
            live = [r[0] for r in conn.execute(_LIVE, {"lease": self.lease})]
            orphans = [r[0] for r in conn.execute(_ORPHANS, {"grace": self.grace})]
        if self.broker_id not in live:
            live.append(self.broker_id)  # beating right now, even if the row lags
        won: list[Lease] = []
        for guest_id in orphans:
            if rendezvous(guest_id, live) != self.broker_id:
                continue
            try:
                lease = self.acquire(guest_id)
            except UnknownGuest:
                continue  # deleted meanwhile
            if lease is not None:
                won.append(lease)
        return won

    def home(self, guest_id: int) -> Home:
        """Where ``guest_id`` lives now (``broker_id`` None: nobody holds it)."""
        with self.engine.begin() as conn:
            row = conn.execute(
                text(
                    "SELECT h.broker_id, b.url, h.epoch, "
                    "h.lease_until IS NOT NULL AND h.lease_until > now() "
                    "FROM guest_homes h LEFT JOIN brokers b ON b.id = h.broker_id "
                    "WHERE h.guest_id = :g"
                ),
                {"g": guest_id},
            ).first()
        if row is None:
            return Home(guest_id, None, None, 0, False)
        return Home(guest_id, row[0], row[1], row[2], bool(row[3]))

    def homes(self) -> dict[int, Home]:
        """Every guest's home (guests without a row are absent)."""
        with self.engine.begin() as conn:
            rows = conn.execute(
                text(
                    "SELECT h.guest_id, h.broker_id, b.url, h.epoch, "
                    "h.lease_until IS NOT NULL AND h.lease_until > now() "
                    "FROM guest_homes h LEFT JOIN brokers b ON b.id = h.broker_id"
                )
            ).all()
        return {r[0]: Home(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows}


def _is_fk_violation(exc: Exception) -> bool:
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) == "23503"
