"""Admin guest management: create, list, show, patch (quota notice), delete, freeze/thaw/flush,
shared-pool authorisation, stats, settings."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import ADMIN, Guest, error_code, page, page_url


def test_create_guest_returns_token_once(client: TestClient) -> None:
    r = client.post(
        "/v1/guests", json={"name": "vm1", "cap_pages": 100, "weight": 50}, headers=ADMIN
    )
    assert r.status_code == 201
    body = r.json()
    assert body["name"] == "vm1"
    assert body["cap_pages"] == 100
    assert body["weight"] == 50
    assert body["frozen"] is False
    assert len(body["token"]) >= 43  # 32 random bytes, URL-safe base64
    shown = client.get(f"/v1/guests/{body['guest_id']}", headers=ADMIN).json()
    assert "token" not in shown
    listed = client.get("/v1/guests", headers=ADMIN).json()
    assert all("token" not in g for g in listed)


def test_guest_names_are_unique(client: TestClient, make_guest: Callable[..., Guest]) -> None:
    make_guest("dup")
    r = client.post("/v1/guests", json={"name": "dup"}, headers=ADMIN)
    assert r.status_code == 409
    assert error_code(r) == "guest_exists"
    assert len(client.get("/v1/guests", headers=ADMIN).json()) == 1


def test_list_and_show(
    client: TestClient, make_guest: Callable[..., Guest], make_pool: Callable[..., int]
) -> None:
    gid, headers = make_guest("alpha")
    make_pool(headers, "persistent")
    make_pool(headers, "ephemeral")
    listed = client.get("/v1/guests", headers=ADMIN).json()
    assert [g["name"] for g in listed] == ["alpha"]
    shown = client.get(f"/v1/guests/{gid}", headers=ADMIN).json()
    assert [p["kind"] for p in shown["pools"]] == ["persistent", "ephemeral"]
    assert isinstance(shown["stats"], dict)
    assert shown["pressure"] is None


def test_unknown_guest_is_404(client: TestClient) -> None:
    for method, path in [
        ("GET", "/v1/guests/999"),
        ("PATCH", "/v1/guests/999"),
        ("DELETE", "/v1/guests/999"),
        ("POST", "/v1/guests/999/freeze"),
        ("POST", "/v1/guests/999/thaw"),
        ("POST", "/v1/guests/999/flush"),
    ]:
        kwargs = {"json": {"weight": 5}} if method == "PATCH" else {}
        r = client.request(method, path, headers=ADMIN, **kwargs)
        assert r.status_code == 404, (method, path)
        assert error_code(r) == "unknown_guest"


def test_patch_changes_fields_and_cap_sends_quota_notice(client: TestClient, guest: Guest) -> None:
    gid, headers = guest
    r = client.patch(f"/v1/guests/{gid}", json={"weight": 300, "compress": True}, headers=ADMIN)
    assert r.status_code == 200
    assert (r.json()["weight"], r.json()["compress"]) == (300, True)
    assert client.get("/v1/notices", headers=headers).json() == []  # no cap change, no notice
    r = client.patch(f"/v1/guests/{gid}", json={"cap_pages": 42}, headers=ADMIN)
    assert r.json()["cap_pages"] == 42
    notices = client.get("/v1/notices", headers=headers).json()
    assert [(n["seq"], n["type"], n["cap_pages"]) for n in notices] == [(1, "quota", 42)]
    r = client.patch(f"/v1/guests/{gid}", json={"cap_pages": None}, headers=ADMIN)
    assert r.json()["cap_pages"] is None
    notices = client.get("/v1/notices?after=1", headers=headers).json()
    assert [(n["type"], n["cap_pages"]) for n in notices] == [("quota", None)]


@pytest.mark.parametrize(
    "body",
    [{"weight": 0}, {"weight": "heavy"}, {"cap_pages": -1}, {"name": "x"}, {"dedup_domain": ""}],
)
def test_patch_refuses_bad_fields_and_changes_nothing(
    client: TestClient, guest: Guest, body: dict[str, object]
) -> None:
    gid, _ = guest
    before = client.get(f"/v1/guests/{gid}", headers=ADMIN).json()
    r = client.patch(f"/v1/guests/{gid}", json=body, headers=ADMIN)
    assert r.status_code == 422
    assert error_code(r) == "validation_error"
    assert client.get(f"/v1/guests/{gid}", headers=ADMIN).json() == before


def test_delete_guest_removes_pages_and_token(
    client: TestClient, make_guest: Callable[..., Guest], make_pool: Callable[..., int]
) -> None:
    gid, headers = make_guest()
    pool = make_pool(headers)
    assert client.put(page_url(pool, 1, 0), content=page(1), headers=headers).status_code == 204
    assert client.delete(f"/v1/guests/{gid}", headers=ADMIN).status_code == 204
    assert client.get(page_url(pool, 1, 0), headers=headers).status_code == 401
    assert client.get("/v1/self", headers=headers).status_code == 401
    assert client.get(f"/v1/guests/{gid}", headers=ADMIN).status_code == 404
    assert client.get("/v1/stats", headers=ADMIN).json()["logical_pages"] == 0


def test_freeze_declines_puts_and_notifies(
    client: TestClient, guest: Guest, make_pool: Callable[..., int]
) -> None:
    gid, headers = guest
    pool = make_pool(headers)
    url = page_url(pool, 7, 0)
    assert client.put(url, content=page(1), headers=headers).status_code == 204
    assert client.post(f"/v1/guests/{gid}/freeze", headers=ADMIN).status_code == 204
    assert client.get(f"/v1/guests/{gid}", headers=ADMIN).json()["frozen"] is True
    r = client.put(url, content=page(2), headers=headers)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "not_stored"
    assert r.json()["error"]["reason"] == "frozen"
    # A declined put leaves nothing at the handle, not even the old copy.
    assert client.get(url, headers=headers).status_code == 404
    assert client.post(f"/v1/guests/{gid}/thaw", headers=ADMIN).status_code == 204
    assert client.put(url, content=page(3), headers=headers).status_code == 204
    types = [n["type"] for n in client.get("/v1/notices", headers=headers).json()]
    assert types == ["freeze", "thaw"]


def test_flush_guest_drops_pages_keeps_pools(
    client: TestClient, guest: Guest, make_pool: Callable[..., int]
) -> None:
    gid, headers = guest
    pool = make_pool(headers)
    for i in range(3):
        client.put(page_url(pool, 1, i), content=page(i), headers=headers)
    assert client.post(f"/v1/guests/{gid}/flush", headers=ADMIN).status_code == 204
    assert all(
        client.get(page_url(pool, 1, i), headers=headers).status_code == 404 for i in range(3)
    )
    assert [p["pool_id"] for p in client.get("/v1/self", headers=headers).json()["pools"]] == [pool]


SHARED = "6f1d3a2e-1b7c-4e55-9d1a-0e8f2c3b4a5d"


def test_shared_pool_needs_authorisation(
    client: TestClient, make_guest: Callable[..., Guest], make_pool: Callable[..., int]
) -> None:
    a_id, a = make_guest()
    b_id, b = make_guest()
    body = {"kind": "ephemeral", "shared": True, "uuid": SHARED}
    r = client.post("/v1/pools", json=body, headers=a)
    assert r.status_code == 403
    assert error_code(r) == "not_authorised"
    for gid in (a_id, b_id):
        r = client.post(
            "/v1/shared-auth", json={"uuid": SHARED, "guest_id": gid, "allow": True}, headers=ADMIN
        )
        assert r.status_code == 204
    pa = make_pool(a, "ephemeral", shared=True, uuid=SHARED)
    pb = make_pool(b, "ephemeral", shared=True, uuid=SHARED)
    assert client.put(page_url(pa, 5, 0), content=page(9), headers=a).status_code == 204
    # b joined the same shared pool: it sees a's page (shared gets are not exclusive).
    assert client.get(page_url(pb, 5, 0), headers=b).content == page(9)
    assert client.get(page_url(pb, 5, 0), headers=b).content == page(9)
    info = client.get("/v1/self", headers=a).json()["pools"][0]
    assert (info["shared"], info["uuid"], info["kind"]) == (True, SHARED, "ephemeral")


def test_shared_auth_validation(client: TestClient, guest: Guest) -> None:
    gid, _ = guest
    r = client.post("/v1/shared-auth", json={"uuid": "not-a-uuid", "guest_id": gid}, headers=ADMIN)
    assert r.status_code == 422
    r = client.post("/v1/shared-auth", json={"uuid": SHARED, "guest_id": 999}, headers=ADMIN)
    assert r.status_code == 404
    assert error_code(r) == "unknown_guest"


def test_withdrawn_authorisation_refuses_new_joins(client: TestClient, guest: Guest) -> None:
    gid, headers = guest
    client.post("/v1/shared-auth", json={"uuid": SHARED, "guest_id": gid}, headers=ADMIN)
    client.post(
        "/v1/shared-auth", json={"uuid": SHARED, "guest_id": gid, "allow": False}, headers=ADMIN
    )
    r = client.post(
        "/v1/pools", json={"kind": "ephemeral", "shared": True, "uuid": SHARED}, headers=headers
    )
    assert r.status_code == 403


def test_stats_have_the_contract_keys_and_one_entry_per_guest(
    client: TestClient, make_guest: Callable[..., Guest], make_pool: Callable[..., int]
) -> None:
    gid, headers = make_guest()
    make_guest()
    pool = make_pool(headers)
    client.put(page_url(pool, 1, 0), content=page(1), headers=headers)
    client.put(page_url(pool, 1, 1), content=bytes(4096), headers=headers)
    client.get(page_url(pool, 1, 0), headers=headers)
    stats = client.get("/v1/stats", headers=ADMIN).json()
    for key in (
        "capacity_bytes", "used_bytes", "logical_pages", "unique_pages", "zero_pages",
        "dedup_ratio", "compression_ratio", "persistent_pages", "ephemeral_pages", "puts",
        "puts_declined", "gets", "get_hits", "flushes", "evictions", "sheds_issued",
    ):  # fmt: skip
        assert key in stats, key
    assert stats["logical_pages"] == 2
    assert stats["zero_pages"] == 1
    assert stats["puts"] == 2
    assert stats["get_hits"] == 1
    assert stats["capacity_bytes"] == 64 << 20
    assert [g["guest_id"] for g in stats["guests"]] == [gid, gid + 1]


def test_settings_capacity_change(client: TestClient) -> None:
    # (the pressure tunables are there too: tests/api/test_pressure.py)
    assert client.get("/v1/settings", headers=ADMIN).json()["capacity_bytes"] == 64 << 20
    r = client.patch("/v1/settings", json={"capacity": "128MiB"}, headers=ADMIN)
    assert r.json()["capacity_bytes"] == 128 << 20
    assert client.get("/v1/stats", headers=ADMIN).json()["capacity_bytes"] == 128 << 20
    assert (
        client.patch("/v1/settings", json={"capacity": "12 parsecs"}, headers=ADMIN).status_code
        == 422
    )
    assert client.patch("/v1/settings", json={"nonsense": 1}, headers=ADMIN).status_code == 422
