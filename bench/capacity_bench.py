"""More guest memory from the same RAM (issue #16): four broker configurations, one run.

Eight simulated guests "booted from one image" (the simulator's real contents: the same
``/usr/lib`` pages in every page cache, anonymous memory that starts alike in every guest and
drifts apart as it is written; :mod:`guest_agent.sim.model`) run the same seeded workload
against a fresh broker of the same capacity in each configuration:

=============  =================================================================
defaults       today's defaults: ``--compress never``, the untrusted ``default`` domain
pressure       ``TMEM_COMPRESS=pressure`` (the guests inherit the broker's mode)
trusted        the guests in one trusted dedup domain (``PUT /v1/domains/tenant``)
both           ``TMEM_COMPRESS=pressure`` and the trusted domain
=============  =================================================================

For each: pages the broker holds at the end (``logical_pages``, and their mean over the second
half of the run), guest faults served by the broker (tmem hits), disk I/O avoided (reads and
swap writes), and persistent pages lost (swap pages found nowhere, or found wrong: every page
the broker returns is checked; must be 0). Run::

    .venv/bin/python -m bench.capacity_bench [--quick] [--capacity 32MiB] [--json PATH]
        [--broker-env TMEM_PERSISTENT_SHARE=0.95 ...]     # a what-if, for all four alike

``bench.run_all`` runs it as section g. Not a test: nothing fails on a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.common import broker_process, machine
from guest_agent.sim.cli import pages_of, parse_size, run_against_broker
from guest_agent.sim.images import DEFAULT_IMAGE
from guest_agent.sim.runner import SimConfig, SimResult
from scripts.procs import ADMIN

RESULTS = Path(__file__).resolve().parent / "results" / "capacity.json"
TRUSTED_DOMAIN = "tenant"


@dataclass(frozen=True)
class Setup:
    """One broker configuration: its compression mode and whether the guests share a
    trusted domain."""

    name: str
    compress: str
    trusted: bool
    what: str


SETUPS = (
    Setup("defaults", "never", False, "today's defaults (compress never, untrusted domain)"),
    Setup("pressure", "pressure", False, "TMEM_COMPRESS=pressure"),
    Setup("trusted", "never", True, "one trusted dedup domain"),
    Setup("both", "pressure", True, "TMEM_COMPRESS=pressure + trusted domain"),
)


@dataclass
class CapacityConfig:
    """The run's sizes: every configuration gets the same guests, workload and capacity."""

    guests: int = 8
    capacity: str = "32MiB"
    ram: str = "8MiB"
    anon: str = "16MiB"
    cache: str = "24MiB"
    steps: int = 150
    accesses: int = 512
    workload: str = "mix"
    seed: int = 1
    image: str = DEFAULT_IMAGE
    max_image: str = "64MiB"
    setups: list[str] = field(default_factory=lambda: [s.name for s in SETUPS])
    broker_env: dict[str, str] = field(default_factory=dict)
    """Further ``TMEM_...`` settings for every configuration's broker alike (a what-if: say
    so when quoting its figures); ``TMEM_COMPRESS`` is each configuration's own."""

    @classmethod
    def quick(cls) -> CapacityConfig:
        """Small enough for the smoke test (a few seconds a configuration)."""
        return cls(capacity="2MiB", ram="512KiB", anon="1MiB", cache="1MiB", steps=20, accesses=64)

    def sim(self, setup: Setup) -> SimConfig:
        return SimConfig(
            guests=self.guests,
            ram_pages=pages_of(self.ram),
            anon_pages=pages_of(self.anon),
            file_pages=pages_of(self.cache),
            steps=self.steps,
            accesses_per_step=self.accesses,
            workload=self.workload,
            seed=self.seed,
            images=[self.image],
            max_image_bytes=parse_size(self.max_image),
            # the broker's mode applies: the guests set none of their own
            compress="inherit",
            dedup_domain=TRUSTED_DOMAIN if setup.trusted else "default",
            trusted_domain=setup.trusted,
        )


def _n(d: dict[str, object], key: str) -> int:
    v = d.get(key, 0)
    return v if isinstance(v, int) else 0


