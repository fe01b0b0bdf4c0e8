"""``tmem-agent nbd`` argument parsing and its registration on the agent's CLI."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from guest_agent.nbd.cli import parse_listen, parse_size, register

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("64MiB", 64 << 20), ("1GiB", 1 << 30), ("2g", 2 << 30), ("8 KiB", 8192)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "1.5GiB", "12 parsecs", "-1"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:10809") == ("127.0.0.1", 10809)
    assert parse_listen("[::1]:5") == ("::1", 5)
    assert parse_listen(":7") == ("127.0.0.1", 7)
    with pytest.raises(ValueError):
        parse_listen("localhost")


def test_nbd_is_a_tmem_agent_command() -> None:
    from guest_agent import cli

    assert "guest_agent.nbd.cli" in cli.SUBCOMMAND_MODULES
    app = typer.Typer()
    app.command("noop")(lambda: None)  # a second command, so typer keeps subcommand names
    register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["nbd", "--help"])
    assert result.exit_code == 0
    assert "--fallback" in result.output
    # without a broker (or --memory) the command refuses to start
    result = runner.invoke(app, ["nbd", "--size", "1MiB", "--listen", "127.0.0.1:0"])
    assert result.exit_code == 2
