"""Which pages to shed over HTTP: ``GET /v1/self/shed-candidates`` and the admin's
``POST /v1/guests/{id}/shed`` with its deadline and escalation."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from broker.app import create_app
from tests.api.conftest import ADMIN, Guest, error_code, make_settings, page, page_url
from tests.api.test_pressure import QUIET, loop_of, step

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def client(tmp_path: Path, sqlite_url: str) -> Any:
    with TestClient(create_app(make_settings(tmp_path, sqlite_url, **QUIET))) as c:
        yield c


def _candidates(client: TestClient, headers: dict[str, str], limit: int = 256) -> list[Any]:
    r = client.get(f"/v1/self/shed-candidates?limit={limit}", headers=headers)
    assert r.status_code == 200, r.text
    return [(c["pool_id"], int(c["oid"]), c["index"]) for c in r.json()]


def test_candidates_are_the_guests_own_coldest_persistent_pages(
    client: TestClient, make_guest: Callable[..., Guest], make_pool: Callable[..., int]
) -> None:
    (_, h1), (_, h2) = make_guest(), make_guest()
    p1, p2 = make_pool(h1), make_pool(h2)
    big = (1 << 192) - 1
    for i in range(4):
        assert client.put(page_url(p1, big, i), content=page(i), headers=h1).status_code == 204
    client.put(page_url(p2, 1, 0), content=page(9), headers=h2)
    assert client.get(page_url(p1, big, 0), headers=h1).status_code == 200  # now the newest
    assert _candidates(client, h1) == [(p1, big, 1), (p1, big, 2), (p1, big, 3), (p1, big, 0)]
    assert _candidates(client, h1, limit=2) == [(p1, big, 1), (p1, big, 2)]
    assert _candidates(client, h2) == [(p2, 1, 0)]
    # taking pages back (get, then flush) moves the list on
    client.delete(page_url(p1, big, 1), headers=h1)
    assert _candidates(client, h1, limit=1) == [(p1, big, 2)]
    for bad in ("-1", "4097", "x"):
        r = client.get(f"/v1/self/shed-candidates?limit={bad}", headers=h1)
        assert r.status_code == 422
    assert client.get("/v1/self/shed-candidates", headers=ADMIN).status_code == 403
    assert client.get("/v1/self/shed-candidates").status_code == 401


def test_admin_shed_notifies_holds_then_escalates_without_losing_a_page(
    client: TestClient, make_guest: Callable[..., Guest], make_pool: Callable[..., int]
) -> None:
    gid, h = make_guest()
    pool = make_pool(h)
    for i in range(10):
        client.put(page_url(pool, 1, i), content=page(i), headers=h)
    r = client.post(f"/v1/guests/{gid}/shed", json={"pages": 4, "deadline_s": 5}, headers=ADMIN)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["pages"] == 4 and body["cap_pages"] == 6 and body["seq"] is not None
    notices = {n["type"]: n for n in client.get("/v1/notices", headers=h).json()}
    assert notices["shed"]["seq"] == body["seq"] and notices["shed"]["pages"] == 4
    assert datetime.fromisoformat(notices["shed"]["deadline"]) == datetime.fromisoformat(
        body["deadline"]
    )
    assert notices["quota"]["cap_pages"] == 6
    # grace: it keeps what it holds but cannot grow
    r = client.put(page_url(pool, 1, 50), content=page(50), headers=h)
    assert r.status_code == 409 and r.json()["error"]["reason"] == "quota"
    # the deadline passes: the quota binds, the guest hears it; nothing it holds is lost
    loop_of(client).clock = lambda: 1e9
    sent = step(client)
    assert [(n.type, n.cap_pages) for n in sent] == [("quota", 6)]
    stats = client.get("/v1/stats", headers=ADMIN).json()["pressure"]
    assert stats["guests_overdue"] == 1 and stats["admin_sheds"] == 1
    assert stats["sheds_overdue"] == 1
    for i in range(10):
        assert client.get(page_url(pool, 1, i), headers=h).content == page(i)
    # it returns the 4 coldest (the gets above touched them in order 0..9) and acks
    coldest = _candidates(client, h, limit=4)
    assert coldest == [(pool, 1, i) for i in range(4)]
    for _pid, oid, index in coldest:
        client.delete(page_url(pool, oid, index), headers=h)
    ack = client.post(f"/v1/notices/{body['seq']}/ack", json={"pages_returned": 4}, headers=h)
    assert ack.status_code == 204
    step(client)
    assert client.get("/v1/self", headers=h).json()["quota_pages"] is None
    assert client.put(page_url(pool, 1, 50), content=page(50), headers=h).status_code == 204
    assert "tmem_pressure_admin_sheds_total 1.0" in client.get("/metrics").text


def test_admin_shed_refuses_bad_input_and_changes_nothing(
    client: TestClient, make_guest: Callable[..., Guest], make_pool: Callable[..., int]
) -> None:
    gid, h = make_guest()
    url = f"/v1/guests/{gid}/shed"
    for body in ({}, {"pages": 0}, {"pages": 1, "deadline_s": 0}, {"pages": 1, "x": 1}):
        assert client.post(url, json=body, headers=ADMIN).status_code == 422
    r = client.post("/v1/guests/999/shed", json={"pages": 1}, headers=ADMIN)
    assert r.status_code == 404 and error_code(r) == "unknown_guest"
    assert client.post(url, json={"pages": 1}, headers=h).status_code == 403
    # a guest holding nothing: nothing asked, no notice
    r = client.post(url, json={"pages": 3}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["pages"] == 0 and r.json()["seq"] is None
    assert client.get("/v1/notices", headers=h).json() == []
    assert client.get("/v1/stats", headers=ADMIN).json()["pressure"]["admin_sheds"] == 0
