"""Alembic environment: the broker's models, SQLite through batch mode (render_as_batch)."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection

from broker.db.engine import make_engine
from broker.db.models import Base
from broker.settings import Settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if url:
        return url
    configured = config.get_main_option("sqlalchemy.url")
    if configured:
        return configured
    if os.environ.get("TMEM_DATABASE_URL"):
        return os.environ["TMEM_DATABASE_URL"]
    return Settings().sqlalchemy_url


def _configure(connection: Connection | None, url: str | None) -> None:
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=True,
        compare_type=True,
        literal_binds=connection is None,
    )


def run_offline() -> None:
    _configure(None, _url())
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection, None)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            _configure(conn, None)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
