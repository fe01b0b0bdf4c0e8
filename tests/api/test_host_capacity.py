"""Host-aware capacity through the real app: ``--capacity auto``, the host watch in the pressure
loop (recorded host files swapped under a running broker), the host figures in ``/v1/stats``
and ``/metrics``, and the live path on this machine's own ``/proc``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from broker.app import create_app, service_of
from broker.core.host import auto_capacity
from broker.hostmem import read_host_memory
from tests.api.conftest import ADMIN, make_settings, page_url

pytestmark = pytest.mark.timeout(60)

HOSTS = Path(__file__).resolve().parents[1] / "data" / "host"
PAGE = 4096


def _host(root: Path, case: str) -> None:
    """Make ``root`` show the recorded host ``case`` (the broker reads it at each step)."""
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(HOSTS / case, root)


def test_capacity_auto_sizes_from_the_host(tmp_path: Path, sqlite_url: str) -> None:
    settings = make_settings(tmp_path, sqlite_url, capacity="auto", host_root=HOSTS / "host_95")
    host = read_host_memory(HOSTS / "host_95")
    assert settings.capacity_bytes == auto_capacity(host)
    assert settings.host_watch is True  # auto watches the host unless told not to
    cgroup = make_settings(tmp_path, sqlite_url, capacity="AUTO", host_root=HOSTS / "cgroup_limit")
    assert cgroup.capacity_bytes < settings.capacity_bytes  # the container's limit, not MemTotal


def test_auto_on_an_unreadable_host_is_an_error_naming_the_file(
    tmp_path: Path, sqlite_url: str
) -> None:
    with pytest.raises(ValidationError, match="meminfo"):
        make_settings(tmp_path, sqlite_url, capacity="auto", host_root=tmp_path / "nothing")
    with pytest.raises(ValidationError, match="meminfo"):
        make_settings(tmp_path, sqlite_url, capacity="auto", host_root=HOSTS / "garbage_meminfo")


def test_a_host_running_short_shrinks_the_broker_and_sheds_within_two_steps(
    tmp_path: Path, sqlite_url: str
) -> None:
    root = tmp_path / "host"
    _host(root, "recovered")
    capacity = 400 * PAGE
    settings = make_settings(
        tmp_path,
        sqlite_url,
        capacity=capacity,
        host_watch=True,
        host_root=root,
        pressure_interval_s=3600,  # the test steps the loop itself
    )
    with TestClient(create_app(settings)) as client:
        loop = service_of(client.app).pressure_loop
        assert client.portal is not None
        heads = []
        for name in ("a", "b"):
            r = client.post("/v1/guests", json={"name": name}, headers=ADMIN)
            head = {"Authorization": f"Bearer {r.json()['token']}"}
            heads.append(head)
            client.post("/v1/pools", json={"kind": "persistent"}, headers=head)
            client.post("/v1/pools", json={"kind": "ephemeral"}, headers=head)
            for i in range(140):  # 70 % of capacity persistent, 20 % ephemeral, in all
                client.put(page_url(0, 1, i), content=os.urandom(PAGE), headers=head)
            for i in range(40):
                client.put(page_url(1, 1, i), content=os.urandom(PAGE), headers=head)
        for _ in range(3):
            assert client.portal.call(loop.step_once) == []
        stats = client.get("/v1/stats", headers=ADMIN).json()
        assert stats["capacity_bytes"] == capacity and stats["host"]["state"] == "normal"
        assert stats["host"]["mem_total_bytes"] > 0

        _host(root, "host_95")
        kinds: list[str] = []
        for _ in range(2):  # the first shed within two pressure intervals
            kinds += [n.type for n in client.portal.call(loop.step_once)]
            if "shed" in kinds:
                break
        assert "shed" in kinds
        stats = client.get("/v1/stats", headers=ADMIN).json()
        assert stats["capacity_bytes"] < capacity
        host = stats["host"]
        assert host["state"] == "shrunk" and host["last_reason"] == "mem_available"
        assert host["effective_capacity_bytes"] == stats["capacity_bytes"]
        assert host["used_percent"] > 90
        # ephemeral pages went first; every persistent page is still there
        assert stats["ephemeral_pages"] < 80 and stats["persistent_pages"] == 280
        for head in heads:
            assert client.get(page_url(0, 1, 139), headers=head).status_code == 200
        metrics = {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in client.get("/metrics").text.splitlines()
            if line and not line.startswith("#")
        }
        assert metrics["tmem_host_effective_capacity_bytes"] == stats["capacity_bytes"]
        assert metrics['tmem_host_state{state="shrunk"}'] == 1.0

        # an admin's new capacity while shrunk: the base moves, the shrink stays
        r = client.patch("/v1/settings", json={"capacity": 800 * PAGE}, headers=ADMIN)
        assert r.status_code == 200
        stats = client.get("/v1/stats", headers=ADMIN).json()
        assert stats["host"]["base_capacity_bytes"] == 800 * PAGE
        assert stats["capacity_bytes"] < 800 * PAGE

        # the host recovers: the capacity grows back, a step at a time, after the hysteresis
        _host(root, "recovered")
        for _ in range(40):
            client.portal.call(loop.step_once)
        stats = client.get("/v1/stats", headers=ADMIN).json()
        assert stats["host"]["grows"] > 0 and stats["host"]["state"] in ("recovering", "normal")


def test_the_live_host_is_read_on_this_machine(tmp_path: Path, sqlite_url: str) -> None:
    settings = make_settings(tmp_path, sqlite_url, host_watch=True, pressure_interval_s=3600)
    with TestClient(create_app(settings)) as client:
        loop = service_of(client.app).pressure_loop
        assert client.portal is not None
        client.portal.call(loop.step_once)
        host = client.get("/v1/stats", headers=ADMIN).json()["host"]
        assert host["readings"] >= 1 and host["read_errors"] == 0
        assert 0 < host["mem_available_bytes"] <= host["mem_total_bytes"]
        assert host["limit_bytes"] <= host["mem_total_bytes"]


def test_no_host_figures_unless_watching(client: TestClient) -> None:
    assert "host" not in client.get("/v1/stats", headers=ADMIN).json()
