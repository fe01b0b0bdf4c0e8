"""``make demo``: a real broker on the embedded default and a few simulated guests.

Starts ``tmem-broker serve`` (SQLite and the journal in a temporary data dir, a free port on
127.0.0.1, the admin token the broker makes at first start, ``TMEM_COMPRESS=always`` unless
``--compress`` says otherwise), runs a short simulation of four guests booted from the same
image (``/usr/lib``) whose pages inherit the broker's compression mode, prints the tables, what
happened and the compression ratio the broker reached on those real contents, and stops the
broker. ``python -m scripts.demo --help`` lists the knobs (the tests use small ones).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console

from guest_agent.admin import AdminClient
from guest_agent.sim.cli import pages_of, parse_size, print_result, run_against_broker
from guest_agent.sim.runner import SimConfig

BROKER = str(Path(sys.executable).parent / "tmem-broker")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def broker_process(
    data_dir: Path, *, timeout: float = 60.0, compress: str = "never"
) -> Iterator[tuple[str, str]]:
    """Run ``tmem-broker serve`` on a free port with ``TMEM_COMPRESS=compress`` (the mode of
    guests that set none); yields ``(url, admin_token)``, then stops it."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # the caller's TMEM_ settings are not the demo's: only the compression mode is passed
    env = {k: v for k, v in os.environ.items() if not k.startswith("TMEM_")}
    env["TMEM_COMPRESS"] = compress
    log = data_dir.parent / "broker.log"
    with log.open("wb") as logf:
        proc = subprocess.Popen(
            [BROKER, "serve", "--host", "127.0.0.1", "--port", str(port),
             "--data-dir", str(data_dir)],
            env=env,
            stdout=logf,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        with AdminClient(url, timeout=2) as health:
            while not health.ready():
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"the broker did not start:\n{tail}")
                time.sleep(0.1)
        token_file = data_dir / "admin-token"
        yield url, token_file.read_text().strip()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__)
    parser.add_argument("--guests", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--ram", default="8MiB", help="RAM of each guest")
    parser.add_argument("--anon", default="16MiB", help="anonymous memory of each guest")
    parser.add_argument("--cache", default="24MiB", help="how much of the image a guest reads")
    parser.add_argument("--accesses", type=int, default=512, help="accesses per guest per step")
    parser.add_argument("--workload", default="mix")
    parser.add_argument("--image", default="/usr/lib")
    parser.add_argument("--max-image", default="64MiB")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--compress",
        choices=("never", "always", "pressure"),
        default="always",
        help="the broker's compression mode (TMEM_COMPRESS), which the guests inherit; "
        "pressure compresses only once storage passes the low watermark, which the demo's "
        "guests do not reach in the default 1 GiB",
    )
    parser.add_argument("--json", dest="json_out", default=None, help="also write the figures")
    parser.add_argument("--plot", default=None, help="also draw the timeline (PNG)")
    args = parser.parse_args(argv)

    console = Console()
    config = SimConfig(
        guests=args.guests,
        steps=args.steps,
        ram_pages=pages_of(args.ram),
        anon_pages=pages_of(args.anon),
        file_pages=pages_of(args.cache),
        accesses_per_step=args.accesses,
        workload=args.workload,
        images=[args.image],
        max_image_bytes=parse_size(args.max_image),
        seed=args.seed,
    )
    tmp = Path(tempfile.mkdtemp(prefix="tmem-demo-"))
    try:
        console.print(
            "[bold]Starting a broker[/bold] (embedded default: SQLite + journal, "
            f"TMEM_COMPRESS={args.compress}) ..."
        )
        with broker_process(tmp / "data", compress=args.compress) as (url, admin_token):
            console.print(f"broker at {url}, data dir {tmp / 'data'}")
            # the token is this throwaway broker's (its data dir goes when the demo ends)
            console.print(f"dashboard: {url}/dashboard#token={admin_token}", soft_wrap=True)
            console.print(
                f"[bold]Simulating {config.guests} guests[/bold] booted from the same image "
                f"({args.image}), workload '{config.workload}', {config.steps} steps"
            )
            result = run_against_broker(config, url, admin_token=admin_token, console=console)
            print_result(result, console)
            st = result.broker_stats or {}
            console.print(
                f"[bold]Compression ratio {float(st.get('compression_ratio', 1.0)):.2f}[/bold] "
                f"(broker --compress {args.compress}): {st.get('unique_pages', 0):,} distinct "
                f"pages held in {int(st.get('used_bytes', 0)) / (1 << 20):.1f} MiB."
            )
            if args.json_out:
                import json

                Path(args.json_out).write_text(json.dumps(result.as_dict(), indent=2))
            if args.plot:
                from guest_agent.sim.plot import write_plot

                write_plot(result, args.plot)
        console.print("broker stopped.")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
