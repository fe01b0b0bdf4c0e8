"""The real app (create_app + lifespan) under Starlette's TestClient, on SQLite and, for the
tests marked so by the ``db_url`` fixture's params, on PostgreSQL."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from broker.app import create_app
from broker.settings import Settings
from tests.db.pg import temp_database

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'broker.sqlite3'}"
    else:
        with temp_database() as url:
            yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'broker.sqlite3'}"


def make_settings(tmp_path: Path, db_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "database_url": db_url,
        "admin_token": ADMIN_TOKEN,
        "durability": "none",
        "capacity": 64 << 20,
        "max_batch_ops": 64,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return make_settings(tmp_path, db_url)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


Guest = tuple[int, dict[str, str]]


@pytest.fixture
def make_guest(client: TestClient) -> Callable[..., Guest]:
    """Create a guest; returns ``(guest_id, its auth headers)``."""
    counter = iter(range(1, 1000))

    def make(name: str | None = None, **fields: Any) -> Guest:
        body = {"name": name or f"vm{next(counter)}", **fields}
        r = client.post("/v1/guests", json=body, headers=ADMIN)
        assert r.status_code == 201, r.text
        data = r.json()
        return data["guest_id"], {"Authorization": f"Bearer {data['token']}"}

    return make


@pytest.fixture
def guest(make_guest: Callable[..., Guest]) -> Guest:
    return make_guest()


@pytest.fixture
def make_pool(client: TestClient) -> Callable[..., int]:
    def make(headers: dict[str, str], kind: str = "persistent", **fields: Any) -> int:
        r = client.post("/v1/pools", json={"kind": kind, **fields}, headers=headers)
        assert r.status_code == 201, r.text
        pool_id: int = r.json()["pool_id"]
        return pool_id

    return make


def page(seed: int) -> bytes:
    """A deterministic page of random-looking bytes (distinct seeds, distinct contents)."""
    return random.Random(seed).randbytes(4096)


def page_url(pool_id: int, oid: int | str, index: int | str) -> str:
    return f"/v1/pools/{pool_id}/objects/{oid}/pages/{index}"


def own_stats(client: Any, headers: dict[str, str]) -> dict[str, Any]:
    """The guest's own figures (``GET /v1/self``): what a test changed, whatever else the broker
    holds (tests/cluster runs these tests on brokers shared by a module's tests, whose pooled
    ``/v1/stats`` includes the other tests' pages once their home has published them)."""
    stats: dict[str, Any] = client.get("/v1/self", headers=headers).json()["stats"]
    return stats


def error_code(response: Any) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    code: str = body["error"]["code"]
    return code
