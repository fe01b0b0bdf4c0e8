"""``simulate --compress`` and ``--trusted-domain`` against a real broker process: the guests
get the setting asked for, the domain is set first, and the report carries the broker's real
compression ratio."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from guest_agent.admin import AdminClient
from guest_agent.sim.cli import print_result, run_against_broker
from guest_agent.sim.errors import SimError, WorkloadError
from guest_agent.sim.report import broker_lines
from guest_agent.sim.runner import SimConfig, SimResult
from tests.e2e.brokerproc import ADMIN, BrokerProcess

from .expected import small_config

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    with BrokerProcess(tmp_path / "broker", durability="none", capacity="64MiB") as b:
        yield b


def run(broker: BrokerProcess, config: SimConfig) -> SimResult:
    return run_against_broker(config, broker.url, admin_token=ADMIN, progress=False)


def modes(result: SimResult) -> set[tuple[object, object]]:
    return {(s["compress"], s["compress_mode"]) for s in result.self_stats.values()}


def test_always_in_a_trusted_domain_compresses_and_shares(
    broker: BrokerProcess, image_tree: Path
) -> None:
    config = small_config(image_tree, compress="always", dedup_domain="tenant-a")
    config.trusted_domain = True
    result = run(broker, config)
    assert modes(result) == {(True, "always")}
    assert result.domain is not None
    assert (result.domain["name"], result.domain["trusted"], result.domain["guests"]) == (
        "tenant-a",
        True,
        config.guests,
    )
    st = result.broker_stats
    assert st is not None
    # real contents: the structured records and many library pages compress
    assert st["compression_ratio"] > 1.2
    assert st["used_bytes"] < st["charged_bytes"]
    # trusted: a shared content counts once, so what is counted is what is held
    assert st["counted_bytes"] == st["used_bytes"]
    assert result.totals["corrupt_pages"] == result.totals["swap_lost"] == 0
    lines = dict(broker_lines(result))
    assert lines["compression ratio"] == f"{st['compression_ratio']:.2f}"
    assert lines["guests compress"] == "mode always (their own setting); domain tenant-a, trusted"
    with AdminClient(broker.url, ADMIN) as admin:
        assert admin.list_guests() == []  # the created guests are gone again


def test_never_stores_raw_and_untrusted_counts_each_charge(
    broker: BrokerProcess, image_tree: Path
) -> None:
    result = run(broker, small_config(image_tree, compress="never"))
    assert modes(result) == {(False, "never")}
    st = result.broker_stats
    assert st is not None
    assert st["compression_ratio"] == 1.0
    assert st["counted_bytes"] == st["charged_bytes"] > st["used_bytes"]  # dedup, uncounted
    assert result.domain is not None and result.domain["trusted"] is False


def test_pressure_is_set_on_the_guests_domain_and_inherit_leaves_it_unset(
    broker: BrokerProcess, image_tree: Path
) -> None:
    result = run(broker, small_config(image_tree, compress="pressure"))
    assert result.config.dedup_domain == "sim-pressure"  # not the default domain's mode
    assert modes(result) == {(None, "pressure")}
    assert result.domain is not None and result.domain["compress"] == "pressure"
    assert dict(broker_lines(result))["guests compress"] == (
        "mode pressure (their domain's); domain sim-pressure, untrusted"
    )
    with AdminClient(broker.url, ADMIN) as admin:
        admin.patch_settings(compress="always")
        default = {d.name: d for d in admin.domains()}.get("default")
        # the simulation left the default domain alone (listed only once a guest is in it)
        assert default is None or default.compress is None
    inherit = run(broker, small_config(image_tree, compress="inherit"))
    assert modes(inherit) == {(None, "always")}  # the broker's default, changed above
    assert inherit.broker_stats is not None and inherit.broker_stats["compression_ratio"] > 1.2
    out = Console(width=200, record=True)
    print_result(inherit, out)
    assert "compression ratio" in out.export_text()


def test_settings_for_created_guests_are_refused_with_existing_tokens(
    image_tree: Path,
) -> None:
    config = small_config(image_tree, compress="always")
    with pytest.raises(SimError, match="--admin-token instead of --tokens"):
        run_against_broker(config, "http://127.0.0.1:1", tokens=["t"], progress=False)
    with pytest.raises(WorkloadError, match="unknown compress mode"):
        small_config(image_tree, compress="sometimes").validate()
