"""The broker's own exports outlive the broker: after a stop (SIGTERM) or a crash (SIGKILL) the
broker serves each export again on the same socket, over the same pool and fallback file, and
every block reads back as written — at the broker, in the file, zeroed; deleting the guest
ends its exports for good."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.e2e.nbd_support import UdsBrokerProcess, new_guest, persistent_pages, run

pytestmark = [
    pytest.mark.timeout(170),
    pytest.mark.skipif(not shutil.which("qemu-io"), reason="needs qemu-utils"),
]

CAP = 128  # the guest's quota: the first 512 KiB of writes fit, the rest go to the file


def qemu_io(uri: str, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw", uri]
    for command in commands:
        args += ["-c", command]
    done = run(args)
    out = done.stdout + done.stderr
    assert "verification failed" not in out and "error" not in out.lower(), out
    return out


# what the export holds after the writes below, as (offset, length, byte)
IMAGE = [
    (0, 64 << 10, 0x3C),  # at the broker
    (64 << 10, 64 << 10, 0),  # at the broker, then zeroed (flushed there)
    (128 << 10, 384 << 10, 0x3C),  # at the broker
    (512 << 10, 64 << 10, 0),  # in the file, then zeroed (punched)
    (576 << 10, 192 << 10, 0x3C),  # in the file
    (768 << 10, 32 << 10, 0),  # in the file, then at the broker (quota freed), then zeroed
    (800 << 10, 32 << 10, 0x11),  # in the file, then at the broker
    (832 << 10, 192 << 10, 0x3C),  # in the file
    (2 << 20, 4096, 0x7E),  # in the file
    (4 << 20, 1 << 20, 0),  # never written
]


def _write_image(uri: str) -> None:
    qemu_io(uri, "write -P 0x3c 0 1m", "write -P 0x7e 2m 4k", "flush")
    qemu_io(uri, "write -z 64k 64k", "write -z 512k 64k", "flush")
    qemu_io(uri, "write -P 0x11 768k 64k", "write -z 768k 32k", "flush")


def _read_image(uri: str, image: list[tuple[int, int, int]]) -> None:
    qemu_io(uri, *(f"read -P 0x{byte:02x} {offset} {length}" for offset, length, byte in image))


def test_an_export_survives_a_stop_and_a_crash_of_the_broker(tmp_path: Path) -> None:
    nbd_dir = tmp_path / "nbd"
    broker = UdsBrokerProcess(
        tmp_path / "broker", uds=tmp_path / "broker.sock", nbd_dir=nbd_dir, durability="sync"
    )
    broker.start()
    try:
        guest_id, token = new_guest(broker, "vm", cap_pages=CAP)
        made = broker.json("PUT", "/v1/self/nbd/swap", {"size": 8 << 20}, token=token, expect=201)
        uri, sock = made["uri"], Path(made["socket"])
        _write_image(uri)
        _read_image(uri, IMAGE)
        held = persistent_pages(broker, guest_id)
        assert 0 < held <= CAP  # both places hold blocks
        fallback = nbd_dir / f"g{guest_id}-swap.fallback"
        assert fallback.stat().st_blocks > 0

        broker.stop()  # SIGTERM: the export stops serving, its pool and file stay
        assert not sock.exists() and fallback.exists()
        broker.start()
        assert sock.is_socket()
        assert persistent_pages(broker, guest_id) == held
        _read_image(uri, IMAGE)
        # the name is still taken, by the same export
        broker.json("PUT", "/v1/self/nbd/swap", {"size": 4096}, token=token, expect=409)

        # more writes, then a crash: no shutdown code runs
        qemu_io(uri, "write -P 0x22 3m 64k", "write -z 800k 4k", "flush")
        image = [*IMAGE[:6], (800 << 10, 4096, 0), (804 << 10, 28 << 10, 0x11), *IMAGE[7:],
                 (3 << 20, 64 << 10, 0x22)]  # fmt: skip
        _read_image(uri, image)
        broker.kill()
        broker.start()
        _read_image(uri, image)

        # DELETE ends it: pool, socket, file and row; a restart does not bring it back
        broker.json("DELETE", "/v1/self/nbd/swap", token=token, expect=204)
        assert persistent_pages(broker, guest_id) == 0
        assert not sock.exists() and not fallback.exists()
        broker.stop()
        broker.start()
        assert not sock.exists()
        broker.json("DELETE", "/v1/self/nbd/swap", token=token, expect=404)
        # a new export of that name starts empty
        again = broker.json("PUT", "/v1/self/nbd/swap", {"size": 8 << 20}, token=token,
                            expect=201)  # fmt: skip
        _read_image(again["uri"], [(0, 8 << 20, 0)])
    finally:
        broker.stop()


def test_deleting_the_guest_ends_its_exports(tmp_path: Path) -> None:
    nbd_dir = tmp_path / "nbd"
    broker = UdsBrokerProcess(
        tmp_path / "broker", uds=tmp_path / "broker.sock", nbd_dir=nbd_dir, durability="sync"
    )
    broker.start()
    try:
        guest_id, token = new_guest(broker, "vm", cap_pages=16)
        other_id, other = new_guest(broker, "other")
        made = broker.json("PUT", "/v1/self/nbd/swap", {"size": 1 << 20}, token=token, expect=201)
        kept = broker.json("PUT", "/v1/self/nbd/swap", {"size": 1 << 20}, token=other, expect=201)
        qemu_io(made["uri"], "write -P 0x5a 0 256k", "flush")  # broker and file both
        qemu_io(kept["uri"], "write -P 0x6b 0 256k", "flush")
        broker.json("DELETE", f"/v1/guests/{guest_id}", expect=204)
        assert not Path(made["socket"]).exists()
        assert not (nbd_dir / f"g{guest_id}-swap.fallback").exists()
        # nothing serves it any more, so no write can land in a file nobody reads
        refused = run_refused(made["uri"])
        assert refused
        broker.kill()
        broker.start()
        assert not Path(made["socket"]).exists()
        _read_image(kept["uri"], [(0, 256 << 10, 0x6B), (256 << 10, 768 << 10, 0)])
        assert persistent_pages(broker, other_id) == 64
    finally:
        broker.stop()


def run_refused(uri: str) -> bool:
    """Whether qemu-io fails to open ``uri`` (nothing listens)."""
    import subprocess

    done = subprocess.run(["qemu-io", "-f", "raw", uri, "-c", "read 0 4k"],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    return done.returncode != 0


def test_without_a_journal_a_restart_drops_the_export(tmp_path: Path) -> None:
    """``--durability none`` keeps no page across a restart: no device beats one whose broker
    blocks read as zeros."""
    nbd_dir = tmp_path / "nbd"
    broker = UdsBrokerProcess(
        tmp_path / "broker", uds=tmp_path / "broker.sock", nbd_dir=nbd_dir, durability="none"
    )
    broker.start()
    try:
        guest_id, token = new_guest(broker, "vm")
        made = broker.json("PUT", "/v1/self/nbd/swap", {"size": 1 << 20}, token=token, expect=201)
        qemu_io(made["uri"], "write -P 0x5a 0 64k", "flush")
        broker.stop()
        broker.start()
        assert not Path(made["socket"]).exists()
        assert not (nbd_dir / f"g{guest_id}-swap.fallback").exists()
        assert broker.json("GET", f"/v1/guests/{guest_id}")["pools"] == []
        broker.json("PUT", "/v1/self/nbd/swap", {"size": 4096}, token=token, expect=201)
    finally:
        broker.stop()
