"""Real kernels booting over base-image exports: a known tree of files in an ext4 image, and
an initramfs whose ``/init`` mounts the export, digests every file and reports.

::

    tree = make_tree(tmp / "tree")                         # {"./d0/f3": sha256 hex, ...}
    make_ext4(tmp / "base.ext4", tmp / "tree", mib=40)
    kernel, initramfs = build_reader_initramfs(tmp / "vm")
    proc = start_vm(kernel, initramfs, agent.uri, vm_id=1)  # runs to power-off
    report = VmReport.parse(console)                       # digests, read time, marks

Debian's cloud kernel has ext4 built in (``CONFIG_EXT4_FS=y``, with jbd2, mbcache, crc16 and
crc32c): the initramfs needs only the virtio modules ``scripts/build-vm.sh`` already packs.
Each VM mounts the disk read-write (mounting itself writes the superblock: those writes go to
its overlay), looks for other VMs' mark files, then writes its own, ``mark-ID``.
"""

from __future__ import annotations

import hashlib
import random
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.brokerproc import dies_with_us
from tests.e2e.vm_support import pack_initramfs, qemu_command

APPLETS = ("find", "sort", "sha256sum", "wc", "sed", "cut", "umount", "mkdir", "sync", "cat")

INIT = """#!/bin/sh
# /init of the base-image test VM: mount the export's ext4, digest every file, mark, power off.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m.ko || echo "INIT: insmod $m failed"; done
id=$(sed -n 's/.*tmem_vm=\\([0-9]*\\).*/\\1/p' /proc/cmdline)
i=0
# a busy host slows TCG down a lot: give the disk a minute to appear
while [ ! -b /dev/vda ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vda ] || echo "INIT: no disk"
mkdir -p /mnt
mount -t ext4 /dev/vda /mnt && echo "INIT: mounted" || echo "INIT: mount failed"
cd /mnt
t0=$(cut -d' ' -f1 /proc/uptime)
find . -path ./lost+found -prune -o -type f ! -name 'mark-*' -print | sort > /tmp/files
# the timed part is the disk's: read every file once; digesting then works from the page cache
while read -r f; do cat "$f" > /dev/null; done < /tmp/files
t1=$(cut -d' ' -f1 /proc/uptime)
while read -r f; do sha256sum "$f"; done < /tmp/files > /tmp/sums
echo "TREE: $(wc -l < /tmp/sums) files $t0 $t1"
sed 's/^/SUM: /' /tmp/sums
for m in mark-*; do [ -e "$m" ] && echo "MARK: seen $m $(cat "$m")"; done
echo "written by vm $id" > "mark-$id" && sync && echo "MARK: wrote mark-$id"
cd /
umount /mnt && echo "INIT: unmounted"
echo "INIT: done"
poweroff -f
"""


def make_tree(root: Path, *, files: int = 48, seed: int = 20) -> dict[str, str]:
    """A deterministic tree of files (1 KiB to 640 KiB, ~11 MiB, a few duplicates) under
    ``root``; returns ``{"./dir/name": sha256}`` as ``sha256sum`` in the VM prints them."""
    rng = random.Random(seed)
    digests: dict[str, str] = {}
    contents: list[bytes] = []
    for i in range(files):
        directory = root / f"d{i % 6}"
        directory.mkdir(parents=True, exist_ok=True)
        if contents and i % 11 == 10:
            data = contents[rng.randrange(len(contents))]  # the same bytes under another name
        else:
            data = rng.randbytes(rng.choice((1, 3, 17, 64, 200, 640)) * 1024 + rng.randrange(4096))
        contents.append(data)
        path = directory / f"f{i}.bin"
        path.write_bytes(data)
        digests[f"./{path.relative_to(root)}"] = hashlib.sha256(data).hexdigest()
    return digests


def make_ext4(image: Path, tree: Path, *, mib: int = 40) -> None:
    """An ext4 image of ``mib`` MiB holding ``tree`` (``mkfs.ext4 -d``), fully initialised, so
    the guest's first mount has no lazy initialisation to write."""
    with image.open("wb") as f:
        f.truncate(mib << 20)
    subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-b",
            "4096",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
            "-d",
            str(tree),
            str(image),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def build_reader_initramfs(work: Path) -> tuple[Path, Path]:
    """Pack the initramfs (busybox, virtio modules, the ``/init`` above); (kernel, initramfs)."""
    extra = work / "extra"
    (extra / "bin").mkdir(parents=True, exist_ok=True)
    for applet in APPLETS:
        link = extra / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    return pack_initramfs(work, extra, INIT)


def vm_command(kernel: Path, initramfs: Path, uri: str, *, vm_id: int, accel: str) -> list[str]:
    """The qemu command line of VM ``vm_id`` (told to the guest as ``tmem_vm=ID``)."""
    cmd = qemu_command(kernel, initramfs, uri, accel=accel, memory_mib=128)
    i = cmd.index("-append")
    cmd[i + 1] += f" tmem_vm={vm_id}"
    return cmd


def start_vm(
    kernel: Path, initramfs: Path, uri: str, *, vm_id: int, accel: str, console: Path
) -> subprocess.Popen[bytes]:
    """Boot a VM in the background; its console goes to ``console``."""
    with console.open("wb") as out:
        return subprocess.Popen(
            dies_with_us(vm_command(kernel, initramfs, uri, vm_id=vm_id, accel=accel)),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


@dataclass
class VmReport:
    """What a VM's console said: each file's digest, the time it took to read the tree (every
    file once, before digesting them from the page cache), the marks."""

    console: str
    sums: dict[str, str] = field(default_factory=dict)
    files: int = -1
    read_s: float = -1.0
    seen: list[str] = field(default_factory=list)
    wrote: bool = False
    done: bool = False

    @classmethod
    def parse(cls, console: str) -> VmReport:
        report = cls(console)
        for line in console.splitlines():
            line = line.strip()
            if m := re.match(r"SUM: ([0-9a-f]{64})\s+(\S+)$", line):
                report.sums[m[2]] = m[1]
            elif m := re.match(r"TREE: (\d+) files ([\d.]+) ([\d.]+)$", line):
                report.files = int(m[1])
                report.read_s = float(m[3]) - float(m[2])
            elif m := re.match(r"MARK: seen (\S+)", line):
                report.seen.append(m[1])
            elif line.startswith("MARK: wrote"):
                report.wrote = True
            elif line == "INIT: done":
                report.done = True
        return report

    def bad_files(self, tree: dict[str, str]) -> list[str]:
        """Files of ``tree`` the VM did not read back with the right digest."""
        return sorted(name for name, digest in tree.items() if self.sums.get(name) != digest)
