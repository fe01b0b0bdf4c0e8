"""The real app in process (as in tests/api), on SQLite, for the dashboard's routes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from broker.app import create_app
from tests.api.conftest import make_settings


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'broker.sqlite3'}")
    with TestClient(create_app(settings)) as c:
        yield c
