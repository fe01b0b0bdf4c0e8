"""Simulated guests answer shed notices through the agent's notice handling.

The broker's shed policy is not wired to a trigger yet, so the shed is injected through the
in-process NoticeHub of a broker app served by uvicorn (as the agent's own e2e test does).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from guest_agent.sim.agent import close_links, connect_links, create_guests, fetch_stats
from guest_agent.sim.runner import SimConfig, SimGuest, run_simulation
from tests.e2e.brokerproc import ADMIN
from tests.e2e.test_agent_notices import InProcessBroker
from tests.sim.expected import copy_image, expected_at_broker


@pytest.fixture
def inproc(tmp_path: Path) -> Iterator[InProcessBroker]:
    with InProcessBroker(tmp_path / "data") as b:
        yield b


def config(image: Path) -> SimConfig:
    return SimConfig(
        guests=2,
        steps=40,
        ram_pages=128,
        anon_pages=400,
        file_pages=400,
        accesses_per_step=64,
        images=[str(image)],
        notices_every=5,
    )


@pytest.mark.timeout(150)
@pytest.mark.parametrize("live", [False, True])
def test_a_shed_is_answered_acked_and_the_pages_come_back_from_disk(
    inproc: InProcessBroker, tmp_path: Path, live: bool
) -> None:
    image = copy_image(tmp_path / "image", max_files=60, max_bytes=2 << 20)
    created = create_guests(inproc.url, ADMIN, 2)
    shed_guest = created[1][0]
    links = connect_links(inproc.url, [t for _, t in created], live_notices=live)
    seqs: list[int] = []

    def on_step(step: int, guests: Sequence[SimGuest]) -> None:
        if step == 20:
            notice = inproc.run(inproc.service.hub.publish(shed_guest, "shed", pages=25))
            seqs.append(notice.seq)
            if live:  # let the handler thread answer before the next poll counts it
                deadline = time.monotonic() + 30
                while links[1].frontswap.stats["shed_pages"] < 25:
                    assert time.monotonic() < deadline, "shed not answered"
                    time.sleep(0.05)

    try:
        result = run_simulation(
            config(image), links, broker_stats=lambda: fetch_stats(inproc.url, ADMIN),
            on_step=on_step,
        )  # fmt: skip
        stats = fetch_stats(inproc.url, ADMIN)  # before closing: a closed Frontswap drops its pool
    finally:
        close_links(links)
    g0, g1 = result.guests["guest-0"], result.guests["guest-1"]
    assert (g1["sheds_answered"], g1["shed_pages_returned"]) == (1, 25)
    assert g0["sheds_answered"] == 0
    assert g1["swap_disk_reads"] > 0  # some shed pages were faulted back from the fallback
    assert result.totals["corrupt_pages"] == 0 and result.totals["swap_lost"] == 0
    record = next(r for r in inproc.service.repo.notices_after(shed_guest, 0) if r.seq == seqs[0])
    assert record.pages_returned == 25 and record.acked_at is not None
    # After the shed the guests' ledgers still say exactly what the broker holds.
    exp = expected_at_broker(result.models.values())
    assert (stats["logical_pages"], stats["unique_pages"], stats["zero_pages"]) == (
        exp.logical_pages,
        exp.unique_pages,
        exp.zero_pages,
    )
