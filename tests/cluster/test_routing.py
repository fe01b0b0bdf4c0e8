"""Routing between brokers, in process: two real apps (create_app + lifespan) sharing one fresh
PostgreSQL database, each with its own in-memory core for the pages (the routing, leases and
redirects do not depend on where bytes live; the Redis engine's own tests cover that part).

Checked: a guest created at any broker gets one home; the other broker answers its page and
control calls with 307 + Location on the home's URL (before reading anything else), and its
admins' per-guest changes too; an admin move changes the home and bumps the epoch; the pool's
stats sum the brokers with a per-broker breakdown; guests are listed with their home; a
stopped broker hands its guests over at once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from broker.app import create_app
from broker.core import CoreConfig, Tmem
from broker.settings import Settings
from broker.store import open_journal
from tests.api.conftest import ADMIN, ADMIN_TOKEN
from tests.db.pg import temp_database

pytestmark = pytest.mark.postgres

PAGE = bytes(range(256)) * 16


def _local_core(settings: Settings, broker_id: str) -> tuple[Any, Any]:
    journal = open_journal(settings)
    core = Tmem(CoreConfig(capacity_bytes=settings.capacity_bytes), journal=journal)
    return core, journal


def _settings(tmp_path: Path, url: str, name: str) -> Settings:
    return Settings(
        data_dir=tmp_path / name,
        database_url=url,
        admin_token=ADMIN_TOKEN,
        durability="none",
        capacity=16 << 20,
        cluster=["127.0.0.1:1"],  # not dialled: the pages are in each app's own core here
        broker_id=name,
        advertise_url=f"http://{name}.test",
        lease_s=30.0,
    )


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[dict[str, TestClient]]:
    with temp_database() as url:
        apps = {
            name: create_app(_settings(tmp_path, url, name), cluster_core=_local_core)
            for name in ("a", "b")
        }
        with (
            TestClient(apps["a"], base_url="http://a.test") as a,
            TestClient(apps["b"], base_url="http://b.test") as b,
        ):
            yield {"a": a, "b": b}


def _step(brokers: dict[str, TestClient]) -> None:
    for c in brokers.values():
        control = c.app.state.box.service.cluster  # type: ignore[attr-defined]
        c.portal.call(control.step)  # type: ignore[union-attr]


def _guest(brokers: dict[str, TestClient], name: str) -> tuple[int, dict[str, str], str]:
    made = brokers["a"].post("/v1/guests", json={"name": name}, headers=ADMIN)
    assert made.status_code == 201, made.text
    body = made.json()
    _step(brokers)
    home = brokers["a"].get(f"/v1/guests/{body['guest_id']}", headers=ADMIN).json()
    return body["guest_id"], {"Authorization": f"Bearer {body['token']}"}, home["home_broker"]


def test_the_other_broker_redirects_to_the_home(brokers: dict[str, TestClient]) -> None:
    gid, auth, home = _guest(brokers, "vm-1")
    assert home in brokers
    other = "b" if home == "a" else "a"
    h, o = brokers[home], brokers[other]
    pool = h.post("/v1/pools", json={"kind": "persistent"}, headers=auth)
    assert pool.status_code == 201, pool.text
    pid = pool.json()["pool_id"]
    target = f"/v1/pools/{pid}/objects/7/pages/3"
    assert h.put(target, content=PAGE, headers=auth).status_code == 204
    for method in ("GET", "PUT", "DELETE"):
        r = o.request(
            method,
            target,
            content=PAGE if method == "PUT" else None,
            headers=auth,
            follow_redirects=False,
        )
        assert r.status_code == 307, (method, r.text)
        assert r.headers["location"] == f"http://{home}.test{target}"
        assert r.json()["error"]["code"] == "not_home"
    # guest control and admins' per-guest changes go home too; reads are answered anywhere
    r = o.get("/v1/self", headers=auth, follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == f"http://{home}.test/v1/self"
    r = o.post(f"/v1/guests/{gid}/freeze", headers=ADMIN, follow_redirects=False)
    assert r.status_code == 307
    r = o.get(f"/v1/guests/{gid}/pools", headers=ADMIN, follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"].endswith(f"/v1/guests/{gid}/pools")
    assert h.get(f"/v1/guests/{gid}/pools", headers=ADMIN).status_code == 200
    shown = o.get(f"/v1/guests/{gid}", headers=ADMIN).json()
    assert shown["home_broker"] == home and shown["home_url"] == f"http://{home}.test"
    # the page is still at the home (nothing the other broker did touched it)
    assert h.get(target, headers=auth).content == PAGE
    # a bad token is refused the same way at both: no redirect reveals anything
    bad = {"Authorization": "Bearer nope"}
    assert o.get(target, headers=bad, follow_redirects=False).status_code == 401


def test_admin_move_bumps_the_epoch_and_routes_follow(brokers: dict[str, TestClient]) -> None:
    gid, auth, home = _guest(brokers, "vm-2")
    other = "b" if home == "a" else "a"
    before = brokers[home].get(f"/v1/guests/{gid}", headers=ADMIN).json()["home_epoch"]
    moved = brokers[home].post(f"/v1/guests/{gid}/home", json={"broker": other}, headers=ADMIN)
    assert moved.status_code == 200, moved.text
    assert moved.json()["home_broker"] == other and moved.json()["home_epoch"] == before + 1
    r = brokers[home].get("/v1/self", headers=auth, follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"].startswith(f"http://{other}.test")
    # the new home serves it, even before its next step, for a request the old home sent on
    resent = {**auth, "X-Tmem-Redirected": "1"}
    assert brokers[other].get("/v1/self", headers=resent).status_code == 200
    # a move to a broker that is not there is a 400, and changes nothing
    bad = brokers[other].post(f"/v1/guests/{gid}/home", json={"broker": "zz"}, headers=ADMIN)
    assert bad.status_code == 400
    assert brokers[other].get(f"/v1/guests/{gid}", headers=ADMIN).json()["home_broker"] == other


def test_pool_stats_and_listing(brokers: dict[str, TestClient]) -> None:
    made = [_guest(brokers, f"vm-{i}") for i in range(6)]
    homes = {home for _, _, home in made}
    for gid, auth, home in made:
        c = brokers[home]
        pid = c.post("/v1/pools", json={"kind": "persistent"}, headers=auth).json()["pool_id"]
        assert c.put(f"/v1/pools/{pid}/objects/1/pages/{gid}", content=PAGE, headers=auth)
    _step(brokers)
    stats = brokers["a"].get("/v1/stats", headers=ADMIN).json()
    assert {b["broker_id"] for b in stats["brokers"]} == {"a", "b"}
    assert stats["persistent_pages"] == 6
    assert sum(b["stats"]["persistent_pages"] for b in stats["brokers"]) == 6
    listed = brokers["b"].get("/v1/guests", headers=ADMIN).json()
    assert {g["home_broker"] for g in listed} == homes
    assert all(g["stats"].get("persistent_pages") == 1 for g in listed)
    ids = {
        b["broker_id"]: b["guests"] for b in brokers["b"].get("/v1/brokers", headers=ADMIN).json()
    }
    assert sorted(ids["a"] + ids["b"]) == sorted(gid for gid, _, _ in made)


def test_single_host_refuses_cluster_calls(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, admin_token=ADMIN_TOKEN, durability="none", capacity=16 << 20
    )
    with TestClient(create_app(settings)) as c:
        gid = c.post("/v1/guests", json={"name": "x"}, headers=ADMIN).json()["guest_id"]
        r = c.post(f"/v1/guests/{gid}/home", json={"broker": "b"}, headers=ADMIN)
        assert r.status_code == 409 and r.json()["error"]["code"] == "not_a_cluster"
        assert c.get("/v1/brokers", headers=ADMIN).json() == []
