"""The real app in process (as in tests/api), with two guests A and B holding the same pool ids."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from broker.app import create_app
from tests.api.conftest import ADMIN, make_settings


def make_client(tmp_path: Path, **overrides: Any) -> TestClient:
    """An unstarted client of a fresh broker (SQLite in ``tmp_path``); use it as a context."""
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'broker.sqlite3'}", **overrides)
    return TestClient(create_app(settings))


def new_guest(client: TestClient, name: str, **fields: Any) -> tuple[int, dict[str, str]]:
    r = client.post("/v1/guests", json={"name": name, **fields}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()["guest_id"], {"Authorization": f"Bearer {r.json()['token']}"}


def new_pool(client: TestClient, headers: dict[str, str], kind: str = "persistent") -> int:
    r = client.post("/v1/pools", json={"kind": kind}, headers=headers)
    assert r.status_code == 201, r.text
    pool_id: int = r.json()["pool_id"]
    return pool_id


@pytest.fixture
def client_factory(tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """Start brokers on demand (each in its own directory); all are stopped at the end."""
    started: list[TestClient] = []

    def start(**overrides: Any) -> TestClient:
        c = make_client(tmp_path / f"b{len(started)}", **overrides)
        c.__enter__()
        started.append(c)
        return c

    yield start
    for c in reversed(started):
        c.__exit__(None, None, None)
