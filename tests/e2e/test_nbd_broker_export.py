"""Exports served by the broker itself (``tmem-broker serve --nbd-dir``): a guest creates one
with its token, qemu-io and fio reach it on its Unix socket, its pages are the guest's
persistent pages, and it goes away with its pool."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from tests.e2e.nbd_support import (
    UdsBrokerProcess,
    fio_json,
    new_guest,
    persistent_pages,
    run,
    wait_for_an_acked_shed,
)

pytestmark = [
    pytest.mark.timeout(150),
    pytest.mark.skipif(not shutil.which("qemu-io"), reason="needs qemu-utils"),
]


def test_a_guest_export_on_the_broker_stores_reads_and_goes_away(tmp_path: Path) -> None:
    nbd_dir = tmp_path / "nbd"
    with UdsBrokerProcess(
        tmp_path / "broker", uds=tmp_path / "broker.sock", nbd_dir=nbd_dir, durability="sync"
    ) as broker:
        guest_id, token = new_guest(broker, "vm")
        made = broker.json("PUT", "/v1/self/nbd/swap", {"size": 8 << 20}, token=token, expect=201)
        assert made["name"] == "swap" and made["size"] == 8 << 20
        assert stat.S_IMODE(nbd_dir.stat().st_mode) == 0o700  # only the broker's user
        uri = made["uri"]
        assert Path(made["socket"]).is_socket()
        broker.json("PUT", "/v1/self/nbd/swap", {"size": 4096}, token=token, expect=409)
        broker.json("PUT", "/v1/self/nbd/bad%20name", {"size": 4096}, token=token, expect=422)
        broker.json("PUT", "/v1/self/nbd/x", {"size": 0}, token=token, expect=422)
        run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x3c 0 1m", "-c", "write -P 0x7e 2102152 3000",
             "-c", "flush"])  # fmt: skip
        assert (
            persistent_pages(broker, guest_id) == 256 + 1
        )  # 1 MiB, and one block (read-modify-write of a part)
        out = run(["qemu-io", "-f", "raw", uri, "-c", "read -P 0x3c 0 4096",
                   "-c", "read -P 0x7e 2102152 3000", "-c", "read -P 0 3m 4k"])  # fmt: skip
        assert "verification failed" not in out.stdout + out.stderr
        report = fio_json(uri, "--rw=randrw", "--bs=4k", "--iodepth=16", "--size=8m",
                          "--verify=crc32c", "--do_verify=1")  # fmt: skip
        assert report["jobs"][0]["error"] == 0
        # another guest cannot remove it; its owner can, once
        _, other = new_guest(broker, "other")
        broker.json("DELETE", "/v1/self/nbd/swap", token=other, expect=404)
        broker.json("DELETE", "/v1/self/nbd/swap", token=token, expect=204)
        broker.json("DELETE", "/v1/self/nbd/swap", token=token, expect=404)
        assert not Path(made["socket"]).exists()
        assert persistent_pages(broker, guest_id) == 0  # the pool went with it


def test_without_nbd_dir_the_broker_serves_no_exports(tmp_path: Path) -> None:
    with UdsBrokerProcess(tmp_path / "broker", uds=tmp_path / "broker.sock") as broker:
        _, token = new_guest(broker, "vm")
        answer = broker.json("PUT", "/v1/self/nbd/swap", {"size": 4096}, token=token, expect=404)
        assert answer["error"]["code"] == "nbd_disabled"


def test_a_shed_moves_export_blocks_to_its_fallback_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMEM_PRESSURE_INTERVAL_S", "0.1")
    monkeypatch.setenv("TMEM_SHED_DEADLINE_S", "10")
    with UdsBrokerProcess(
        tmp_path / "broker", uds=tmp_path / "broker.sock", nbd_dir=tmp_path / "nbd",
        capacity="8MiB", durability="none",
    ) as broker:  # fmt: skip
        guest_id, token = new_guest(broker, "vm")
        uri = broker.json("PUT", "/v1/self/nbd/swap", {"size": 16 << 20}, token=token,
                          expect=201)["uri"]  # fmt: skip
        run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x5a 0 7600k"])
        pressure = wait_for_an_acked_shed(broker)
        assert pressure["sheds_acked"] >= 1, pressure
        assert 0 < persistent_pages(broker, guest_id) < 1900
        out = run(["qemu-io", "-f", "raw", uri, "-c", "read -P 0x5a 0 7600k"])
        assert "verification failed" not in out.stdout + out.stderr
