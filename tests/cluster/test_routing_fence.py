"""A stale home's write that was already past its lease check is refused by the epoch fence in
Redis, and answered with the redirect to the new home (never a 5xx, never a lost or
overwritten page). Two real apps in cluster mode on the real data plane; the stale broker is
made to trust its lease as a broker paused mid-request would (its check passed before the
pause, the write lands after the takeover)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from broker.app import create_app
from broker.settings import Settings
from tests.api.conftest import ADMIN, ADMIN_TOKEN
from tests.cluster.redis_proc import RedisClusterProc

pytestmark = [pytest.mark.postgres]


def _settings(tmp: Path, pg_url: str, seeds: list[str], ns: str, name: str) -> Settings:
    return Settings(
        data_dir=tmp / name,
        database_url=pg_url,
        admin_token=ADMIN_TOKEN,
        durability="none",
        capacity=64 << 20,
        cluster=seeds,
        cluster_namespace=ns,
        broker_id=f"{ns}-{name}",
        advertise_url=f"http://{name}.test",
        lease_s=30.0,
    )


def test_a_stale_homes_write_is_fenced_and_redirected(
    tmp_path: Path, redis_cluster: RedisClusterProc, pg_url: str
) -> None:
    ns = f"f{secrets.token_hex(4)}"
    apps = {n: create_app(_settings(tmp_path, pg_url, redis_cluster.seeds, ns, n)) for n in "ab"}
    with (
        TestClient(apps["a"], base_url="http://a.test", follow_redirects=False) as a,
        TestClient(apps["b"], base_url="http://b.test", follow_redirects=False) as b,
    ):
        made = a.post("/v1/guests", json={"name": "vm-f"}, headers=ADMIN).json()
        gid, auth = made["guest_id"], {"Authorization": f"Bearer {made['token']}"}
        assert a.post(f"/v1/guests/{gid}/home", json={"broker": f"{ns}-a"}, headers=ADMIN)
        pool = a.post("/v1/pools", json={"kind": "persistent"}, headers=auth).json()["pool_id"]
        url = f"/v1/pools/{pool}/objects/5/pages/0"
        old, new = b"\x01" * 4096, b"\x02" * 4096
        assert a.put(url, content=old, headers=auth).status_code == 204

        stale = a.app.state.box.service.cluster  # type: ignore[attr-defined]
        # b takes the guest at the next epoch (what a takeover after a's lease ran out does)
        moved = b.post(f"/v1/guests/{gid}/home", json={"broker": f"{ns}-b"}, headers=ADMIN)
        assert moved.status_code == 200 and moved.json()["home_epoch"] >= 2
        assert b.put(url, content=new, headers=auth).status_code == 204
        # a still believes it serves the guest (paused after its check): its engine's write
        # meets the fence, and the answer is the redirect to b
        stale.serving[gid] = moved.json()["home_epoch"] - 1
        stale.valid_until = float("inf")
        a.app.state.box.service.core.epochs[gid] = moved.json()["home_epoch"] - 1  # type: ignore[attr-defined]
        r = a.put(url, content=old, headers=auth)
        assert r.status_code == 307, r.text
        assert r.headers["location"] == f"http://b.test{url}"
        assert gid not in stale.serving  # a stopped serving it
        # the page is b's write, through either broker
        assert b.get(url, headers=auth).content == new
        r = a.get(url, headers=auth)
        assert r.status_code == 307
