"""A throw-away PostgreSQL database per test run, on the server at 127.0.0.1:5432."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text

SERVER = os.environ.get("TMEM_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")


@contextmanager
def temp_database() -> Iterator[str]:
    """Create a uniquely named database, yield its URL, drop it (even if the test failed)."""
    name = f"tmem_test_{secrets.token_hex(6)}"
    admin = create_engine(f"{SERVER}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield f"{SERVER}/{name}"
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
