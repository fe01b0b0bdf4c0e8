"""A real Linux VM swaps onto ``tmem-agent nbd``: pages a kernel swaps out become persistent puts
at a real broker, and come back intact."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.brokerproc import BrokerProcess
from tests.e2e.nbd_support import NbdAgent, new_guest, persistent_pages
from tests.e2e.vm_support import accelerators, build_initramfs, qemu_command

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("qemu-system-x86_64", "busybox", "gcc", "cpio")),
        reason="needs qemu-system-x86, busybox-static, gcc, cpio (scripts/system-deps.sh)",
    ),
]

FILL_MIB = 160  # in a 96 MiB VM: most of it must go through swap
CAP_PAGES = 2000  # the declining case: ~8 MiB at the broker, the rest in the fallback file


def boot(kernel: Path, initramfs: Path, uri: str, log: Path) -> tuple[str, str]:
    """Run the VM to power-off with the first accelerator that boots; (accel, console)."""
    console = ""
    for accel in accelerators():
        try:
            done = subprocess.run(
                qemu_command(kernel, initramfs, uri, accel=accel),
                capture_output=True,
                text=True,
                timeout=600,
            )
            console = done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or b""
            console = out.decode(errors="replace") if isinstance(out, bytes) else out
            console += "\n[timed out]"
        log.write_text(console)
        if "INIT: swap on" in console:
            return accel, console
    return "none", console


@pytest.mark.parametrize("cap_pages", [None, CAP_PAGES], ids=["broker", "declining-broker"])
def test_vm_swaps_to_the_export(tmp_path: Path, cap_pages: int | None) -> None:
    kernel, initramfs = build_initramfs(tmp_path / "vm", mib=FILL_MIB)
    with BrokerProcess(tmp_path / "broker") as broker:
        guest_id, token = new_guest(broker, "swap-vm", cap_pages=cap_pages)
        with NbdAgent.for_broker(broker, token, tmp_path, size="256MiB") as agent:
            accel, console = boot(kernel, initramfs, agent.uri, tmp_path / "console.log")
            # the agent still runs: what the broker holds now is what the guest swapped out
            held = persistent_pages(broker, guest_id)
            fallback_bytes = (tmp_path / "fallback.img").stat().st_blocks * 512
        assert "INIT: swap on" in console, console[-3000:]
        assert f"FILL: VERIFY OK {FILL_MIB} MiB" in console, console[-3000:]
        match = re.search(r"VMSTAT: pswpout (\d+)", console)
        assert match and int(match.group(1)) > 0, console[-3000:]
        assert held > 0
        if cap_pages is None:
            assert held > 10_000  # tens of MiB of swap sit at the broker
        else:
            assert held <= cap_pages
            assert fallback_bytes > 10_000 * 4096  # the rest went to the fallback file
        print(f"accel={accel} pswpout={match.group(1)} broker_pages={held}")
