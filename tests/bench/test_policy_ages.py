"""The reuse-age replay (bench/policy_ages.py) still runs and follows every cleancache page
(its figures are not judged: benchmarks are not tests)."""

from __future__ import annotations

import pytest

from bench import policy_ages, policy_scoreboard
from broker.core.eviction import Eviction
from broker.core.pages import PageTable


@pytest.mark.timeout(60)
def test_the_age_replay_follows_every_cleancache_page_and_restores_the_harness() -> None:
    put, step = policy_scoreboard.Guest._put, policy_scoreboard.Guest.step
    evict_one, drop = Eviction.evict_one, PageTable.drop
    printed: list[str] = []
    args = ["--workload", "mix", "--policy", "xen", "--steps", "30", "--capacity-percent", "25"]
    score, track = policy_ages.main(args, out=printed.append)
    # the scoreboard's harness and the core are left as they were
    assert policy_scoreboard.Guest._put is put and policy_scoreboard.Guest.step is step
    assert Eviction.evict_one is evict_one and PageTable.drop is drop
    assert score.evictions > 0  # a small broker: pages were evicted, and followed out
    assert not track.held  # every page followed to an end
    assert track.lives and all(0 <= put_at <= end <= 30 for _h, put_at, end, _s, _e in track.lives)
    cleancache_hits = sum(1 for life in track.lives if life[0])
    assert 0 < cleancache_hits <= score.hits
    assert all(size == 4096 for _h, _p, _e, size, _s in track.lives)  # xen: never compressed
    rows = [line for line in printed if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) >= len(policy_ages.CUTOFFS)
