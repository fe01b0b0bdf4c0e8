"""The policy scoreboard still runs: ten steps of every workload under every policy, its
table and its chart (no figure is judged: benchmarks are not tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.policy_scoreboard import POLICIES, WORKLOADS, main


@pytest.mark.timeout(60)
def test_every_workload_and_policy_makes_a_row_and_the_chart_is_drawn(tmp_path: Path) -> None:
    printed: list[str] = []
    png = tmp_path / "scoreboard.png"
    scores = main(["--steps", "10", "--png", str(png)], out=printed.append)
    assert {(s.workload, s.policy) for s in scores} == {(w, p) for w in WORKLOADS for p in POLICIES}
    assert all(s.gets > 0 and s.persistent_lost == 0 for s in scores)
    assert all(s.puts > 0 for s in scores if s.workload != "shifting")  # caches spilled
    table = printed[0].splitlines()
    assert len(table) == 2 + len(scores)
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
