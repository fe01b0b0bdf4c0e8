"""What the shared cache saves: VMs booted one after another over base-image exports of one
ext4 image, at a real broker.

Builds, in one run: a tree of files, an ext4 image of it (``mkfs.ext4 -d``), a broker, and one
guest and one ``tmem-agent nbd --base IMAGE --cache-pool UUID --overlay ...`` per VM. Each VM
(Debian's cloud kernel under qemu, TCG unless ``TMEM_VM_ACCEL`` says otherwise) mounts the disk and digests every
file. The VMs run one at a time, so the first fills the cache and each later one finds it
warm; before each, the image's pages are dropped from the host's page cache
(``posix_fadvise(DONTNEED)``, this file only), so what a VM reads from the image is read from
the disk. A last VM without ``--cache-pool`` is the no-cache baseline.

Run: ``.venv/bin/python bench/vmcache_bench.py [--files 150] [--image-mib 64] [--vms 3]
[--path uds|tcp]`` (agents reach the broker on its Unix socket by default, the co-located
setup ``docs/nbd.md`` recommends).
Prints, per VM: bytes read from the image, cache hits, the tree's read time inside the VM and
the VM's whole run (boot to power-off), and the ratios to VM 1. Not a test: it never fails on
a time; on a shared 2-core machine times move by tens of percent between runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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
from tests.e2e.brokerproc import BrokerProcess  # noqa: E402
from tests.e2e.nbd_support import UdsBrokerProcess  # noqa: E402


def drop_from_page_cache(path: Path) -> None:
    """Forget the file's clean pages, so the next reads of it go to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=150, help="files in the tree")
    parser.add_argument("--image-mib", type=int, default=64, help="ext4 image size")
    parser.add_argument("--vms", type=int, default=3, help="VMs sharing the cache (>= 2)")
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
        uuid = new_cache_uuid()
        rows: list[tuple[str, int, dict[str, int], VmReport, float]] = []
        # TCG unless told otherwise (TMEM_VM_ACCEL=kvm): KVM may be present yet unusable
        accel = os.environ.get("TMEM_VM_ACCEL", "tcg")
        broker_proc = (
            UdsBrokerProcess(tmp / "broker", uds=tmp / "broker.sock")
            if args.path == "uds"
            else BrokerProcess(tmp / "broker")
        )
        with broker_proc as broker:
            url = broker.unix_url if isinstance(broker, UdsBrokerProcess) else broker.url
            guests = cache_guests(broker, args.vms + 1, uuid=uuid)
            for i, guest in enumerate(guests):
                cached = i < args.vms
                label = f"vm{i + 1}" if cached else "no cache"
                agent = base_agent(
                    broker,
                    guest,
                    image,
                    tmp / f"export-{i}",
                    uuid=uuid if cached else None,
                    url=url,
                )
                with agent:
                    drop_from_page_cache(image)
                    console = tmp / f"console-{i}.log"
                    started = time.monotonic()
                    proc = start_vm(
                        kernel, initramfs, agent.uri, vm_id=i + 1, accel=accel, console=console
                    )
                    proc.wait(timeout=900)
                    wall = time.monotonic() - started
                    report = VmReport.parse(console.read_text(errors="replace"))
                bad = report.bad_files(tree)
                if bad or not report.done:
                    kept = Path(tempfile.gettempdir()) / f"vmcache-bench-{label}.log"
                    kept.write_text(report.console)
                    sys.exit(f"{label}: {len(bad)} files did not verify; console in {kept}")
                figures = export_figures(broker)[guest[0]]
                rows.append((label, guest[0], figures, report, wall))

        print(
            f"tree: {len(tree)} files, {tree_bytes / 2**20:.1f} MiB; image {args.image_mib} MiB;"
            f" accel {accel}; broker over {args.path}; load {os.getloadavg()[0]:.1f}"
        )
        head = f"{'vm':<9} {'image MiB read':>14} {'cache hits':>10} {'tree read s':>11}"
        print(head + f" {'VM run s':>8} {'bytes / vm1':>11} {'tree s / vm1':>12}")
        first = rows[0]
        for label, _, figures, report, wall in rows:
            read = figures["base_read_bytes"]
            print(
                f"{label:<9} {read / 2**20:>14.2f} {figures['cache_hits']:>10}"
                f" {report.read_s:>11.2f} {wall:>8.1f}"
                f" {read / first[2]['base_read_bytes']:>11.3f}"
                f" {report.read_s / first[3].read_s:>12.2f}"
            )


if __name__ == "__main__":
    main()
