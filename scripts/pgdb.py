"""A throw-away PostgreSQL database (tests, the cluster demo, the scale benchmark), by default
on the server at 127.0.0.1:5432 (``TMEM_TEST_PG``)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text

SERVER = os.environ.get("TMEM_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")


@contextmanager
def temp_database(server: str = SERVER, prefix: str = "tmem_test") -> Iterator[str]:
    """Create a uniquely named database on ``server``, yield its URL, drop it (even if the
    test failed)."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield f"{server}/{name}"
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
