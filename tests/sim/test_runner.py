from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from guest_agent.sim.backends import MemoryBroker
from guest_agent.sim.plot import write_plot
from guest_agent.sim.report import broker_table, figures_table, what_happened
from guest_agent.sim.runner import (
    SimConfig,
    SimResult,
    Timing,
    memory_links,
    modelled_time,
    run_simulation,
)

from .expected import expected_at_broker, small_config

pytestmark = pytest.mark.timeout(120)


def twin_run(cfg: SimConfig, **kw: object) -> tuple[SimResult, MemoryBroker]:
    broker = MemoryBroker(**kw)  # type: ignore[arg-type]
    result = run_simulation(cfg, memory_links(cfg, broker), broker_stats=broker.stats)
    return result, broker


def test_same_seed_same_counts_other_seed_other_counts(image_tree: Path) -> None:
    a, _ = twin_run(small_config(image_tree, seed=11))
    b, _ = twin_run(small_config(image_tree, seed=11))
    c, _ = twin_run(small_config(image_tree, seed=12))
    assert a.guests == b.guests
    assert a.totals == b.totals
    assert a.totals["faults"] > 0 and a.totals["swap_puts"] > 0
    assert a.guests != c.guests


@pytest.mark.parametrize("workload", ["hotcold", "scan", "phases", "mix"])
def test_dedup_at_the_twin_is_exact(image_tree: Path, workload: str) -> None:
    result, broker = twin_run(small_config(image_tree, workload=workload))
    exp = expected_at_broker(result.models.values())
    st = broker.stats()
    assert exp.logical_pages > 0 and exp.unique_pages > 0
    assert (st["logical_pages"], st["unique_pages"], st["zero_pages"]) == (
        exp.logical_pages,
        exp.unique_pages,
        exp.zero_pages,
    )
    # The same image for every guest: pages are shared across guests.
    assert st["unique_pages"] + st["zero_pages"] < st["logical_pages"]


def test_different_images_share_less(image_tree: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    for i in range(40):
        # distinct contents: no page of this tree equals a page of the copied /usr/lib files
        (other / f"f{i:02d}").write_bytes(bytes([i + 1]) * (4096 * 20))
    same, _ = twin_run(small_config(image_tree))
    mixed, _ = twin_run(small_config(image_tree, images=[str(image_tree), str(other)]))
    assert same.broker_stats is not None and mixed.broker_stats is not None
    assert mixed.broker_stats["dedup_ratio"] < same.broker_stats["dedup_ratio"]
    assert len(mixed.images) == 2


def test_report_json_and_plot(image_tree: Path, tmp_path: Path) -> None:
    result, _ = twin_run(small_config(image_tree))
    console = Console(width=200, record=True)
    console.print(figures_table(result))
    console.print(broker_table(result))
    text = console.export_text()
    for name in ("guest-0", "guest-3", "all", "dedup ratio", "time saved"):
        assert name in text
    summary = what_happened(result)
    assert f"{result.totals['faults']:,} page faults" in summary
    assert "matched" in summary
    doc = json.loads(json.dumps(result.as_dict()))
    assert doc["totals"]["tmem_hits"] == result.totals["tmem_hits"]
    assert set(doc["guests"]) == {"guest-0", "guest-1", "guest-2", "guest-3"}
    assert len(doc["timeline"]) == 40 // 5
    png = tmp_path / "sim.png"
    write_plot(result, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_modelled_time_is_disk_time_avoided_minus_broker_time() -> None:
    timing = Timing(seconds=0.5, calls=10, pages=1000)
    m = modelled_time({"disk_reads_avoided": 3000, "disk_writes_avoided": 1000}, timing, 100.0)
    assert m["disk_seconds_avoided"] == pytest.approx(0.4)
    assert m["seconds_saved"] == pytest.approx(-0.1)
    assert m["broker_us_per_page"] == pytest.approx(500.0)


def test_pressure_is_reported_periodically(image_tree: Path) -> None:
    cfg = small_config(image_tree, pressure_every=10)
    broker = MemoryBroker()
    links = memory_links(cfg, broker)
    run_simulation(cfg, links)
    assert all(len(link.pressure_reports) == 4 for link in links)
    assert all(
        set(r) >= {"psi_some_avg10", "mem_available_bytes"} for r in links[0].pressure_reports
    )


def test_sheds_are_answered_and_the_guest_resyncs(image_tree: Path) -> None:
    cfg = small_config(image_tree, notices_every=5)
    broker = MemoryBroker()
    links = memory_links(cfg, broker)

    def on_step(step: int, guests: object) -> None:
        if step == 20:
            broker.request_shed(1, 50)

    result = run_simulation(cfg, links, broker_stats=broker.stats, on_step=on_step)
    g0 = result.guests["guest-0"]
    assert (g0["sheds_answered"], g0["shed_pages_returned"]) == (1, 50)
    assert all(result.guests[f"guest-{i}"]["sheds_answered"] == 0 for i in (1, 2, 3))
    assert g0["swap_disk_reads"] > 0  # shed pages came back from the guest's own swap
    assert result.totals["corrupt_pages"] == 0 and result.totals["swap_lost"] == 0
    # After the resync the guest's ledger is again exactly what the broker holds.
    exp = expected_at_broker(result.models.values())
    st = broker.stats()
    assert (st["logical_pages"], st["unique_pages"], st["zero_pages"]) == (
        exp.logical_pages,
        exp.unique_pages,
        exp.zero_pages,
    )


def test_a_shared_cache_serves_one_guests_pages_to_another(image_tree: Path) -> None:
    private, _ = twin_run(small_config(image_tree))
    shared, broker = twin_run(small_config(image_tree, shared_cache=True))
    assert private.totals["shared_cache_hits"] == 0
    assert shared.totals["shared_cache_hits"] > 0
    assert shared.totals["cache_misses"] < private.totals["cache_misses"]
    assert shared.totals["corrupt_pages"] == 0
    exp = expected_at_broker(shared.models.values())
    st = broker.stats()
    assert (st["logical_pages"], st["unique_pages"], st["zero_pages"]) == (
        exp.logical_pages,
        exp.unique_pages,
        exp.zero_pages,
    )
    assert "shared pool" in what_happened(shared)
