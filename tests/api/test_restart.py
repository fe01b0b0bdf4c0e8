"""A restart keeps guests, tokens, pools, authorisations, frozen state, admin settings and
(with durability sync) persistent pages; ephemeral pages are gone."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from broker.app import create_app
from tests.api.conftest import ADMIN, make_settings, page, page_url

SHARED = "6f1d3a2e-1b7c-4e55-9d1a-0e8f2c3b4a5d"


def test_restart_restores_metadata_and_persistent_pages(tmp_path: Path, db_url: str) -> None:
    settings = make_settings(tmp_path, db_url, durability="sync")
    with TestClient(create_app(settings)) as c:
        created = c.post(
            "/v1/guests", json={"name": "vm", "cap_pages": 100, "weight": 7}, headers=ADMIN
        ).json()
        gid, headers = created["guest_id"], {"Authorization": f"Bearer {created['token']}"}
        c.post("/v1/shared-auth", json={"uuid": SHARED, "guest_id": gid}, headers=ADMIN)
        persistent = c.post("/v1/pools", json={"kind": "persistent"}, headers=headers).json()[
            "pool_id"
        ]
        ephemeral = c.post("/v1/pools", json={"kind": "ephemeral"}, headers=headers).json()[
            "pool_id"
        ]
        shared = c.post(
            "/v1/pools", json={"kind": "ephemeral", "shared": True, "uuid": SHARED}, headers=headers
        ).json()["pool_id"]
        for i in range(5):
            assert (
                c.put(page_url(persistent, 3, i), content=page(i), headers=headers).status_code
                == 204
            )
        c.put(page_url(ephemeral, 3, 0), content=page(50), headers=headers)
        c.delete(page_url(persistent, 3, 4), headers=headers)
        c.patch("/v1/settings", json={"capacity": "32MiB"}, headers=ADMIN)
        c.post(f"/v1/guests/{gid}/freeze", headers=ADMIN)
        before = c.get(f"/v1/guests/{gid}", headers=ADMIN).json()

    with TestClient(create_app(settings)) as c:
        after = c.get(f"/v1/guests/{gid}", headers=ADMIN).json()
        for key in ("name", "weight", "cap_pages", "frozen", "dedup_domain", "compress"):
            assert after[key] == before[key], key
        assert [(p["pool_id"], p["kind"], p["shared"]) for p in after["pools"]] == [
            (persistent, "persistent", False),
            (ephemeral, "ephemeral", False),
            (shared, "ephemeral", True),
        ]
        # the same token still works; persistent pages are back, the flushed one stays gone
        for i in range(4):
            assert c.get(page_url(persistent, 3, i), headers=headers).content == page(i)
        assert c.get(page_url(persistent, 3, 4), headers=headers).status_code == 404
        assert c.get(page_url(ephemeral, 3, 0), headers=headers).status_code == 404
        assert c.get("/v1/settings", headers=ADMIN).json()["capacity_bytes"] == 32 << 20
        # still frozen after the restart
        r = c.put(page_url(persistent, 3, 9), content=page(9), headers=headers)
        assert r.json()["error"]["reason"] == "frozen"
        # a new guest gets a fresh id
        again = c.post("/v1/guests", json={"name": "vm2"}, headers=ADMIN).json()
        assert again["guest_id"] > gid


def test_deleted_guest_stays_deleted(tmp_path: Path, db_url: str) -> None:
    settings = make_settings(tmp_path, db_url, durability="sync")
    with TestClient(create_app(settings)) as c:
        created = c.post("/v1/guests", json={"name": "gone"}, headers=ADMIN).json()
        headers = {"Authorization": f"Bearer {created['token']}"}
        pool = c.post("/v1/pools", json={"kind": "persistent"}, headers=headers).json()["pool_id"]
        c.put(page_url(pool, 1, 0), content=page(1), headers=headers)
        assert c.delete(f"/v1/guests/{created['guest_id']}", headers=ADMIN).status_code == 204
    with TestClient(create_app(settings)) as c:
        assert c.get("/v1/guests", headers=ADMIN).json() == []
        assert c.get("/v1/self", headers=headers).status_code == 401
        assert c.get("/v1/stats", headers=ADMIN).json()["logical_pages"] == 0
