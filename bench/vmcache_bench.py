"""What the shared cache saves: VMs booted one after another over base-image exports of one
ext4 image, at a real broker.

Builds, in one run: a tree of files, an ext4 image of it (``mkfs.ext4 -d``), a broker, and one
guest and one ``tmem-agent nbd --base IMAGE --cache-pool UUID --overlay ...`` per VM. Each VM
(Debian's cloud kernel under qemu, TCG unless ``TMEM_VM_ACCEL`` says otherwise) mounts the
disk, reads every file once (timed), then digests them all. The VMs of a round run one at a
time, so the first fills the round's new cache and the later ones find it warm; before each
VM, the image's pages are dropped from the host's page cache (``posix_fadvise(DONTNEED)``, this
file only), so what a VM reads from the image comes from the disk. A last VM per round
without ``--cache-pool`` is the no-cache baseline.

Run: ``.venv/bin/python bench/vmcache_bench.py [--files 150] [--image-mib 64] [--vms 2]
[--rounds 3] [--path uds|tcp]`` (agents reach the broker on its Unix socket by default, the
co-located setup ``docs/nbd.md`` recommends). Prints, per VM: bytes read from the image, cache
hits, the tree's read time inside the VM and the VM's whole run (boot to power-off), the
ratios to the round's first VM; then VM 2's median ratios over the rounds (to VM 1, and
its read time to the no-cache VM's). Not a test: it
never fails on a time; on a shared 2-core machine times move by tens of percent between runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.procs import BrokerProcess  # noqa: E402
from tests.e2e.base_support import (  # noqa: E402
    base_agent,
    cache_guests,
    export_figures,
    new_cache_uuid,
)
from tests.e2e.base_vm_support import (  # noqa: E402
    VmReport,
    build_reader_initramfs,
    make_ext4,
    make_tree,
    start_vm,
)
from tests.e2e.nbd_support import UdsBrokerProcess  # noqa: E402


def drop_from_page_cache(path: Path) -> None:
    """Forget the file's clean pages, so the next reads of it go to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


Row = tuple[str, dict[str, int], VmReport, float]


@dataclass(frozen=True)
class Setup:
    """What every VM of the run shares."""

    tmp: Path
    image: Path
    url: str
    kernel: Path
    initramfs: Path
    accel: str
    tree: dict[str, str]


def run_vm(
    broker: BrokerProcess,
    guest: tuple[int, str],
    *,
    label: str,
    vm_id: int,
    uuid: str | None,
    setup: Setup,
) -> Row:
    """One VM over a fresh export, the image cold in the host's page cache; its table row."""
    workdir = setup.tmp / f"export-{vm_id}"
    agent = base_agent(broker, guest, setup.image, workdir, uuid=uuid, url=setup.url)
    with agent:
        drop_from_page_cache(setup.image)
        console = setup.tmp / f"console-{vm_id}.log"
        started = time.monotonic()
        proc = start_vm(
            setup.kernel,
            setup.initramfs,
            agent.uri,
            vm_id=vm_id,
            accel=setup.accel,
            console=console,
        )
        proc.wait(timeout=900)
        wall = time.monotonic() - started
        report = VmReport.parse(console.read_text(errors="replace"))
    bad = report.bad_files(setup.tree)
    if bad or not report.done:
        kept = Path(tempfile.gettempdir()) / f"vmcache-bench-{label}.log"
        kept.write_text(report.console)
        sys.exit(f"{label}: {len(bad)} files did not verify; console in {kept}")
    return label, export_figures(broker)[guest[0]], report, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=150, help="files in the tree")
    parser.add_argument("--image-mib", type=int, default=64, help="ext4 image size")
    parser.add_argument("--vms", type=int, default=2, help="VMs sharing a cache per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each with a new cache")
    parser.add_argument(
        "--path", choices=("uds", "tcp"), default="uds", help="how agents reach the broker"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vmcache-bench-") as tmp_name:
        tmp = Path(tmp_name)
        tree = make_tree(tmp / "tree", files=args.files)
        tree_bytes = sum(p.stat().st_size for p in (tmp / "tree").rglob("*") if p.is_file())
        image = tmp / "base.ext4"
        make_ext4(image, tmp / "tree", mib=args.image_mib)
        kernel, initramfs = build_reader_initramfs(tmp / "vm")
        # TCG unless told otherwise (TMEM_VM_ACCEL=kvm): KVM may be present yet unusable
        accel = os.environ.get("TMEM_VM_ACCEL", "tcg")
        broker_proc = (
            UdsBrokerProcess(tmp / "broker", uds=tmp / "broker.sock")
            if args.path == "uds"
            else BrokerProcess(tmp / "broker")
        )
        rounds: list[list[Row]] = []
        loads: list[float] = []
        with broker_proc as broker:
            url = broker.unix_url if isinstance(broker, UdsBrokerProcess) else broker.url
            setup = Setup(tmp, image, url, kernel, initramfs, accel, tree)
            vm_id = 0
            for r in range(args.rounds):
                uuid = new_cache_uuid()  # a cold cache each round
                guests = cache_guests(broker, args.vms + 1, uuid=uuid, prefix=f"r{r}")
                rows: list[Row] = []
                for i, guest in enumerate(guests):
                    cached = i < args.vms
                    vm_id += 1
                    rows.append(
                        run_vm(
                            broker,
                            guest,
                            label=f"vm{i + 1}" if cached else "no cache",
                            vm_id=vm_id,
                            uuid=uuid if cached else None,
                            setup=setup,
                        )
                    )
                    loads.append(os.getloadavg()[0])
                rounds.append(rows)

        print(
            f"tree: {len(tree)} files, {tree_bytes / 2**20:.1f} MiB; image {args.image_mib} MiB;"
            f" accel {accel}; broker over {args.path};"
            f" load {min(loads):.1f}-{max(loads):.1f}"
        )
        head = f"{'round':<5} {'vm':<9} {'image MiB read':>14} {'cache hits':>10}"
        print(
            head + f" {'tree read s':>11} {'VM run s':>8} {'bytes / vm1':>11} {'read s / vm1':>12}"
        )
        byte_ratios: list[float] = []
        time_ratios: list[float] = []
        baseline_ratios: list[float] = []
        for r, rows in enumerate(rounds, 1):
            first, baseline = rows[0], rows[-1]
            for label, figures, report, wall in rows:
                read = figures["base_read_bytes"]
                byte_ratio = read / first[1]["base_read_bytes"]
                time_ratio = report.read_s / first[2].read_s
                if label == "vm2":
                    byte_ratios.append(byte_ratio)
                    time_ratios.append(time_ratio)
                    baseline_ratios.append(report.read_s / baseline[2].read_s)
                print(
                    f"{r:<5} {label:<9} {read / 2**20:>14.2f} {figures['cache_hits']:>10}"
                    f" {report.read_s:>11.2f} {wall:>8.1f} {byte_ratio:>11.3f} {time_ratio:>12.2f}"
                )
        print(
            f"vm2 / vm1, median of {len(rounds)} rounds: image bytes"
            f" {statistics.median(byte_ratios):.3f}, tree read time"
            f" {statistics.median(time_ratios):.2f}; vm2 / no cache, tree read time"
            f" {statistics.median(baseline_ratios):.2f}"
        )


if __name__ == "__main__":
    main()
