"""A shed issued by the broker's own pressure policy, answered by the NBD export end to end:
the export moves blocks to its fallback file, acks, and every block still reads back."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.e2e.brokerproc import BrokerProcess
from tests.e2e.nbd_support import (
    NbdAgent,
    new_guest,
    persistent_pages,
    run,
    wait_for_an_acked_shed,
)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not shutil.which("qemu-io"), reason="needs qemu-utils (scripts/system-deps.sh)"
    ),
]

CAPACITY_PAGES = 2048  # 8 MiB: persistent pages above 75% of it (1536) bring quotas down
WRITTEN_PAGES = 1900


def test_the_policy_sheds_and_the_export_moves_blocks_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMEM_PRESSURE_INTERVAL_S", "0.1")
    monkeypatch.setenv("TMEM_SHED_DEADLINE_S", "10")
    with BrokerProcess(tmp_path / "broker", capacity=f"{CAPACITY_PAGES * 4}KiB") as broker:
        guest_id, token = new_guest(broker, "vm")
        with NbdAgent.for_broker(broker, token, tmp_path) as agent:
            run(["qemu-io", "-f", "raw", agent.uri, "-c", f"write -P 0x5a 0 {WRITTEN_PAGES * 4}k"])
            pressure = wait_for_an_acked_shed(broker)
            assert pressure["sheds_issued"] >= 1 and pressure["sheds_acked"] >= 1, pressure
            assert pressure["pages_returned"] > 0
            quota = broker.json("GET", f"/v1/guests/{guest_id}")["quota_pages"]
            assert quota is not None and quota < WRITTEN_PAGES
            held = persistent_pages(broker, guest_id)
            assert held <= quota, (held, quota)
            # every block reads back, from the broker or the fallback file
            out = run(
                ["qemu-io", "-f", "raw", agent.uri, "-c", f"read -P 0x5a 0 {WRITTEN_PAGES * 4}k"]
            )
            assert "Pattern verification failed" not in out.stdout + out.stderr
        assert (tmp_path / "fallback.img").stat().st_blocks * 512 >= (WRITTEN_PAGES - quota) * 4096
