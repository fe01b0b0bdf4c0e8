"""The pressure loop in the running app: notices, acks, settings in SQL, stats and metrics."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from broker.api.pressure_loop import PressureLoop
from broker.app import create_app, service_of
from tests.api.conftest import ADMIN, Guest, error_code, make_settings, page, page_url
from tests.core.test_recompress import text

PAGES = 64  # capacity in pages
# One background step at start, then the tests step by hand (the loop's one-step method).
QUIET = {"capacity": PAGES * 4096, "pressure_interval_s": 3600.0}


def loop_of(client: TestClient) -> PressureLoop:
    loop = service_of(client.app).pressure_loop
    assert loop is not None
    return loop


def step(client: TestClient) -> list[Any]:
    portal = client.portal
    assert portal is not None
    return portal.call(loop_of(client).step_once)


@pytest.fixture
def client(tmp_path: Path, sqlite_url: str) -> Any:
    settings = make_settings(
        tmp_path,
        sqlite_url,
        persistent_share=0.5,
        release_share=0.25,
        shed_deadline_s=60.0,
        **QUIET,
    )
    with TestClient(create_app(settings)) as c:
        yield c


def test_sheds_go_out_as_notices_and_acks_come_back(
    client: TestClient, make_guest: Callable[..., Guest], make_pool: Callable[..., int]
) -> None:
    (g1, h1), (g2, h2) = make_guest(weight=100), make_guest(weight=100)
    p1, p2 = make_pool(h1), make_pool(h2)
    for i in range(20):
        assert client.put(page_url(p1, 1, i), content=page(i), headers=h1).status_code == 204
        assert client.put(page_url(p2, 1, i), content=page(100 + i), headers=h2).status_code == 204
    step(client)  # 40 pages > 32 (half of 64): 16 each, 4 to shed each
    notices = client.get("/v1/notices", headers=h1).json()
    kinds = {n["type"]: n for n in notices}
    assert kinds["quota"]["cap_pages"] == 16
    assert kinds["shed"]["pages"] == 4 and kinds["shed"]["deadline"] is not None
    assert client.get("/v1/self", headers=h1).json()["quota_pages"] == 16
    # the guest returns 4 pages (flushes them) and acks
    for i in range(4):
        assert client.delete(page_url(p1, 1, i), headers=h1).status_code == 204
    seq = kinds["shed"]["seq"]
    assert (
        client.post(f"/v1/notices/{seq}/ack", json={"pages_returned": 4}, headers=h1).status_code
        == 204
    )
    step(client)
    pressure = client.get("/v1/stats", headers=ADMIN).json()["pressure"]
    assert pressure["state"] == "quotas_lowered"
    assert pressure["sheds_issued"] == 2 and pressure["sheds_acked"] == 1
    assert pressure["pages_returned"] == 4 and pressure["sheds_met"] == 1
    assert pressure["dynamic_quotas"] == {str(g1): 16, str(g2): 16}
    metrics = client.get("/metrics").text
    assert 'tmem_pressure_state{state="quotas_lowered"} 1.0' in metrics
    assert "tmem_pressure_sheds_issued_total 2.0" in metrics
    assert "tmem_pressure_pages_returned_total 4.0" in metrics
    ready = client.get("/readyz").json()
    assert ready["pressure_loop"]["running"] and ready["pressure_loop"]["steps"] >= 2


def test_a_guest_past_its_deadline_is_declined_with_quota(
    client: TestClient, make_guest: Callable[..., Guest], make_pool: Callable[..., int]
) -> None:
    (_, h1), (_, h2) = make_guest(), make_guest()
    p1, p2 = make_pool(h1), make_pool(h2)
    for i in range(20):
        client.put(page_url(p1, 1, i), content=page(i), headers=h1)
        client.put(page_url(p2, 1, i), content=page(100 + i), headers=h2)
    step(client)
    # grace: it may replace its pages, not grow
    assert client.put(page_url(p1, 1, 0), content=page(7), headers=h1).status_code == 204
    r = client.put(page_url(p1, 1, 50), content=page(8), headers=h1)
    assert r.status_code == 409 and r.json()["error"]["reason"] == "quota"
    loop = loop_of(client)
    loop.clock = lambda: 1e9  # far past every deadline
    step(client)
    assert client.get("/v1/stats", headers=ADMIN).json()["pressure"]["guests_overdue"] == 2
    r = client.put(page_url(p1, 1, 1), content=page(9), headers=h1)
    assert r.status_code == 409 and r.json()["error"]["reason"] == "quota"


def test_policy_declines_are_counted_by_reason(
    tmp_path: Path, sqlite_url: str, make_guest: Callable[..., Guest]
) -> None:
    settings = make_settings(
        tmp_path,
        sqlite_url,
        low_watermark=0.25,
        admission_min_samples=4,
        admission_window=64,
        admission_floor=0.5,
        **QUIET,
    )
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/guests", json={"name": "cold"}, headers=ADMIN)
        headers = {"Authorization": f"Bearer {r.json()['token']}"}
        pool = c.post("/v1/pools", json={"kind": "ephemeral"}, headers=headers).json()["pool_id"]
        statuses = [
            c.put(page_url(pool, 1, i), content=page(i), headers=headers).status_code
            for i in range(40)
        ]
        assert 409 in statuses and 204 in statuses
        stats = c.get("/v1/stats", headers=ADMIN).json()
        declined = statuses.count(409)
        assert stats["policy_declines"] == {
            "low_hit_rate": declined,
            "predicted_useless": 0,
            "poor_compression": 0,
        }
        assert stats["puts_declined"]["policy"] == declined
        own = c.get("/v1/self", headers=headers).json()["stats"]
        assert own["policy_declines"] == {
            "low_hit_rate": declined,
            "predicted_useless": 0,
            "poor_compression": 0,
        }
        metrics = c.get("/metrics").text
        assert f'tmem_policy_declines_total{{reason="low_hit_rate"}} {declined}.0' in metrics
        assert f'tmem_puts_declined_total{{reason="policy"}} {declined}.0' in metrics


def test_settings_change_at_run_time_and_survive_a_restart(tmp_path: Path, db_url: str) -> None:
    settings = make_settings(tmp_path, db_url, shed_deadline_s=12.0, **QUIET)
    with TestClient(create_app(settings)) as c:
        body = c.get("/v1/settings", headers=ADMIN).json()
        assert body["shed_deadline_s"] == 12.0 and body["high_watermark"] == 0.95
        r = c.patch(
            "/v1/settings", json={"high_watermark": 0.8, "low_watermark": 0.5}, headers=ADMIN
        )
        assert r.status_code == 200, r.text
        assert r.json()["high_watermark"] == 0.8
        assert loop_of(c).settings.low_watermark == 0.5  # applied at once
        assert service_of(c.app).core.stats().capacity_bytes == PAGES * 4096
        # contradictions are refused whole and change nothing
        r = c.patch("/v1/settings", json={"low_watermark": 0.9}, headers=ADMIN)
        assert r.status_code == 400 and error_code(r) == "bad_request"
        r = c.patch("/v1/settings", json={"no_such_knob": 1}, headers=ADMIN)
        assert r.status_code == 422
        assert loop_of(c).settings.low_watermark == 0.5
        assert (
            c.patch("/v1/settings", json={"shed_deadline_s": 3}, headers=ADMIN).status_code == 200
        )
    with TestClient(create_app(settings)) as c:
        body = c.get("/v1/settings", headers=ADMIN).json()
        assert body["high_watermark"] == 0.8 and body["low_watermark"] == 0.5
        assert body["shed_deadline_s"] == 3.0  # SQL wins over the TMEM_ value (12)


def test_quotas_rise_again_and_the_guest_is_told(
    client: TestClient, make_guest: Callable[..., Guest], make_pool: Callable[..., int]
) -> None:
    (_, h1), (_, h2) = make_guest(), make_guest(cap_pages=30)
    p1, p2 = make_pool(h1), make_pool(h2)
    for i in range(20):
        client.put(page_url(p1, 1, i), content=page(i), headers=h1)
        client.put(page_url(p2, 1, i), content=page(100 + i), headers=h2)
    step(client)
    for i in range(20):
        client.delete(page_url(p1, 1, i), headers=h1)
        client.delete(page_url(p2, 1, i), headers=h2)
    step(client)
    quotas = [n for n in client.get("/v1/notices", headers=h2).json() if n["type"] == "quota"]
    assert [n["cap_pages"] for n in quotas] == [16, 30]  # lowered, then back to the admin cap
    assert client.get("/v1/self", headers=h2).json()["quota_pages"] == 30
    assert client.get("/v1/stats", headers=ADMIN).json()["pressure"]["state"] == "normal"


def test_sheds_and_quotas_are_re_derived_after_a_restart(tmp_path: Path, sqlite_url: str) -> None:
    settings = make_settings(
        tmp_path,
        sqlite_url,
        durability="sync",
        persistent_share=0.5,
        release_share=0.25,
        **QUIET,
    )
    tokens = []
    with TestClient(create_app(settings)) as c:
        for name in ("a", "b"):
            r = c.post("/v1/guests", json={"name": name}, headers=ADMIN)
            headers = {"Authorization": f"Bearer {r.json()['token']}"}
            tokens.append(headers)
            pool = c.post("/v1/pools", json={"kind": "persistent"}, headers=headers).json()
            for i in range(20):
                r = c.put(page_url(pool["pool_id"], 1, i), content=page(i), headers=headers)
                assert r.status_code == 204
        step(c)
        before = [n for n in c.get("/v1/notices", headers=tokens[0]).json() if n["type"] == "shed"]
        assert len(before) == 1
    with TestClient(create_app(settings)) as c:
        # a page route waits until the journal is reloaded; then step (the loop may have already)
        assert c.get(page_url(0, 1, 0), headers=tokens[0]).content == page(0)
        step(c)
        sheds = [n for n in c.get("/v1/notices", headers=tokens[0]).json() if n["type"] == "shed"]
        assert len(sheds) == 2 and sheds[1]["seq"] > sheds[0]["seq"]
        assert sheds[1]["pages"] == 4
        assert c.get("/v1/self", headers=tokens[0]).json()["quota_pages"] == 16
        assert c.get("/v1/stats", headers=ADMIN).json()["pressure"]["sheds_open"] == 2


def test_an_admin_cap_change_announces_the_effective_quota(
    client: TestClient, make_guest: Callable[..., Guest], make_pool: Callable[..., int]
) -> None:
    (g1, h1), (_, h2) = make_guest(), make_guest()
    p1, p2 = make_pool(h1), make_pool(h2)
    for i in range(20):
        client.put(page_url(p1, 1, i), content=page(i), headers=h1)
        client.put(page_url(p2, 1, i), content=page(100 + i), headers=h2)
    step(client)  # dynamic quota 16
    assert client.patch(f"/v1/guests/{g1}", json={"cap_pages": 100}, headers=ADMIN).is_success
    quotas = [n for n in client.get("/v1/notices", headers=h1).json() if n["type"] == "quota"]
    assert [n["cap_pages"] for n in quotas] == [16, 16]  # min(cap 100, dynamic 16)
    assert client.patch(f"/v1/guests/{g1}", json={"cap_pages": 10}, headers=ADMIN).is_success
    quotas = [n for n in client.get("/v1/notices", headers=h1).json() if n["type"] == "quota"]
    assert quotas[-1]["cap_pages"] == 10
    assert client.get("/v1/self", headers=h1).json()["quota_pages"] == 10


def test_the_idle_pass_runs_with_recompress_and_shows_in_stats(
    tmp_path: Path, sqlite_url: str
) -> None:
    settings = make_settings(tmp_path, sqlite_url, compress="always", recompress=True, **QUIET)
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/guests", json={"name": "idle"}, headers=ADMIN)
        headers = {"Authorization": f"Bearer {r.json()['token']}"}
        pool = c.post("/v1/pools", json={"kind": "persistent"}, headers=headers).json()["pool_id"]
        for i in range(20):
            r = c.put(page_url(pool, 1, i), content=text(i), headers=headers)
            assert r.status_code == 204
        before = c.get("/v1/stats", headers=ADMIN).json()
        step(client=c)
        stats = c.get("/v1/stats", headers=ADMIN).json()
        assert stats["recompressed_pages"] == 10  # the coldest half
        saved = stats["recompressed_saved_bytes"]
        assert saved > 0 and stats["counted_bytes"] == before["counted_bytes"] - saved
        for i in range(20):
            assert c.get(page_url(pool, 1, i), headers=headers).content == text(i)
        assert "tmem_recompressed_pages_total 10.0" in c.get("/metrics", headers=ADMIN).text
        assert "recompressed_pages" not in c.get("/v1/self", headers=headers).json()["stats"]
