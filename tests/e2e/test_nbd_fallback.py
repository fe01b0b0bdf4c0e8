"""A broker that declines puts (a tiny quota, a frozen guest) still backs a correct device: the
declined blocks go to the agent's fallback file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.e2e.brokerproc import BrokerProcess
from tests.e2e.nbd_support import NbdAgent, fio_json, new_guest, persistent_pages, run

pytestmark = [
    pytest.mark.timeout(170),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("qemu-io", "fio")),
        reason="needs qemu-utils and fio (scripts/system-deps.sh)",
    ),
]

CAP = 256  # pages: 1 MiB of a 64 MiB export


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_tiny_quota_fio_verify_through_the_fallback_file(tmp_path: Path) -> None:
    with BrokerProcess(tmp_path / "broker") as broker:
        guest_id, token = new_guest(broker, "tiny", cap_pages=CAP)
        with NbdAgent.for_broker(broker, token, tmp_path) as agent:
            report = fio_json(
                agent.uri,
                "--rw=randwrite",  # every block once, then fio reads all of them back
                "--bs=4k",
                "--iodepth=32",
                "--size=16m",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--do_verify=1",
            )
            job = report["jobs"][0]
            assert job["error"] == 0
            assert job["write"]["total_ios"] == 4096
            assert job["read"]["total_ios"] == 4096  # the verify pass
            held = persistent_pages(broker, guest_id)
            assert 0 < held <= CAP
            # blocks beyond the quota (16 MiB of writes, 1 MiB of quota) sit in the file
            assert allocated(tmp_path / "fallback.img") >= 14 * 1024 * 1024


def test_frozen_guest_writes_go_to_the_file_and_read_back(tmp_path: Path) -> None:
    with BrokerProcess(tmp_path / "broker") as broker:
        guest_id, token = new_guest(broker, "frozen")
        with NbdAgent.for_broker(broker, token, tmp_path) as agent:
            uri = agent.uri
            run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x61 0 256k"])
            assert persistent_pages(broker, guest_id) == 64
            broker.json("POST", f"/v1/guests/{guest_id}/freeze", expect=204)
            # overwrites are declined (frozen); the broker drops the old copies, the file
            # takes the new data; unaligned writes read-modify-write across both places
            run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x62 64k 64k"])
            run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x63 200000 1000"])
            assert persistent_pages(broker, guest_id) < 64
            out = run(
                [
                    "qemu-io",
                    "-f",
                    "raw",
                    uri,
                    "-c",
                    "read -P 0x61 0 64k",
                    "-c",
                    "read -P 0x62 64k 64k",
                    "-c",
                    "read -P 0x61 128k 68928",
                    "-c",
                    "read -P 0x63 200000 1000",
                    "-c",
                    "read -P 0x61 201000 61144",
                ]
            ).stdout
            assert "fail" not in out.lower(), out
            broker.json("POST", f"/v1/guests/{guest_id}/thaw", expect=204)
            # after a thaw, rewritten blocks move back to the broker
            run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x64 64k 64k", "-c", "flush"])
            out = run(["qemu-io", "-f", "raw", uri, "-c", "read -P 0x64 64k 64k"]).stdout
            assert "fail" not in out.lower(), out
            assert persistent_pages(broker, guest_id) >= 16
