"""``python -m scripts.demo`` (what ``make demo`` runs), with small sizes."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sim.expected import copy_image

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(150)
def test_demo_runs_a_broker_and_guests_prints_the_table_and_stops(tmp_path: Path) -> None:
    image = copy_image(tmp_path / "image", max_files=60, max_bytes=2 << 20)
    plot = tmp_path / "demo.png"
    proc = subprocess.run(
        [
            sys.executable, "-m", "scripts.demo", "--guests", "3", "--steps", "25",
            "--ram", "512KiB", "--anon", "1MiB", "--cache", "1MiB", "--accesses", "64",
            "--image", str(image), "--plot", str(plot),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=140,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for text in ("Simulated guests", "guest-2", "unique pages", "What happened", "stopped"):
        assert text in out, out
    # rich wraps the paragraph at the terminal's width (80 columns without a TTY, as in CI)
    assert "Every page the broker returned matched" in " ".join(out.split())
    m = re.search(r"broker at http://127\.0\.0\.1:(\d+)", out)
    assert m, out
    assert f"dashboard: http://127.0.0.1:{m.group(1)}/dashboard#token=" in out, out
    # The broker is gone: its port refuses connections.
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(2)
        s.connect(("127.0.0.1", int(m.group(1))))
    # ... and so is its temporary data dir.
    d = re.search(r"data dir (\S+)", out)
    assert d and not Path(d.group(1)).exists()
    assert plot.read_bytes()[:4] == b"\x89PNG"
