"""Every field of a pressure report reaches the policy, and the ephemeral policy is a setting
(docs/pressure.md, "Feedback from the guest" and "Ephemeral policy")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from broker.app import create_app, service_of
from tests.api.conftest import ADMIN, make_settings

QUIET = {"capacity": 64 * 4096, "pressure_interval_s": 3600.0}


@pytest.fixture
def client(tmp_path: Path, sqlite_url: str) -> Any:
    with TestClient(create_app(make_settings(tmp_path, sqlite_url, **QUIET))) as c:
        yield c


def _guest(client: TestClient, name: str) -> tuple[int, dict[str, str]]:
    r = client.post("/v1/guests", json={"name": name}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()["guest_id"], {"Authorization": f"Bearer {r.json()['token']}"}


def test_every_report_field_reaches_the_policy(client: TestClient) -> None:
    idle, idle_headers = _guest(client, "idle")
    busy, busy_headers = _guest(client, "busy")
    reports = {
        idle: ({"psi_some_avg10": 0.0, "mem_available_bytes": 3 << 30}, idle_headers),
        busy: (
            {
                "psi_some_avg10": 2.0,
                "psi_full_avg10": 20.0,  # x 4: need 0.8
                "mem_available_bytes": 512 << 20,
                "swap_used_bytes": 0,
            },
            busy_headers,
        ),
    }
    for body, headers in reports.values():
        assert client.post("/v1/self/pressure", json=body, headers=headers).status_code == 204
    service = service_of(client.app)
    loop = service.pressure_loop
    assert client.portal is not None
    client.portal.call(loop.step_once)
    core = service.core
    assert core._reg.guest(idle).account.bias == pytest.approx(0.5)
    # need 0.8 (PSI full), free (512 - 256) / 768 x (1 - 0.8): 1.8 x (1 - 0.5 x 1/15)
    assert core._reg.guest(busy).account.bias == pytest.approx(1.74)


def test_the_ephemeral_policy_is_a_setting(client: TestClient) -> None:
    core = service_of(client.app).core
    assert client.get("/v1/settings", headers=ADMIN).json()["ephemeral_policy"] == "lru"
    r = client.patch("/v1/settings", json={"ephemeral_policy": "tinylfu"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["ephemeral_policy"] == "tinylfu" and core.ephemeral_policy == "tinylfu"
    r = client.patch("/v1/settings", json={"ephemeral_policy": "arc"}, headers=ADMIN)
    assert r.status_code == 422
    r = client.patch(
        "/v1/settings",
        json={"pressure_low_available_bytes": 2 << 30, "pressure_free_available_bytes": 1 << 30},
        headers=ADMIN,
    )
    assert r.status_code == 400
    assert core.ephemeral_policy == "tinylfu"
