"""Real NBD clients (nbdcopy, qemu-io, fio with verify) against ``tmem-agent nbd --base``
exports over one image, sharing a cache at a real broker."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.base_support import base_agent, cache_guests, export_figures, new_cache_uuid
from tests.e2e.brokerproc import BrokerProcess, dies_with_us, free_port
from tests.e2e.nbd_support import fio_json, run

pytestmark = [
    pytest.mark.timeout(170),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("qemu-io", "nbdcopy", "fio")),
        reason="needs qemu-utils, libnbd-bin and fio (scripts/system-deps.sh)",
    ),
]

MIB = 1 << 20
UUID_TEXT = "6f1c2c1e-8d2b-4b8e-9a51-0e4c3f1d2a77"
BLOCK = 4096


def make_image(path: Path, mib: int = 16, seed: int = 5) -> bytes:
    """Random blocks, a zero MiB, and a block repeated (dedup at the broker sees it)."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(mib * MIB))
    data[MIB : 2 * MIB] = bytes(MIB)
    for i in range(8):
        data[(3 * MIB) + i * BLOCK : (3 * MIB) + (i + 1) * BLOCK] = data[:BLOCK]
    path.write_bytes(data)
    return bytes(data)


def copy_out(uri: str, out: Path) -> bytes:
    run(["nbdcopy", uri, str(out)])
    return out.read_bytes()


def qemu_io(uri: str, *commands: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "raw", uri]
    for command in commands:
        args += ["-c", command]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    if check:
        assert done.returncode == 0 and "fail" not in done.stdout.lower(), done.stdout + done.stderr
    return done


