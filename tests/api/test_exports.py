"""Export figures: guests report them, the admin reads everyone's, bad reports get a 4xx."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import ADMIN, Guest, error_code

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_reports_replace_each_other_and_the_admin_sees_all(
    client: TestClient, make_guest: Callable[..., Guest]
) -> None:
    (g1, h1), (g2, h2) = make_guest(), make_guest()
    figures = {"base_reads": 10, "base_read_bytes": 40960, "cache_hits": 0, "overlay_blocks": 2}
    assert client.put("/v1/self/exports/vm1", json=figures, headers=h1).status_code == 204
    figures["cache_hits"] = 7
    assert client.put("/v1/self/exports/vm1", json=figures, headers=h1).status_code == 204
    assert (
        client.put("/v1/self/exports/disk.0", json={"base_reads": 1}, headers=h2).status_code == 204
    )
    mine = client.get("/v1/self/exports", headers=h1).json()
    assert [(e["name"], e["figures"]["cache_hits"]) for e in mine] == [("vm1", 7)]
    everyone = client.get("/v1/exports", headers=ADMIN).json()
    assert {(e["guest_id"], e["name"]) for e in everyone} == {(g1, "vm1"), (g2, "disk.0")}
    # a removed guest's exports go with it
    assert client.delete(f"/v1/guests/{g2}", headers=ADMIN).status_code == 204
    assert {e["guest_id"] for e in client.get("/v1/exports", headers=ADMIN).json()} == {g1}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/self/exports/vm1", {"base_reads": -1}, 422),
        ("/v1/self/exports/vm1", {"base_reads": "many"}, 422),
        ("/v1/self/exports/vm1", {"x" * 41: 1}, 422),
        ("/v1/self/exports/vm1", [1, 2], 422),
        ("/v1/self/exports/vm1", {f"k{i}": i for i in range(33)}, 400),
        ("/v1/self/exports/bad%20name", {"base_reads": 1}, 422),
        ("/v1/self/exports/" + "n" * 65, {"base_reads": 1}, 422),
    ],
)
def test_bad_reports_get_a_4xx(
    client: TestClient, guest: Guest, path: str, body: object, status: int
) -> None:
    r = client.put(path, json=body, headers=guest[1])
    assert r.status_code == status, r.text
    assert error_code(r)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_who_may_call_what(client: TestClient, guest: Guest) -> None:
    _, headers = guest
    assert client.get("/v1/exports", headers=headers).status_code == 403
    assert client.get("/v1/exports").status_code == 401
    assert client.put("/v1/self/exports/a", json={}, headers=ADMIN).status_code == 403
    for i in range(16):
        assert client.put(f"/v1/self/exports/e{i}", json={}, headers=headers).status_code == 204
    r = client.put("/v1/self/exports/one-more", json={}, headers=headers)
    assert r.status_code == 400, r.text
