from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.db.pg import temp_database


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: SQLite in tmp_path, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'broker.sqlite3'}"
    else:
        with temp_database() as url:
            yield url
