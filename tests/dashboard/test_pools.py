"""GET /v1/pools/{pool_id} (a guest's own pool) and GET /v1/guests/{id}/pools (the admin)."""

from __future__ import annotations

import uuid

from fastapi.testclient import TestClient

from tests.api.conftest import ADMIN, error_code, page, page_url
from tests.harden.conftest import new_guest, new_pool

ZERO = bytes(4096)


def test_a_guest_reads_its_own_pool(client: TestClient) -> None:
    _, a = new_guest(client, "a")
    pool = new_pool(client, a)
    for index, body in enumerate((page(1), page(2), ZERO)):
        assert client.put(page_url(pool, 7, index), content=body, headers=a).status_code == 204
    assert client.get(page_url(pool, 7, 0), headers=a).status_code == 200
    assert client.get(page_url(pool, 7, 9), headers=a).status_code == 404
    assert client.delete(page_url(pool, 7, 1), headers=a).status_code == 204

    r = client.get(f"/v1/pools/{pool}", headers=a)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body == {
        "pool_id": pool,
        "kind": "persistent",
        "shared": False,
        "uuid": None,
        "logical_pages": 2,
        "zero_pages": 1,
        "charged_bytes": 4096,
        "compression_ratio": 1.0,
        "puts": 3,
        "puts_stored": 3,
        "puts_declined": {"quota": 0, "capacity": 0, "frozen": 0, "policy": 0},
        "gets": 2,
        "get_hits": 1,
        "flushes": 1,
        "flushes_found": 1,
        "object_flushes": 0,
        "evictions": 0,
        "compress_poor": 0,
    }


def test_a_guest_never_sees_dedup_or_another_guests_pool(client: TestClient) -> None:
    _, a = new_guest(client, "a")
    _, b = new_guest(client, "b")
    pool_a = new_pool(client, a)
    assert new_pool(client, a) == 1  # A has pools 0 and 1, B only 0
    pool_b = new_pool(client, b)
    # B stores a content A holds already: nothing B can read tells it so
    assert client.put(page_url(pool_a, 1, 0), content=page(5), headers=a).status_code == 204
    assert client.put(page_url(pool_b, 1, 0), content=page(5), headers=b).status_code == 204
    seen = client.get(f"/v1/pools/{pool_b}", headers=b).json()
    assert "dedup_hits" not in seen
    assert seen["charged_bytes"] == 4096 and seen["logical_pages"] == 1
    r = client.get("/v1/pools/1", headers=b)
    assert r.status_code == 404 and error_code(r) == "unknown_pool"
    # the admin token is not a guest's
    r = client.get(f"/v1/pools/{pool_a}", headers=ADMIN)
    assert r.status_code == 403


def test_the_admin_lists_a_guests_pools_with_dedup_hits(client: TestClient) -> None:
    a_id, a = new_guest(client, "a")
    b_id, b = new_guest(client, "b")
    persistent = new_pool(client, a)
    ephemeral = new_pool(client, a, "ephemeral")
    new_pool(client, b)
    assert client.put(page_url(persistent, 1, 0), content=page(3), headers=a).status_code == 204
    assert client.put(page_url(ephemeral, 1, 0), content=page(3), headers=a).status_code == 204

    r = client.get(f"/v1/guests/{a_id}/pools", headers=ADMIN)
    assert r.status_code == 200, r.text
    pools = r.json()
    assert [(p["pool_id"], p["kind"]) for p in pools] == [
        (persistent, "persistent"),
        (ephemeral, "ephemeral"),
    ]
    assert [p["logical_pages"] for p in pools] == [1, 1]
    assert [p["dedup_hits"] for p in pools] == [0, 1]  # the second put found the first's content
    # a guest asking for the admin's view
    assert client.get(f"/v1/guests/{a_id}/pools", headers=a).status_code == 403
    r = client.get("/v1/guests/999/pools", headers=ADMIN)
    assert r.status_code == 404 and error_code(r) == "unknown_guest"
    assert client.get(f"/v1/guests/{b_id}/pools", headers=ADMIN).json()[0]["logical_pages"] == 0


def test_a_shared_pool_shows_for_each_member(client: TestClient) -> None:
    shared = str(uuid.UUID(int=42))
    ids = []
    for name in ("a", "b"):
        guest_id, headers = new_guest(client, name)
        body = {"uuid": shared, "guest_id": guest_id, "allow": True}
        assert client.post("/v1/shared-auth", json=body, headers=ADMIN).status_code == 204
        r = client.post(
            "/v1/pools", json={"kind": "ephemeral", "shared": True, "uuid": shared}, headers=headers
        )
        assert r.status_code == 201, r.text
        ids.append((guest_id, headers, r.json()["pool_id"]))
    (_, a, pool_a), (b_id, b, pool_b) = ids
    assert client.put(page_url(pool_a, 1, 0), content=page(8), headers=a).status_code == 204
    seen = client.get(f"/v1/pools/{pool_b}", headers=b).json()
    assert seen["shared"] is True and seen["uuid"] == shared and seen["logical_pages"] == 1
    admin = client.get(f"/v1/guests/{b_id}/pools", headers=ADMIN).json()
    assert admin[0]["uuid"] == shared


def test_absurd_pool_ids_are_422(client: TestClient) -> None:
    _, a = new_guest(client, "a")
    assert client.get("/v1/pools/99999999999", headers=a).status_code == 422
    assert client.get("/v1/pools/-1", headers=a).status_code == 422
    assert client.get("/v1/guests/99999999999/pools", headers=ADMIN).status_code == 422
