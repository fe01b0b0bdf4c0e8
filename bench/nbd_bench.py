"""What the NBD export costs: fio IOPS through ``tmem-agent nbd`` next to nbdkit's memory plugin.

Starts, in one run and on free ports: ``nbdkit memory`` (the reference server), ``tmem-agent nbd
--memory`` (the protocol layer alone) and ``tmem-agent nbd`` on a real ``tmem-broker serve``
(durability ``sync`` and ``none``, reached over its Unix socket and over TCP; by default all
four). Each export is first filled (sequential 1 MiB writes, so reads
hit real data), then fio's nbd engine runs 4k random writes and reads at queue depth 1 and 32.

Run: ``.venv/bin/python bench/nbd_bench.py [--size 256MiB] [--runtime 5] [--durability both]
[--path both]``.
Prints IOPS per target and job, and each target's ratio to nbdkit. Not a test: it never fails on
a time. On a shared 2-core machine the figures are noisy; compare ratios from the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import nbdkit_memory  # noqa: E402
from scripts.procs import BrokerProcess  # noqa: E402
from tests.e2e.nbd_support import NbdAgent, UdsBrokerProcess, new_guest  # noqa: E402

JOBS = [
    ("randwrite", 1),
    ("randwrite", 32),
    ("randread", 1),
    ("randread", 32),
]


@contextmanager
def agent_memory(tmp: Path, size: str) -> Iterator[str]:
    with NbdAgent.in_memory(tmp, size=size) as agent:
        yield agent.uri


@contextmanager
def agent_broker(tmp: Path, size: str, durability: str, path: str = "tcp") -> Iterator[str]:
    """An export on a fresh broker, reached over ``path``: "tcp" or "unix" (``--uds``)."""
    if path == "unix":
        broker: BrokerProcess = UdsBrokerProcess(
            tmp / "broker", uds=tmp / "broker.sock", durability=durability
        )
    else:
        broker = BrokerProcess(tmp / "broker", durability=durability)
    with broker:
        _, token = new_guest(broker, "bench")
        url = broker.unix_url if isinstance(broker, UdsBrokerProcess) else broker.url
        with NbdAgent.for_broker(broker, token, tmp, size=size, url=url) as agent:
            yield agent.uri


def fio(uri: str, *args: str) -> dict[str, object]:
    done = subprocess.run(
        ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", "--output-format=json", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    report: dict[str, object] = json.loads(done.stdout[done.stdout.index("{") :])
    return report


def measure(uri: str, size: str, runtime: int) -> dict[str, float]:
    nbytes = size.replace("MiB", "m").replace("GiB", "g")
    fio(uri, "--rw=write", "--bs=1m", "--iodepth=4", f"--size={nbytes}")
    out: dict[str, float] = {}
    for rw, depth in JOBS:
        report = fio(
            uri,
            f"--rw={rw}",
            "--bs=4k",
            f"--iodepth={depth}",
            f"--size={nbytes}",
            f"--runtime={runtime}",
            "--time_based",
        )
        job: Any = report["jobs"][0]  # type: ignore[index]
        side = "write" if "write" in rw else "read"
        out[f"{rw} qd{depth}"] = float(job[side]["iops"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--durability", default="both", choices=["sync", "none", "both"])
    ap.add_argument(
        "--path", default="both", choices=["unix", "tcp", "both"], help="agent to broker"
    )
    args = ap.parse_args()
    for tool in ("fio", "nbdkit"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: run scripts/system-deps.sh")

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="nbd-bench-") as tmpdir:
        tmp = Path(tmpdir)

        def broker_target(
            work: Path, durability: str, path: str
        ) -> Callable[[], AbstractContextManager[str]]:
            return lambda: agent_broker(work, args.size, durability, path)

        durabilities = ["sync", "none"] if args.durability == "both" else [args.durability]
        targets: list[tuple[str, Callable[[], AbstractContextManager[str]]]] = [
            ("nbdkit memory", lambda: nbdkit_memory(args.size)),
            ("agent --memory", lambda: agent_memory(tmp / "mem", args.size)),
        ]
        paths = ["unix", "tcp"] if args.path == "both" else [args.path]
        for durability in durabilities:
            for path in paths:
                work = tmp / f"broker-{durability}-{path}"
                work.mkdir()
                name = f"agent + broker ({durability}, {path})"
                targets.append((name, broker_target(work, durability, path)))
        (tmp / "mem").mkdir()
        for name, target in targets:
            with target() as uri:
                results[name] = measure(uri, args.size, args.runtime)
                print(f"{name}: " + ", ".join(f"{k} {v:,.0f}" for k, v in results[name].items()))

    base = results["nbdkit memory"]
    jobs = [f"{rw} qd{depth}" for rw, depth in JOBS]
    print()
    print(f"fio 4k random, IOPS ({args.size} export, {args.runtime} s per job)")
    print(f"{'target':<34}" + "".join(f"{j:>16}" for j in jobs))
    for name, figures in results.items():
        print(f"{name:<34}" + "".join(f"{figures[j]:>16,.0f}" for j in jobs))
    for name, figures in results.items():
        if name == "nbdkit memory":
            continue
        print(f"{name + ' / nbdkit':<34}" + "".join(f"{figures[j] / base[j]:>16.2f}" for j in jobs))


if __name__ == "__main__":
    main()
