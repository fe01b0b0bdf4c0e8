"""Dedup domains as a resource, compression modes through the API, and both across a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from broker.app import create_app
from tests.api.conftest import ADMIN, error_code, make_settings, page_url

pytestmark = pytest.mark.timeout(60)


def _guest(client: TestClient, name: str, **fields: Any) -> tuple[int, dict[str, str]]:
    r = client.post("/v1/guests", json={"name": name, **fields}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()["guest_id"], {"Authorization": f"Bearer {r.json()['token']}"}


def _domain(client: TestClient, name: str) -> dict[str, Any]:
    r = client.get("/v1/domains", headers=ADMIN)
    assert r.status_code == 200
    (found,) = [d for d in r.json() if d["name"] == name]
    return found  # type: ignore[no-any-return]


def test_put_and_list_domains(client: TestClient) -> None:
    a, _ = _guest(client, "a", dedup_domain="tenant", compress=True)
    b, _ = _guest(client, "b", dedup_domain="tenant")
    r = client.put("/v1/domains/tenant", json={"trusted": True, "compress": "never"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["trusted"] is True and body["compress"] == "never"
    assert body["guests"] == 2
    assert body["overridden_by"] == [a]  # a's own setting wins, and the answer says so
    assert _domain(client, "tenant")["trusted"] is True
    assert client.get(f"/v1/guests/{b}", headers=ADMIN).json()["compress_mode"] == "never"
    assert client.get(f"/v1/guests/{a}", headers=ADMIN).json()["compress_mode"] == "always"
    # left-out fields keep their value; an explicit null compress takes the broker's default
    r = client.put("/v1/domains/tenant", json={"compress": None}, headers=ADMIN)
    assert r.json()["trusted"] is True and r.json()["compress"] is None
    assert r.json()["compress_mode"] == "never"
    # a domain no guest names yet can be set up before its guests come
    assert client.put("/v1/domains/later", json={"trusted": True}, headers=ADMIN).status_code == 200
    assert _domain(client, "later")["guests"] == 0


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("tenant", {"compress": "sometimes"}),
        ("tenant", {"trusted": "yes"}),
        ("tenant", {"shared": True}),
        ("bad name!", {"trusted": True}),
    ],
)
def test_bad_domain_input_is_a_4xx_and_changes_nothing(
    client: TestClient, name: str, body: dict[str, Any]
) -> None:
    before = client.get("/v1/domains", headers=ADMIN).json()
    r = client.put(f"/v1/domains/{name}", json=body, headers=ADMIN)
    assert 400 <= r.status_code < 500, r.text
    assert client.get("/v1/domains", headers=ADMIN).json() == before


def test_guest_compress_may_inherit(client: TestClient) -> None:
    gid, _ = _guest(client, "g", dedup_domain="d", compress=False)
    client.put("/v1/domains/d", json={"compress": "always"}, headers=ADMIN)
    info = client.get(f"/v1/guests/{gid}", headers=ADMIN).json()
    assert (info["compress"], info["compress_mode"]) == (False, "never")
    r = client.patch(f"/v1/guests/{gid}", json={"compress": None}, headers=ADMIN)
    assert r.status_code == 200
    assert (r.json()["compress"], r.json()["compress_mode"]) == (None, "always")
    r = client.patch("/v1/settings", json={"compress": "pressure"}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["compress"] == "pressure"
    assert client.patch("/v1/settings", json={"compress": "yes"}, headers=ADMIN).status_code == 422


def test_trusted_domain_admits_shared_contents(client: TestClient) -> None:
    assert client.patch("/v1/settings", json={"capacity": 8 * 4096}, headers=ADMIN).status_code
    client.put("/v1/domains/img", json={"trusted": True}, headers=ADMIN)
    guests = [_guest(client, f"vm{i}", dedup_domain="img")[1] for i in range(3)]
    image = [bytes([i + 1]) * 4096 for i in range(6)]
    for headers in guests:
        assert client.post("/v1/pools", json={"kind": "persistent"}, headers=headers).status_code
        for i, content in enumerate(image):
            r = client.put(page_url(0, 0, i), content=content, headers=headers)
            assert r.status_code == 204, r.text
    stats = client.get("/v1/stats", headers=ADMIN).json()
    assert stats["logical_pages"] == 18 and stats["counted_bytes"] == 6 * 4096
    # a new content still needs room: two fit, the third does not
    for i in range(2):
        assert client.put(page_url(0, 1, i), content=bytes([99, i]) * 2048, headers=guests[0])
    r = client.put(page_url(0, 1, 2), content=bytes([98]) * 4096, headers=guests[0])
    assert r.status_code == 409 and error_code(r) == "not_stored"
    assert r.json()["error"]["reason"] == "capacity"


def test_domains_and_modes_survive_a_restart(tmp_path: Path, sqlite_url: str) -> None:
    settings = make_settings(tmp_path, sqlite_url)
    with TestClient(create_app(settings)) as c:
        gid, _ = _guest(c, "g", dedup_domain="tenant")
        c.put("/v1/domains/tenant", json={"trusted": True, "compress": "pressure"}, headers=ADMIN)
        c.patch("/v1/settings", json={"compress": "always"}, headers=ADMIN)
    with TestClient(create_app(settings)) as c:
        d = _domain(c, "tenant")
        assert (d["trusted"], d["compress"]) == (True, "pressure")
        assert c.get("/v1/settings", headers=ADMIN).json()["compress"] == "always"
        info = c.get(f"/v1/guests/{gid}", headers=ADMIN).json()
        assert (info["compress"], info["compress_mode"]) == (None, "pressure")
