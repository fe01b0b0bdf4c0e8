"""A throwaway Linux VM for the swap test: Debian's cloud kernel, a busybox initramfs, qemu.

``scripts/build-vm.sh`` fetches the kernel once into the cache directory (``TMEM_VM_CACHE``,
default ``~/.cache/tmem-broker/vm``) and packs an initramfs from a directory this module fills:
an ``/init`` and a static fill-and-verify program compiled here with ``gcc -static``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD_VM = REPO / "scripts" / "build-vm.sh"
CACHE = Path(os.environ.get("TMEM_VM_CACHE", Path.home() / ".cache" / "tmem-broker" / "vm"))

FILL_C = r"""
/* Fill `mib` MiB with a pattern derived from each word's index, then verify it twice.
   In a VM with less memory than that, most of it has to go through swap and back. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static uint64_t pattern(uint64_t i) { return (i * 0x9E3779B97F4A7C15ULL) ^ 0xA5A5A5A5A5A5A5A5ULL; }

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? (size_t)atoi(argv[1]) : 160;
    size_t words = (mib << 20) / sizeof(uint64_t);
    uint64_t *p = malloc(words * sizeof(uint64_t));
    if (!p) { printf("FILL: malloc failed\n"); return 1; }
    for (size_t i = 0; i < words; i++) p[i] = pattern(i);
    printf("FILL: wrote %zu MiB\n", mib);
    fflush(stdout);
    size_t bad = 0;
    for (int pass = 0; pass < 2; pass++)
        for (size_t i = 0; i < words; i++)
            if (p[i] != pattern(i)) bad++;
    if (bad) { printf("FILL: VERIFY FAILED %zu bad words\n", bad); return 1; }
    printf("FILL: VERIFY OK %zu MiB\n", mib);
    return 0;
}
"""

INIT = """#!/bin/sh
# /init of the swap test VM: load virtio, swap onto the NBD-backed disk, fill, report, power off.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m.ko || echo "INIT: insmod $m failed"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mkswap /dev/vda && swapon /dev/vda && echo "INIT: swap on"
free
/fill {mib}
echo "INIT: fill exit $?"
grep -E '^pswp(in|out) ' /proc/vmstat | sed 's/^/VMSTAT: /'
echo "INIT: done"
poweroff -f
"""


def build_initramfs(work: Path, *, mib: int) -> tuple[Path, Path]:
    """Compile the fill program, write /init, pack; returns (kernel, initramfs)."""
    extra = work / "extra"
    extra.mkdir(parents=True, exist_ok=True)
    source = work / "fill.c"
    source.write_text(FILL_C)
    subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(extra / "fill"), str(source)],
        check=True,
        capture_output=True,
    )
    return pack_initramfs(work, extra, INIT.replace("{mib}", str(mib)))


def pack_initramfs(work: Path, extra: Path, init: str) -> tuple[Path, Path]:
    """Write ``init`` as ``extra/init``, then let ``scripts/build-vm.sh`` fetch the kernel
    (once) and pack busybox, the virtio modules and ``extra`` into ``work/initramfs.cpio.gz``;
    returns (kernel, initramfs)."""
    script = extra / "init"
    script.write_text(init)
    script.chmod(0o755)
    initramfs = work / "initramfs.cpio.gz"
    done = subprocess.run(
        ["bash", str(BUILD_VM), str(CACHE), str(initramfs), str(extra)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return Path(done.stdout.strip().splitlines()[-1]), initramfs


def qemu_command(
    kernel: Path, initramfs: Path, drive_uri: str, *, accel: str, memory_mib: int = 96
) -> list[str]:
    cmd = ["qemu-system-x86_64", "-m", str(memory_mib), "-smp", "1", "-nographic"]
    cmd += ["-no-reboot", "-nodefaults", "-serial", "stdio", "-net", "none"]
    cmd += ["-accel", accel, "-cpu", "max" if accel == "tcg" else "host"]
    cmd += ["-kernel", str(kernel), "-initrd", str(initramfs)]
    cmd += ["-append", "console=ttyS0 panic=-1 loglevel=4"]
    cmd += ["-drive", f"file={drive_uri},format=raw,if=virtio,cache=none,aio=threads"]
    return cmd


def accelerators() -> list[str]:
    """Accelerators to try in order: ``TMEM_VM_ACCEL`` when set, else KVM (when /dev/kvm is
    usable; it can be present yet fail under nested virtualisation) then TCG."""
    forced = os.environ.get("TMEM_VM_ACCEL")
    if forced:
        return [forced]
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        return ["kvm", "tcg"]
    return ["tcg"]
