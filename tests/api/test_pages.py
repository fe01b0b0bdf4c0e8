"""Pools and the single-page hot routes: put/get/flush page, flush object, destroy pool, and
every malformed input among them (4xx, nothing changed)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from broker.app import create_app
from tests.api.conftest import ADMIN, Guest, error_code, make_settings, own_stats, page, page_url

MAX_OID = (1 << 192) - 1
MAX_INDEX = (1 << 32) - 1


def test_create_pools(client: TestClient, guest: Guest) -> None:
    _, headers = guest
    r = client.post("/v1/pools", json={"kind": "persistent"}, headers=headers)
    assert r.status_code == 201
    body = r.json()
    assert body["pool_id"] == 0
    assert (body["kind"], body["shared"], body["uuid"], body["page_size"]) == (
        "persistent",
        False,
        None,
        4096,
    )
    r = client.post(
        "/v1/pools", json={"kind": "ephemeral", "exclusive_gets": False}, headers=headers
    )
    assert r.json()["pool_id"] == 1


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"kind": "volatile"}, 422, "validation_error"),
        ({"kind": "persistent", "page_size": 8192}, 400, "bad_page_size"),
        (
            {"kind": "persistent", "shared": True, "uuid": "6f1d3a2e-1b7c-4e55-9d1a-0e8f2c3b4a5d"},
            422,
            "validation_error",
        ),
        ({"kind": "ephemeral", "shared": True}, 422, "validation_error"),
        ({"kind": "persistent", "colour": "red"}, 422, "validation_error"),
        ({}, 422, "validation_error"),
    ],
)
def test_create_pool_refuses_malformed_bodies(
    client: TestClient, guest: Guest, body: dict[str, object], status: int, code: str
) -> None:
    _, headers = guest
    r = client.post("/v1/pools", json=body, headers=headers)
    assert r.status_code == status
    assert error_code(r) == code
    assert client.get("/v1/self", headers=headers).json()["pools"] == []


def test_bad_json_is_400(client: TestClient, guest: Guest) -> None:
    _, headers = guest
    r = client.post(
        "/v1/pools",
        content=b"{kind: persistent",
        headers={**headers, "Content-Type": "application/json"},
    )
    assert r.status_code == 400
    assert error_code(r) == "bad_json"


def test_too_many_pools(client: TestClient, guest: Guest, make_pool: Callable[..., int]) -> None:
    _, headers = guest
    ids = [make_pool(headers) for _ in range(16)]
    assert ids == list(range(16))
    r = client.post("/v1/pools", json={"kind": "persistent"}, headers=headers)
    assert r.status_code == 409
    assert error_code(r) == "too_many_pools"
    assert client.delete("/v1/pools/3", headers=headers).status_code == 204
    assert make_pool(headers) == 3  # lowest free id first


def test_put_get_flush_round_trip(
    client: TestClient, guest: Guest, make_pool: Callable[..., int]
) -> None:
    _, headers = guest
    pool = make_pool(headers)
    url = page_url(pool, 12345, 6)
    r = client.put(url, content=page(1), headers=headers)
    assert r.status_code == 204
    assert r.content == b""
    r = client.get(url, headers=headers)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.content == page(1)
    # persistent gets are not destructive
    assert client.get(url, headers=headers).content == page(1)
    # put replaces
    client.put(url, content=page(2), headers=headers)
    assert client.get(url, headers=headers).content == page(2)
    assert client.delete(url, headers=headers).status_code == 204
    r = client.get(url, headers=headers)
    assert r.status_code == 404
    assert error_code(r) == "miss"
    assert client.delete(url, headers=headers).status_code == 204  # idempotent


def test_extreme_handles(client: TestClient, guest: Guest, make_pool: Callable[..., int]) -> None:
    _, headers = guest
    pool = make_pool(headers)
    url = page_url(pool, MAX_OID, MAX_INDEX)
    assert client.put(url, content=page(3), headers=headers).status_code == 204
    assert client.get(url, headers=headers).content == page(3)
    assert client.get(page_url(pool, 0, 0), headers=headers).status_code == 404


def test_ephemeral_gets_are_exclusive(
    client: TestClient, guest: Guest, make_pool: Callable[..., int]
) -> None:
    _, headers = guest
    pool = make_pool(headers, "ephemeral")
    url = page_url(pool, 1, 1)
    assert client.put(url, content=page(4), headers=headers).status_code == 204
    assert client.get(url, headers=headers).content == page(4)
    assert client.get(url, headers=headers).status_code == 404


def test_exclusive_gets_in_a_persistent_pool(
    client: TestClient, guest: Guest, make_pool: Callable[..., int]
) -> None:
    _, headers = guest
    pool = make_pool(headers, "persistent", exclusive_gets=True)
    url = page_url(pool, 1, 1)
    client.put(url, content=page(5), headers=headers)
    assert client.get(url, headers=headers).content == page(5)
    assert client.get(url, headers=headers).status_code == 404


def test_flush_object(client: TestClient, guest: Guest, make_pool: Callable[..., int]) -> None:
    _, headers = guest
    pool = make_pool(headers)
    for i in range(4):
        client.put(page_url(pool, 9, i), content=page(i), headers=headers)
    client.put(page_url(pool, 10, 0), content=page(99), headers=headers)
    assert client.delete(f"/v1/pools/{pool}/objects/9", headers=headers).status_code == 204
    assert all(
        client.get(page_url(pool, 9, i), headers=headers).status_code == 404 for i in range(4)
    )
    assert client.get(page_url(pool, 10, 0), headers=headers).content == page(99)
    assert client.delete(f"/v1/pools/{pool}/objects/9", headers=headers).status_code == 204


def test_destroy_pool(client: TestClient, guest: Guest, make_pool: Callable[..., int]) -> None:
    _, headers = guest
    pool = make_pool(headers)
    client.put(page_url(pool, 1, 0), content=page(1), headers=headers)
    assert client.delete(f"/v1/pools/{pool}", headers=headers).status_code == 204
    r = client.get(page_url(pool, 1, 0), headers=headers)
    assert r.status_code == 404
    assert error_code(r) == "unknown_pool"
    assert client.delete(f"/v1/pools/{pool}", headers=headers).status_code == 204  # idempotent
    assert own_stats(client, headers)["logical_pages"] == 0


def test_quota_declines_with_reason(
    client: TestClient, make_guest: Callable[..., Guest], make_pool: Callable[..., int]
) -> None:
    _, headers = make_guest(cap_pages=2)
    pool = make_pool(headers)
    assert client.put(page_url(pool, 1, 0), content=page(1), headers=headers).status_code == 204
    assert client.put(page_url(pool, 1, 1), content=page(2), headers=headers).status_code == 204
    r = client.put(page_url(pool, 1, 2), content=page(3), headers=headers)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "not_stored"
    assert r.json()["error"]["reason"] == "quota"
    # replacing an existing page does not grow the guest's count
    assert client.put(page_url(pool, 1, 1), content=page(4), headers=headers).status_code == 204


def test_capacity_declines_persistent_puts(tmp_path: Path, db_url: str) -> None:
    small = make_settings(tmp_path, db_url, capacity=4 * 4096)
    with TestClient(create_app(small)) as c:
        created = c.post("/v1/guests", json={"name": "big"}, headers=ADMIN).json()
        headers = {"Authorization": f"Bearer {created['token']}"}
        pool = c.post("/v1/pools", json={"kind": "persistent"}, headers=headers).json()["pool_id"]
        statuses = [c.put(page_url(pool, 1, i), content=page(i), headers=headers) for i in range(8)]
        declined = [r for r in statuses if r.status_code == 409]
        assert declined, "a broker holding 4 pages must decline some of 8 distinct pages"
        assert {r.json()["error"]["reason"] for r in declined} == {"capacity"}
        stored = [i for i, r in enumerate(statuses) if r.status_code == 204]
        assert all(c.get(page_url(pool, 1, i), headers=headers).content == page(i) for i in stored)


@pytest.mark.parametrize("size", [0, 1, 4095, 4097, 8192])
def test_wrong_page_size_is_400_and_keeps_the_old_page(
    client: TestClient, guest: Guest, make_pool: Callable[..., int], size: int
) -> None:
    _, headers = guest
    pool = make_pool(headers)
    url = page_url(pool, 1, 0)
    client.put(url, content=page(1), headers=headers)
    r = client.put(url, content=b"x" * size, headers=headers)
    assert r.status_code == 400
    assert error_code(r) == "bad_page_size"
    assert client.get(url, headers=headers).content == page(1)


def test_oversized_put_is_413_before_it_is_read(
    client: TestClient, guest: Guest, make_pool: Callable[..., int]
) -> None:
    _, headers = guest
    pool = make_pool(headers)
    url = page_url(pool, 1, 0)
    client.put(url, content=page(1), headers=headers)
    r = client.put(url, content=b"x" * (1 << 20), headers=headers)
    assert r.status_code == 413
    assert error_code(r) == "body_too_large"

    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield b"y" * 4096

    r = client.put(url, content=chunks(), headers=headers)  # chunked: no Content-Length
    assert r.status_code == 413
    assert client.get(url, headers=headers).content == page(1)


@pytest.mark.parametrize(
    ("oid", "index"),
    [
        ("abc", "0"),
        ("1", "x"),
        ("-1", "0"),
        ("1", "-1"),
        (str(1 << 192), "0"),
        ("1", str(1 << 32)),
        ("1e3", "0"),
        ("0x10", "0"),
        ("\u0661", "0"),  # an Arabic-Indic digit one: decimal means ASCII here
        ("1" * 200, "0"),
    ],
)
def test_bad_handles_are_400(
    client: TestClient, guest: Guest, make_pool: Callable[..., int], oid: str, index: str
) -> None:
    _, headers = guest
    pool = make_pool(headers)
    url = page_url(pool, oid, index)
    for method in ("PUT", "GET", "DELETE"):
        r = client.request(
            method, url, content=page(1) if method == "PUT" else None, headers=headers
        )
        assert r.status_code == 400, (method, oid, index)
        assert error_code(r) == "bad_handle"
    assert own_stats(client, headers)["logical_pages"] == 0


@pytest.mark.parametrize("pool", ["7", "99999", "x", "-1"])
def test_unknown_or_bad_pool(
    client: TestClient, guest: Guest, make_pool: Callable[..., int], pool: str
) -> None:
    _, headers = guest
    make_pool(headers)
    r = client.put(f"/v1/pools/{pool}/objects/1/pages/0", content=page(1), headers=headers)
    expected = (404, "unknown_pool") if pool.isdigit() else (400, "bad_handle")
    assert (r.status_code, error_code(r)) == expected
    r = client.delete(f"/v1/pools/{pool}/objects/1", headers=headers)
    assert r.status_code == expected[0]


def test_pools_are_per_guest(
    client: TestClient, make_guest: Callable[..., Guest], make_pool: Callable[..., int]
) -> None:
    _, a = make_guest()
    _, b = make_guest()
    pa = make_pool(a)
    client.put(page_url(pa, 1, 0), content=page(1), headers=a)
    # b has no pool 0: it cannot reach a's pool by naming the same id
    r = client.get(page_url(pa, 1, 0), headers=b)
    assert (r.status_code, error_code(r)) == (404, "unknown_pool")
    pb = make_pool(b)
    assert pb == pa
    assert client.get(page_url(pb, 1, 0), headers=b).status_code == 404
    assert client.get(page_url(pa, 1, 0), headers=a).content == page(1)


def test_self_and_pressure(client: TestClient, guest: Guest, make_pool: Callable[..., int]) -> None:
    gid, headers = guest
    pool = make_pool(headers)
    client.put(page_url(pool, 1, 0), content=page(1), headers=headers)
    me = client.get("/v1/self", headers=headers).json()
    assert me["guest_id"] == gid
    assert me["pools"][0]["pool_id"] == pool
    assert me["pools"][0]["pages"] == 1
    assert "pressure" not in me
    report = {"psi_some_avg10": 1.5, "mem_available_bytes": 1 << 30}
    assert client.post("/v1/self/pressure", json=report, headers=headers).status_code == 204
    shown = client.get(f"/v1/guests/{gid}", headers=ADMIN).json()["pressure"]
    assert shown["psi_some_avg10"] == 1.5
    assert shown["mem_available_bytes"] == 1 << 30
    assert shown["psi_full_avg10"] is None
    assert "received_at" in shown
    r = client.post("/v1/self/pressure", json={"psi_some_avg10": 500}, headers=headers)
    assert r.status_code == 422
    r = client.post("/v1/self/pressure", json={"load": 1}, headers=headers)
    assert r.status_code == 422
    assert (
        client.get(f"/v1/guests/{gid}", headers=ADMIN).json()["pressure"]["psi_some_avg10"] == 1.5
    )
