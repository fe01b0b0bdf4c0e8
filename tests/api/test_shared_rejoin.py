"""Joining a shared pool the guest is already in is idempotent: the same pool id, the cache's
pages kept, and (across a restart) one pool in SQL. A base-image export joins its image's cache
at every start and stays a member at stop, so it joins again after a restart of the agent."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from broker.app import create_app
from tests.api.conftest import ADMIN, Guest, make_settings, page, page_url

pytestmark = pytest.mark.timeout(60)

SHARED = "0b6f7c55-3f0a-4f0e-9a0d-8f1e2a3b4c5d"


def authorise(client: TestClient, *guest_ids: int) -> None:
    for gid in guest_ids:
        body = {"uuid": SHARED, "guest_id": gid, "allow": True}
        assert client.post("/v1/shared-auth", json=body, headers=ADMIN).status_code == 204


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_joining_twice_answers_the_same_pool_and_keeps_its_pages(
    client: TestClient, make_guest: Callable[..., Guest], make_pool: Callable[..., int]
) -> None:
    (a_id, a), (b_id, b) = make_guest(), make_guest()
    authorise(client, a_id, b_id)
    pa = make_pool(a, "ephemeral", shared=True, uuid=SHARED)
    pb = make_pool(b, "ephemeral", shared=True, uuid=SHARED)
    assert client.put(page_url(pa, 5, 0), content=page(9), headers=a).status_code == 204
    body = {"kind": "ephemeral", "shared": True, "uuid": SHARED}
    again = client.post("/v1/pools", json=body, headers=a)
    assert again.status_code == 201, again.text
    assert again.json()["pool_id"] == pa
    assert again.json()["pages"] == 1
    assert client.get(page_url(pa, 5, 0), headers=a).content == page(9)
    # a is in the pool once: leaving once leaves it, and b keeps the pool and its page
    assert client.delete(f"/v1/pools/{pa}", headers=a).status_code == 204
    assert client.get("/v1/self", headers=a).json()["pools"] == []
    assert client.get(page_url(pb, 5, 0), headers=b).content == page(9)


def test_a_rejoined_pool_is_one_pool_after_a_restart(tmp_path: Path, sqlite_url: str) -> None:
    settings = make_settings(tmp_path, sqlite_url)
    body = {"kind": "ephemeral", "shared": True, "uuid": SHARED}
    with TestClient(create_app(settings)) as client:
        created = client.post("/v1/guests", json={"name": "vm"}, headers=ADMIN).json()
        gid, headers = created["guest_id"], {"Authorization": f"Bearer {created['token']}"}
        authorise(client, gid)
        first = client.post("/v1/pools", json=body, headers=headers).json()["pool_id"]
        assert client.post("/v1/pools", json=body, headers=headers).json()["pool_id"] == first
    with TestClient(create_app(settings)) as client:
        pools = client.get("/v1/self", headers=headers).json()["pools"]
        assert [(p["pool_id"], p["shared"]) for p in pools] == [(first, True)]
        again = client.post("/v1/pools", json=body, headers=headers)
        assert again.status_code == 201 and again.json()["pool_id"] == first