def figures(setup: Setup, result: SimResult, seconds: float) -> dict[str, Any]:
    """What the table shows for one configuration, and what the JSON keeps."""
    t = result.totals
    st = result.broker_stats or {}
    half = [s.logical_pages for s in result.timeline[len(result.timeline) // 2 :]]
    held = [n for n in half if n is not None]
    ops = st.get("puts_declined")
    return {
        "setup": setup.name,
        "what": setup.what,
        "pages_held": int(st.get("logical_pages", 0)),
        "pages_held_mean_second_half": statistics.fmean(held) if held else 0.0,
        "persistent_pages": int(st.get("persistent_pages", 0)),
        "ephemeral_pages": int(st.get("ephemeral_pages", 0)),
        "zero_pages": int(st.get("zero_pages", 0)),
        "unique_pages": int(st.get("unique_pages", 0)),
        "faults": _n(t, "faults"),
        "faults_served_by_broker": _n(t, "tmem_hits"),
        "disk_reads_avoided": _n(t, "disk_reads_avoided"),
        "disk_writes_avoided": _n(t, "disk_writes_avoided"),
        "disk_io_avoided": _n(t, "disk_reads_avoided") + _n(t, "disk_writes_avoided"),
        "persistent_pages_lost": _n(t, "swap_lost") + _n(t, "corrupt_pages"),
        "sheds_answered": _n(t, "sheds_answered"),
        "shed_pages_returned": _n(t, "shed_pages_returned"),
        "declines": t.get("declines", {}),
        "capacity_bytes": int(st.get("capacity_bytes", 0)),
        "used_bytes": int(st.get("used_bytes", 0)),
        "charged_bytes": int(st.get("charged_bytes", 0)),
        "counted_bytes": int(st.get("counted_bytes", 0)),
        "compression_ratio": float(st.get("compression_ratio", 1.0)),
        "dedup_ratio": float(st.get("dedup_ratio", 1.0)),
        "evictions": int(st.get("evictions", 0)),
        "puts_declined": ops if isinstance(ops, dict) else {},
        "compressed_cold": int(st.get("compressed_cold", 0)),
        "pressure": st.get("pressure", {}),
        "domain": result.domain,
        "seconds": round(seconds, 1),
    }


def run_setup(cfg: CapacityConfig, setup: Setup, tmp: Path) -> dict[str, Any]:
    """A fresh broker of ``cfg.capacity`` in ``setup``, the guests, the figures."""
    env = {**cfg.broker_env, "TMEM_COMPRESS": setup.compress}
    started = time.monotonic()
    with broker_process(tmp, capacity=cfg.capacity, env=env) as broker:
        result = run_against_broker(cfg.sim(setup), broker.url, admin_token=ADMIN, progress=False)
    return figures(setup, result, time.monotonic() - started)


def run(
    cfg: CapacityConfig, tmp: Path, on_done: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Every configuration of ``cfg.setups``, one after the other, in the order of SETUPS."""
    out = []
    for setup in SETUPS:
        if setup.name in cfg.setups:
            out.append(run_setup(cfg, setup, tmp))
            if on_done is not None:
                on_done(out[-1])
    return out


def table(rows: list[dict[str, Any]], cfg: CapacityConfig, info: dict[str, Any]) -> Table:
    """One row per configuration, with each figure's ratio to the defaults' figure."""
    base = next((r for r in rows if r["setup"] == "defaults"), None)
    extra = "".join(f", {k}={v}" for k, v in sorted(cfg.broker_env.items()))
    t = Table(
        title=f"{cfg.guests} guests on one image, broker capacity {cfg.capacity}{extra} "
        f"({cfg.ram} RAM, {cfg.anon} anon, {cfg.cache} cache, {cfg.steps} steps, "
        f"'{cfg.workload}'); load {info['load_average']}"
    )
    for col in ("configuration", "pages held", "faults served\nby the broker",
                "disk I/O\navoided", "persistent\npages lost", "compression\nratio",
                "dedup\nratio", "used / counted\nMiB", "sheds", "s"):  # fmt: skip
        t.add_column(col, justify="left" if col == "configuration" else "right")

    def vs(r: dict[str, Any], key: str) -> str:
        if base is None or r is base or not base[key]:
            return f"{r[key]:,}"
        return f"{r[key]:,} ({r[key] / base[key]:.2f}x)"

    for r in rows:
        t.add_row(
            r["what"],
            vs(r, "pages_held"),
            vs(r, "faults_served_by_broker"),
            vs(r, "disk_io_avoided"),
            f"{r['persistent_pages_lost']}",
            f"{r['compression_ratio']:.2f}",
            f"{r['dedup_ratio']:.2f}",
            f"{r['used_bytes'] / (1 << 20):.1f} / {r['counted_bytes'] / (1 << 20):.1f}",
            f"{r['sheds_answered']}",
            f"{r['seconds']:.0f}",
        )
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    defaults = CapacityConfig()
    for name in ("capacity", "ram", "anon", "cache", "image", "workload"):
        parser.add_argument(f"--{name}", default=None, help=f"[{getattr(defaults, name)}]")
    for name in ("guests", "steps", "accesses", "seed"):
        parser.add_argument(f"--{name}", type=int, default=None,
                            help=f"[{getattr(defaults, name)}]")  # fmt: skip
    parser.add_argument(
        "--broker-env",
        action="append",
        default=[],
        metavar="TMEM_NAME=VALUE",
        help="a further broker setting for all four configurations alike (repeatable)",
    )
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write figures")
    args = parser.parse_args(argv)
    broker_env = {}
    for item in args.broker_env:
        name, eq, value = item.partition("=")
        if not eq or not name.startswith("TMEM_") or name == "TMEM_COMPRESS":
            parser.error(f"--broker-env {item!r}: give TMEM_NAME=VALUE, not TMEM_COMPRESS")
        broker_env[name] = value
    cfg = CapacityConfig.quick() if args.quick else CapacityConfig()
    for name in ("capacity", "ram", "anon", "cache", "image", "workload", "guests", "steps",
                 "accesses", "seed"):  # fmt: skip
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.broker_env = broker_env
    console = Console(width=None if sys.stdout.isatty() else 160)
    info = machine()
    console.print(f"machine: {info['nproc']} cores, {info['cpu_model']}, load average "
                  f"{info['load_average']}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tmem-capacity-") as tmpdir:
        rows = run(cfg, Path(tmpdir), lambda r: console.print(
            f"  {r['setup']}: {r['pages_held']:,} pages held ({r['seconds']:.0f} s)"))  # fmt: skip
    info["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    console.print(table(rows, cfg, info))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"machine": info, "config": asdict(cfg), "setups": rows}, indent=2)
    )
    console.print(f"figures: {args.json} (load average after: {info['load_average_after']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
