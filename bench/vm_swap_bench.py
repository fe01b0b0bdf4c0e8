"""A VM-level figure: a Linux VM swapping a hog of twice its RAM, over the broker vs nbdkit.

Boots the swap test's VM (``tests/e2e/vm_support.py``: Debian's cloud kernel under qemu TCG, a
busybox initramfs whose ``/init`` swaps onto the NBD disk and runs a static fill-and-verify
program) with ``--memory`` MiB of RAM and a hog of twice that. Its disk is, in turns:

* ``broker``: the broker's own export (``tmem-broker serve --nbd-dir``, ``PUT
  /v1/self/nbd/{name}``) on its Unix socket;
* ``agent``: ``tmem-agent nbd`` reaching the same broker on its Unix socket (``--agent``);
* ``nbdkit``: ``nbdkit memory`` on a Unix socket (the reference).

Each VM runs from qemu's start to its power-off (wall time); the console must say the hog
verified. The targets take turns, the order reversed every other round; the table gives the
median wall time of each and its ratio to nbdkit's, with the pages the guests swapped in and
out (``pswpin``/``pswpout``). Figures also go to ``bench/results/vm_swap.json``.

Run: ``.venv/bin/python -m bench.vm_swap_bench [--rounds 3] [--memory 96] [--agent]``.
Not a test: it never fails on a time. Under TCG on a shared 2-core machine the guest's CPU is
the slow part: read the ratio of one run.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.common import machine, nbdkit_memory
from tests.e2e.nbd_support import NbdAgent, UdsBrokerProcess, new_guest
from tests.e2e.vm_support import build_initramfs, qemu_command

RESULTS = Path(__file__).resolve().parent / "results" / "vm_swap.json"


def boot(kernel: Path, initramfs: Path, uri: str, memory: int, log: Path) -> dict[str, Any]:
    """One VM to power-off; its wall time and what its console said."""
    cmd = qemu_command(kernel, initramfs, uri, accel="tcg", memory_mib=memory)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    wall = time.perf_counter() - t0
    console = done.stdout + done.stderr
    log.write_text(console)
    vmstat = {k: int(v) for k, v in re.findall(r"VMSTAT: (pswp\w+) (\d+)", console)}
    return {"wall_s": wall, "verified": "FILL: VERIFY OK" in console, **vmstat}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", type=int, default=96, help="the VM's RAM in MiB")
    parser.add_argument("--agent", action="store_true", help="also tmem-agent nbd")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for tool in ("qemu-system-x86_64", "nbdkit", "busybox", "gcc", "cpio"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is missing (scripts/system-deps.sh installs it)")
    hog = 2 * args.memory
    size = f"{max(256, 2 * hog)}MiB"
    nbytes = int(size[:-3]) << 20
    info = machine()
    print(f"VM {args.memory} MiB, hog {hog} MiB, export {size}; load {info['load_average']}")
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="tmem-vmswap-") as tmpdir, ExitStack() as stack:
        tmp = Path(tmpdir)
        kernel, initramfs = build_initramfs(tmp / "vm", mib=hog)
        broker = stack.enter_context(UdsBrokerProcess(
            tmp / "broker", uds=tmp / "broker.sock", nbd_dir=tmp / "exports",
            durability="none", capacity="4GiB",
        ))  # fmt: skip
        targets: dict[str, Any] = {}
        _, token = new_guest(broker, "vm-broker")
        n = 0

        def broker_export() -> str:
            # a fresh export per VM (the disk of a new VM); the previous one goes with its pool
            nonlocal n
            if n:
                broker.json("DELETE", f"/v1/self/nbd/swap{n}", token=token, expect=204)
            n += 1
            made = broker.json(
                "PUT", f"/v1/self/nbd/swap{n}", {"size": nbytes}, token=token, expect=201
            )
            return str(made["uri"])

        targets["broker"] = broker_export
        targets["nbdkit"] = lambda: stack.enter_context(
            nbdkit_memory(size, unix=tmp / f"nbdkit-{time.monotonic_ns()}.sock")
        )
        if args.agent:
            _, agent_token = new_guest(broker, "vm-agent")

            def agent() -> str:
                work = tmp / f"agent-{time.monotonic_ns()}"
                work.mkdir()
                return stack.enter_context(NbdAgent.for_broker(
                    broker, agent_token, work, size=size, url=broker.unix_url,
                )).uri  # fmt: skip

            targets["agent"] = agent
        order = list(targets)
        for k in range(args.rounds):
            for name in order if k % 2 == 0 else order[::-1]:
                uri = targets[name]()
                result = boot(kernel, initramfs, uri, args.memory, tmp / f"{name}-{k}.log")
                runs.setdefault(name, []).append(result)
                print(f"round {k + 1} {name:7s} {result['wall_s']:6.1f} s  verified="
                      f"{result['verified']}  pswpout={result.get('pswpout')} "
                      f"pswpin={result.get('pswpin')}", flush=True)  # fmt: skip
    base = statistics.median(r["wall_s"] for r in runs["nbdkit"])
    print(f"\nmedians of {args.rounds} rounds (load after {machine()['load_average']}):")
    summary: dict[str, Any] = {}
    for name, results in runs.items():
        wall = statistics.median(r["wall_s"] for r in results)
        ok = all(r["verified"] for r in results)
        summary[name] = {"median_wall_s": wall, "ratio_to_nbdkit": wall / base, "verified": ok}
        aim = "  (aim <= 1.2x)" if name == "broker" else ""
        print(f"  {name:7s} {wall:6.1f} s  {wall / base:4.2f}x nbdkit  all verified={ok}{aim}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "machine": info, "load_after": machine()["load_average"], "memory_mib": args.memory,
        "hog_mib": hog, "export": size, "rounds": runs, "summary": summary,
    }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
