"""Migrations: upgrade from empty, downgrade to base, upgrade again, and no drift between the
models and the migrated schema (what ``alembic check`` checks), on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from broker.db.engine import downgrade, make_engine, upgrade
from broker.db.models import Base

TABLES = {
    "guests",
    "pools",
    "shared_auth",
    "notices",
    "settings",
    "domains",
    "nbd_exports",
    "brokers",
    "guest_homes",
    "guest_moves",
}


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _drift(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


@pytest.mark.timeout(60)
def test_upgrade_downgrade_upgrade_without_drift(db_url: str) -> None:
    assert _tables(db_url) == set()
    upgrade(db_url)
    assert _tables(db_url) == TABLES
    assert _drift(db_url) == []
    downgrade(db_url, "base")
    assert _tables(db_url) == set()
    upgrade(db_url)
    assert _tables(db_url) == TABLES
    assert _drift(db_url) == []


@pytest.mark.timeout(60)
def test_upgrade_is_idempotent(db_url: str) -> None:
    upgrade(db_url)
    upgrade(db_url)
    assert _tables(db_url) == TABLES


def test_sqlite_uses_wal(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/wal.sqlite3"
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
            fk = conn.exec_driver_sql("PRAGMA foreign_keys").scalar()
    finally:
        engine.dispose()
    assert mode == "wal"
    assert fk == 1
