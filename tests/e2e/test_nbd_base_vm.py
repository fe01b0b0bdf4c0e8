"""Real kernels boot over ``tmem-agent nbd --base`` exports of one ext4 image and share its
clean blocks through the broker: every VM digests the whole tree; the later VMs read mostly
from the shared cache; one VM's writes are invisible to the others; a tiny broker (constant
eviction) changes how much is read from the image, never what."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_agent.nbd.backend import BLOCK_SIZE
from tests.e2e.base_support import base_agent, cache_guests, export_figures, new_cache_uuid
from tests.e2e.base_vm_support import (
    VmReport,
    build_reader_initramfs,
    make_ext4,
    make_tree,
    start_vm,
)
from tests.e2e.brokerproc import BrokerProcess
from tests.e2e.nbd_support import NbdAgent
from tests.e2e.vm_support import accelerators

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("qemu-system-x86_64", "busybox", "cpio", "mkfs.ext4")),
        reason="needs qemu-system-x86, busybox-static, cpio, e2fsprogs (scripts/system-deps.sh)",
    ),
]

VM_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], Path, Path]:
    """(ext4 image, its tree's digests, kernel, initramfs), built once for the module."""
    work = tmp_path_factory.mktemp("base-vm")
    tree = make_tree(work / "tree")
    make_ext4(work / "base.ext4", work / "tree")
    kernel, initramfs = build_reader_initramfs(work / "vm")
    return work / "base.ext4", tree, kernel, initramfs


def run_vms(
    kernel: Path, initramfs: Path, agents: list[tuple[int, NbdAgent]], accel: str, logs: Path
) -> dict[int, VmReport]:
    """Boot one VM per (vm id, agent) at once; wait for all to power off; their reports."""
    procs = {
        vm_id: start_vm(
            kernel, initramfs, agent.uri, vm_id=vm_id, accel=accel, console=logs / f"vm{vm_id}.log"
        )
        for vm_id, agent in agents
    }
    deadline = time.monotonic() + VM_TIMEOUT_S
    try:
        for proc in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {
        vm_id: VmReport.parse((logs / f"vm{vm_id}.log").read_text(errors="replace"))
        for vm_id in procs
    }


def boot(
    kernel: Path, initramfs: Path, agents: list[tuple[int, NbdAgent]], logs: Path
) -> tuple[str, dict[int, VmReport]]:
    """:func:`run_vms` with the first accelerator that mounts the disks (KVM can be present
    yet unusable under nested virtualisation: qemu then fails before reading anything)."""
    reports: dict[int, VmReport] = {}
    for accel in accelerators():
        reports = run_vms(kernel, initramfs, agents, accel, logs)
        if any("INIT: mounted" in r.console for r in reports.values()):
            return accel, reports
    return "none", reports


@contextlib.contextmanager
def agents(
    broker: BrokerProcess, image: Path, guests: list[tuple[int, str]], tmp: Path, uuid: str
) -> Iterator[list[NbdAgent]]:
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(base_agent(broker, g, image, tmp / f"vm-{g[0]}", uuid=uuid))
            for g in guests
        ]


def tree_bytes(image: Path) -> int:
    """The bytes of the files in the tree the image was made from."""
    return sum(p.stat().st_size for p in (image.parent / "tree").rglob("*") if p.is_file())


def check(report: VmReport, tree: dict[str, str]) -> None:
    tail = report.console[-3000:]
    assert report.done, tail
    assert report.files == len(tree), tail
    assert not report.bad_files(tree), (report.bad_files(tree), tail)
    assert report.wrote, tail


def test_vms_share_the_image_through_the_broker(
    tmp_path: Path, image: tuple[Path, dict[str, str], Path, Path]
) -> None:
    base, tree, kernel, initramfs = image
    uuid = new_cache_uuid()
    with BrokerProcess(tmp_path / "broker") as broker:
        guests = cache_guests(broker, 3, uuid=uuid)
        with agents(broker, base, guests, tmp_path, uuid) as (one, two, three):
            accel, booted = boot(kernel, initramfs, [(1, one)], tmp_path)
            first = booted[1]
            check(first, tree)
            # VMs 2 and 3 at once, on a cache the first one filled
            later = run_vms(kernel, initramfs, [(2, two), (3, three)], accel, tmp_path)
            # while the exports still run (the shared pool goes with its last member)
            stats = broker.json("GET", "/v1/stats")
        figures = export_figures(broker)
    for report in later.values():
        check(report, tree)
        assert report.seen == [], report.seen  # VM 1's mark, and each other's, are theirs
    f1, f2, f3 = (figures[g[0]] for g in guests)
    ratio = f2["base_read_bytes"] / f1["base_read_bytes"]
    print(
        f"accel={accel} base bytes vm1={f1['base_read_bytes']} vm2={f2['base_read_bytes']} "
        f"vm3={f3['base_read_bytes']} ratio={ratio:.3f} hits vm2={f2['cache_hits']} "
        f"read s vm1={first.read_s:.2f} vm2={later[2].read_s:.2f} vm3={later[3].read_s:.2f} "
        f"ephemeral_pages={stats['ephemeral_pages']}"
    )
    assert f1["base_read_bytes"] >= tree_bytes(base)  # every file, from the image
    assert f2["base_read_bytes"] <= f1["base_read_bytes"] // 5
    assert f3["base_read_bytes"] <= f1["base_read_bytes"] // 5
    assert f2["cache_hits"] > 2000 and f3["cache_hits"] > 2000
    for f in (f1, f2, f3):
        assert f["overlay_blocks"] > 0  # the mount and the mark file: each VM its own
    # one copy at the broker: a block three VMs read is one cache page, put by the VM that
    # read it from the image (nothing was evicted at this capacity)
    base_blocks = sum(f["base_reads"] for f in (f1, f2, f3))
    assert f1["base_reads"] * 9 // 10 <= stats["ephemeral_pages"] <= base_blocks
    assert stats["evictions"] == 0


def test_a_tiny_broker_evicts_all_the_time_and_every_file_still_verifies(
    tmp_path: Path, image: tuple[Path, dict[str, str], Path, Path]
) -> None:
    base, tree, kernel, initramfs = image
    uuid = new_cache_uuid()
    with BrokerProcess(tmp_path / "broker", capacity="1MiB") as broker:
        guests = cache_guests(broker, 2, uuid=uuid)
        with agents(broker, base, guests, tmp_path, uuid) as (one, two):
            _, reports = boot(kernel, initramfs, [(1, one), (2, two)], tmp_path)
        figures = export_figures(broker)
        stats = broker.json("GET", "/v1/stats")
    for report in reports.values():
        check(report, tree)
    print(f"evictions={stats['evictions']} figures={figures}")
    assert stats["evictions"] > 1000  # the cache was dropped over and over
    # Every byte of the tree reached each VM from the image or from the shared cache. Which
    # one depends on timing: the two VMs read the same files at once, so a block one of them
    # put may still be there when the other asks (a hit) despite the constant evictions.
    for guest_id, _ in guests:
        f = figures[guest_id]
        assert f["base_read_bytes"] + f["cache_hits"] * BLOCK_SIZE >= tree_bytes(base)
    assert sum(figures[g]["base_read_bytes"] for g, _ in guests) >= tree_bytes(base)
