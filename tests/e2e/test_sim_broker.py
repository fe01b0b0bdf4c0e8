"""Simulated guests through the real agent against a real ``tmem-broker serve`` process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_agent.sim.agent import close_links, connect_links, create_guests, fetch_stats
from guest_agent.sim.cli import run_against_broker
from guest_agent.sim.runner import run_simulation
from tests.e2e.brokerproc import ADMIN, BrokerProcess
from tests.sim.expected import copy_image, expected_at_broker, small_config

TMEM_AGENT = str(Path(sys.executable).parent / "tmem-agent")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_image(tmp_path_factory.mktemp("image"))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    with BrokerProcess(tmp_path / "data", durability="none", capacity="1GiB") as proc:
        yield proc


@pytest.mark.timeout(150)
@pytest.mark.parametrize("workload", ["mix", "scan"])
def test_four_guests_one_image_dedup_is_exact(
    broker: BrokerProcess, image: Path, workload: str
) -> None:
    # No cap, no capacity pressure: nothing is declined, evicted or shed, so what the broker
    # holds at the end is exactly what the guests' models say they stored and did not take back.
    config = small_config(image, workload=workload)
    created = create_guests(broker.url, ADMIN, 4)
    links = connect_links(broker.url, [t for _, t in created])
    try:
        result = run_simulation(config, links, broker_stats=lambda: fetch_stats(broker.url, ADMIN))
        # Read before the links close: closing a Frontswap destroys its pool.
        stats = fetch_stats(broker.url, ADMIN)
        pressures = [broker.json("GET", f"/v1/guests/{gid}")["pressure"] for gid, _ in created]
    finally:
        close_links(links)
    t = result.totals
    assert t["corrupt_pages"] == 0 and t["swap_lost"] == 0
    assert t["declines"] == {} and t["sheds_answered"] == 0
    assert t["swap_tmem_hits"] > 0 and t["cache_hits"] > 0 and t["swap_invalidates"] > 0

    assert stats["evictions"] == 0
    exp = expected_at_broker(result.models.values())
    assert exp.unique_pages > 100 and exp.zero_pages > 0
    assert stats["logical_pages"] == exp.logical_pages
    assert stats["unique_pages"] == exp.unique_pages
    assert stats["zero_pages"] == exp.zero_pages
    # Four guests on one image share pages across guests.
    assert stats["unique_pages"] + stats["zero_pages"] < stats["logical_pages"]
    assert result.broker_stats is not None
    assert result.broker_stats["unique_pages"] == exp.unique_pages
    # The last pressure report (after the last step) is the model's final state.
    for pressure, model in zip(pressures, result.models.values(), strict=True):
        assert pressure["swap_used_bytes"] == len(model.swapped) * 4096
        assert pressure["mem_available_bytes"] == model.pressure()["mem_available_bytes"]


@pytest.mark.timeout(170)
@pytest.mark.parametrize("cap_pages", [None, 40])
def test_same_seed_same_fault_and_put_counts(
    broker: BrokerProcess, image: Path, cap_pages: int | None
) -> None:
    # With a cap the broker declines and the agent pauses its puts for a while: that pause
    # runs on simulated time, so the counts still repeat exactly.
    runs = []
    for seed in (7, 7, 8):
        result = run_against_broker(
            small_config(image, seed=seed),
            broker.url,
            admin_token=ADMIN,
            cap_pages=cap_pages,
            progress=False,
        )
        runs.append(result.guests)
    first, again, other = runs
    for name in first:
        for key in ("faults", "swap_puts", "cache_puts", "tmem_hits", "tmem_misses"):
            assert first[name][key] == again[name][key], (name, key)
    assert first == again  # every counter, not only faults and puts
    if cap_pages is not None:
        assert all(g["declines"] and g["swap_disk_writes"] for g in first.values())
    assert first != other
    # The guests were deleted after each run: the broker is empty again.
    assert fetch_stats(broker.url, ADMIN)["logical_pages"] == 0


@pytest.mark.timeout(150)
def test_declines_under_a_cap_fall_back_to_disk_and_pages_stay_correct(
    broker: BrokerProcess, image: Path
) -> None:
    result = run_against_broker(
        small_config(image), broker.url, admin_token=ADMIN, cap_pages=30, progress=False
    )
    t = result.totals
    declines = t["declines"]
    assert isinstance(declines, dict)
    assert sum(n for k, n in declines.items() if k.startswith("quota")) > 0
    assert t["swap_disk_writes"] > 0 and t["swap_disk_reads"] > 0
    assert t["corrupt_pages"] == 0 and t["swap_lost"] == 0


@pytest.mark.timeout(150)
def test_cli_prints_the_table_and_writes_json_and_plot(
    broker: BrokerProcess, image: Path, tmp_path: Path
) -> None:
    out_json, out_png = tmp_path / "sim.json", tmp_path / "sim.png"
    proc = subprocess.run(
        [
            TMEM_AGENT, "simulate", "--broker", broker.url, "--admin-token", ADMIN,
            "--guests", "2", "--ram", "512KiB", "--anon", "1MiB", "--cache", "2MiB",
            "--image", str(image), "--steps", "30", "--accesses", "64", "--workload", "hotcold",
            "--json", str(out_json), "--plot", str(out_png),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "100", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in ("Simulated guests", "guest-0", "guest-1", "dedup ratio", "What happened"):
        assert text in proc.stdout
    doc = json.loads(out_json.read_text())
    assert set(doc["guests"]) == {"guest-0", "guest-1"}
    assert doc["totals"]["faults"] > 0
    assert doc["broker_stats"]["puts"] > 0
    assert doc["modelled"]["broker_us_per_page"] > 0
    assert len(doc["timeline"]) == 3
    assert all(s["used_bytes"] is not None for s in doc["timeline"])
    assert out_png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.timeout(120)
def test_tokens_of_existing_guests(broker: BrokerProcess, image: Path) -> None:
    created = create_guests(broker.url, ADMIN, 2)
    result = run_against_broker(
        small_config(image, guests=2), broker.url, tokens=[t for _, t in created], progress=False
    )
    assert set(result.guests) == {"guest-0", "guest-1"}
    # No admin token: the guests' own view only, and no dedup ratio.
    own = result.broker_stats
    assert own is not None and own["source"] == "self"
    assert own["logical_pages"] == sum(
        len(m.broker_swap_pages()) + len(m.broker_cache_pages()) for m in result.models.values()
    )
    assert all(s.dedup_ratio is None and s.used_bytes is not None for s in result.timeline)
    for stats in result.self_stats.values():
        assert stats["pools"], stats
    assert result.totals["pressure_reports"] == 2 * 4


@pytest.mark.timeout(170)
def test_a_small_broker_evicts_cache_pages_but_never_loses_a_swap_page(
    broker: BrokerProcess, tmp_path: Path, image: Path
) -> None:
    roomy = run_against_broker(small_config(image), broker.url, admin_token=ADMIN, progress=False)
    with BrokerProcess(tmp_path / "small", durability="none", capacity="1MiB") as tight:
        result = run_against_broker(
            small_config(image), tight.url, admin_token=ADMIN, progress=False
        )
    t = result.totals
    assert result.broker_stats is not None
    assert result.broker_stats["evictions"] > 0
    # Evicted cleancache pages turn into misses; a persistent page is never dropped, and a
    # swap page the broker had no room for went to the fallback file.
    assert t["cache_misses"] > roomy.totals["cache_misses"]
    assert t["swap_lost"] == 0 and t["corrupt_pages"] == 0


@pytest.mark.timeout(170)
def test_guests_of_one_image_share_a_cleancache_pool(broker: BrokerProcess, image: Path) -> None:
    private = run_against_broker(small_config(image), broker.url, admin_token=ADMIN, progress=False)
    shared = run_against_broker(
        small_config(image, shared_cache=True), broker.url, admin_token=ADMIN, progress=False
    )
    t = shared.totals
    assert t["shared_cache_hits"] > 0 and private.totals["shared_cache_hits"] == 0
    assert t["cache_misses"] < private.totals["cache_misses"]
    assert t["corrupt_pages"] == 0 and t["swap_lost"] == 0
    # The figures sampled at the end of the run (before the guests went) are exact again:
    # a file page sits once in the shared pool, whoever put it.
    exp = expected_at_broker(shared.models.values())
    st = shared.broker_stats
    assert st is not None
    assert (st["logical_pages"], st["unique_pages"], st["zero_pages"]) == (
        exp.logical_pages,
        exp.unique_pages,
        exp.zero_pages,
    )