def test_two_exports_share_the_cache_and_keep_their_writes(tmp_path: Path) -> None:
    image = tmp_path / "base.raw"
    data = make_image(image)
    uuid = new_cache_uuid()
    with BrokerProcess(tmp_path / "broker") as broker:
        (g1, t1), (g2, t2) = cache_guests(broker, 2, uuid=uuid)
        with (
            base_agent(broker, (g1, t1), image, tmp_path / "vm1", uuid=uuid) as one,
            base_agent(broker, (g2, t2), image, tmp_path / "vm2", uuid=uuid) as two,
        ):
            assert copy_out(one.uri, tmp_path / "one.raw") == data
            # the first export's cache puts run in the background of its reads: wait for them
            assert broker_pages_settle(broker, len(data) // BLOCK)
            assert copy_out(two.uri, tmp_path / "two.raw") == data
            # a write in one export: it reads it back, the other still reads the image
            qemu_io(one.uri, "write -P 0x5a 4096 8192", "write -P 0x11 100 10")
            qemu_io(one.uri, "read -P 0x5a 4096 8192", "read -P 0x11 100 10")
            qemu_io(two.uri, "read -v 4096 16")
            assert copy_out(two.uri, tmp_path / "two-again.raw") == data
            mine = bytearray(data)
            mine[4096 : 4096 + 8192] = b"\x5a" * 8192
            mine[100:110] = b"\x11" * 10
            assert copy_out(one.uri, tmp_path / "one-again.raw") == bytes(mine)
        figures = export_figures(broker)
        stats = broker.json("GET", "/v1/stats")
    first, second = figures[g1], figures[g2]
    assert first["base_read_bytes"] >= len(data) - MIB  # it read (nearly) the whole image
    assert second["base_read_bytes"] <= first["base_read_bytes"] // 10
    assert second["cache_hits"] >= len(data) // BLOCK * 9 // 10
    assert first["overlay_blocks"] == 3  # blocks 0, 1 and 2
    assert second["overlay_blocks"] == 0
    assert stats["ephemeral_pages"] <= len(data) // BLOCK  # one copy, not one per export


def broker_pages_settle(broker: BrokerProcess, want: int, timeout: float = 30) -> bool:
    """Wait until the broker holds ``want`` ephemeral pages (the cache puts have landed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if broker.json("GET", "/v1/stats")["ephemeral_pages"] >= want:
            return True
        time.sleep(0.1)
    return False


def test_fio_verify_and_a_restart_keep_the_overlay(tmp_path: Path) -> None:
    image = tmp_path / "base.raw"
    data = make_image(image, mib=16)
    uuid = new_cache_uuid()
    with BrokerProcess(tmp_path / "broker") as broker:
        ((g1, t1),) = cache_guests(broker, 1, uuid=uuid)
        with base_agent(broker, (g1, t1), image, tmp_path / "vm1", uuid=uuid) as agent:
            report = fio_json(
                agent.uri,
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--offset=8M",
                "--size=4M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
            )
            assert report["jobs"][0]["error"] == 0
            written = copy_out(agent.uri, tmp_path / "after-fio.raw")
        assert written[: 8 * MIB] == data[: 8 * MIB]  # untouched: still the image
        assert written[12 * MIB :] == data[12 * MIB :]
        assert written[8 * MIB : 12 * MIB] != data[8 * MIB : 12 * MIB]
        # a restarted export over the same overlay is the same disk
        with base_agent(broker, (g1, t1), image, tmp_path / "vm1", uuid=uuid) as again:
            assert copy_out(again.uri, tmp_path / "after-restart.raw") == written


def test_a_changed_base_is_refused_with_eio(tmp_path: Path) -> None:
    image = tmp_path / "base.raw"
    make_image(image, mib=4)
    uuid = new_cache_uuid()
    with BrokerProcess(tmp_path / "broker") as broker:
        guest = cache_guests(broker, 1, uuid=uuid)[0]
        agent = base_agent(broker, guest, image, tmp_path / "vm1", uuid=uuid)
        with agent:
            qemu_io(agent.uri, "read 0 64k")
            with image.open("r+b") as f:
                f.seek(2 * MIB)
                f.write(b"another version")
                f.flush()
                os.fsync(f.fileno())
            os.utime(image, ns=(0, 0))  # a new mtime, whatever the clock's granularity
            done = qemu_io(agent.uri, "read 2M 4k", check=False)
            assert done.returncode != 0 or "error" in (done.stdout + done.stderr).lower()
            assert "Input/output error" in done.stdout + done.stderr
        assert "changed under the export" in agent.log_tail(20_000)


def test_bad_flags_are_refused(tmp_path: Path) -> None:
    image = tmp_path / "base.raw"
    make_image(image, mib=1)
    agent = [str(Path(sys.executable).parent / "tmem-agent"), "nbd", "--listen", "127.0.0.1:1"]
    cases = [
        (
            [
                "--broker",
                "http://x",
                "--token",
                "t",
                "--base",
                str(image),
                "--overlay",
                "o",
                "--cache-pool",
                "not-a-uuid",
            ],
            "UUID",
        ),
        (["--memory", "--cache-pool", UUID_TEXT, "--base", str(image)], "--memory"),
        (["--broker", "http://x", "--token", "t", "--base", str(image)], "--overlay"),
        (["--memory", "--base", str(tmp_path / "missing.raw")], "--base"),
        (["--memory", "--size", "1MiB", "--overlay", "x"], "--base"),
        (["--memory", "--base", str(image), "--size", "4KiB"], "smaller than the base"),
    ]
    for args, message in cases:
        done = subprocess.run([*agent, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert message in done.stderr, (args, done.stderr)


def test_equal_blocks_of_two_images_are_stored_once(tmp_path: Path) -> None:
    first = tmp_path / "first.raw"
    data = make_image(first, mib=4)
    second = tmp_path / "second.raw"
    changed = bytearray(data)
    changed[:BLOCK] = b"\x77" * BLOCK  # another image: one block differs, another cache tag
    second.write_bytes(changed)
    uuid = new_cache_uuid()
    blocks = len(data) // BLOCK
    with BrokerProcess(tmp_path / "broker") as broker:
        g1, g2 = cache_guests(broker, 2, uuid=uuid)
        with (
            base_agent(broker, g1, first, tmp_path / "vm1", uuid=uuid) as one,
            base_agent(broker, g2, second, tmp_path / "vm2", uuid=uuid) as two,
        ):
            assert copy_out(one.uri, tmp_path / "one.raw") == data
            assert broker_pages_settle(broker, blocks)
            before = broker.json("GET", "/v1/stats")
            assert copy_out(two.uri, tmp_path / "two.raw") == bytes(changed)
            assert broker_pages_settle(broker, 2 * blocks)
            after = broker.json("GET", "/v1/stats")
        figures = export_figures(broker)
    # the second image was read from its own file (its handles are its own) ...
    assert figures[g2[0]]["base_reads"] == blocks
    assert after["ephemeral_pages"] == 2 * blocks
    # ... and its blocks equal to the first image's were stored once: one new content only
    assert after["unique_pages"] == before["unique_pages"] + 1


def test_a_broker_crash_empties_the_cache_and_nothing_else(tmp_path: Path) -> None:
    image = tmp_path / "base.raw"
    data = make_image(image, mib=4)
    blocks = len(data) // BLOCK
    uuid = new_cache_uuid()
    broker = BrokerProcess(tmp_path / "broker")
    broker.start()
    try:
        guest = cache_guests(broker, 1, uuid=uuid)[0]
        with base_agent(broker, guest, image, tmp_path / "vm1", uuid=uuid) as agent:
            qemu_io(agent.uri, "write -P 0x5a 1M 64k", "flush")
            mine = bytearray(data)
            mine[MIB : MIB + 65536] = b"\x5a" * 65536
            assert copy_out(agent.uri, tmp_path / "before.raw") == bytes(mine)
            assert broker_pages_settle(broker, blocks - 16)
            broker.kill()  # SIGKILL: the cache's pages go, the overlay's must not
            broker.start()  # same port, same data dir
            assert broker.json("GET", "/v1/stats")["ephemeral_pages"] == 0
            assert copy_out(agent.uri, tmp_path / "after.raw") == bytes(mine)
        figures = export_figures(broker)[guest[0]]
    finally:
        broker.stop()
    # the unwritten blocks were read from the image twice: the cache was empty the second time
    assert figures["base_reads"] >= 2 * (blocks - 16)
    assert figures["overlay_blocks"] == 16


def test_the_stop_line_has_the_figures(tmp_path: Path) -> None:
    image = tmp_path / "base.raw"
    make_image(image, mib=1)
    port = free_port()
    agent = [str(Path(sys.executable).parent / "tmem-agent"), "nbd", "--memory"]
    agent += ["--base", str(image), "--listen", f"127.0.0.1:{port}"]
    with subprocess.Popen(
        dies_with_us(agent), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        assert "nbd: serving" in proc.stdout.readline()
        qemu_io(f"nbd://127.0.0.1:{port}", "read 0 64k", "write -P 1 0 4k")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    figures = dict(word.split("=") for word in out.split("stopped; ")[1].split())
    assert int(figures["base_reads"]) >= 16  # the 64 KiB read (and whatever qemu-io probes)
    assert int(figures["base_read_bytes"]) == int(figures["base_reads"]) * BLOCK
    assert figures["overlay_blocks"] == "1"
    assert "cache_hits" in figures and "cache_misses" in figures
