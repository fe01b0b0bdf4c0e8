"""Engines and schema migrations.

``make_engine(url)`` builds a synchronous engine (SQLite gets WAL, a busy timeout and foreign
keys); ``upgrade(url)`` brings the schema to the newest Alembic revision, which ``serve`` does
at start and ``tmem-broker db upgrade`` does on its own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event

_REPO_MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


def migrations_dir(override: Path | None = None) -> Path:
    """Where the Alembic scripts are: ``override``, ``$TMEM_MIGRATIONS_DIR`` or the source tree."""
    if override is not None:
        return override
    env = os.environ.get("TMEM_MIGRATIONS_DIR")
    return Path(env) if env else _REPO_MIGRATIONS


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # WAL lets the readers (notice polls, admin lists) run beside a writer; busy_timeout
    # makes a second writer wait instead of failing at once.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    """A synchronous engine for ``url`` (``sqlite:///...`` or ``postgresql+psycopg://...``)."""
    if url.startswith("sqlite"):
        # Routes run SQL in the thread pool, so a connection may be used by another thread
        # than the one that opened it; the pool hands it to one thread at a time.
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def alembic_config(url: str, migrations: Path | None = None) -> Config:
    """An Alembic config for ``url`` that does not depend on the working directory."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir(migrations)))
    # '%' would be read as interpolation by configparser.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, migrations: Path | None = None, revision: str = "head") -> None:
    """Bring the schema at ``url`` to ``revision`` (the newest by default)."""
    command.upgrade(alembic_config(url, migrations), revision)


def downgrade(url: str, revision: str, migrations: Path | None = None) -> None:
    """Take the schema at ``url`` back to ``revision`` (``"base"``: no tables)."""
    command.downgrade(alembic_config(url, migrations), revision)
