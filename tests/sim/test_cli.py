from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from guest_agent.sim.cli import pages_of, parse_size, register

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4096", 4096), ("8MiB", 8 << 20), ("512KiB", 512 << 10), ("1GiB", 1 << 30), ("3 b", 3)],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "1x", "MiB", "-1MiB", "1.5MiB"])
def test_parse_size_refuses_nonsense(text: str) -> None:
    with pytest.raises(typer.BadParameter):
        parse_size(text)


def test_pages_round_up() -> None:
    assert pages_of("1") == 1
    assert pages_of("4KiB") == 1
    assert pages_of("4097") == 2


def app() -> typer.Typer:
    a = typer.Typer()

    @a.callback()
    def root() -> None:
        """tmem-agent stand-in."""

    register(a)
    return a


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give --admin-token"),
        (["--admin-token", "x", "--workload", "nope"], "unknown workload"),
        (["--admin-token", "x", "--ram", "64KiB", "--accesses", "100"], "must not exceed"),
        (["--admin-token", "x"], "broker unreachable"),
        (["--tokens", "t1,t2"], "simulate:"),
        (["--admin-token", "x", "--compress", "sometimes"], "unknown compress mode"),
        (["--admin-token", "x", "--domain", "a", "--trusted-domain", "b"], "two domains"),
        (["--tokens", "t1", "--compress", "always"], "--admin-token instead of --tokens"),
        (["--tokens", "t1", "--trusted-domain", "t"], "--admin-token instead of --tokens"),
    ],
)
def test_errors_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    # Port 1 on loopback: nothing listens there, so nothing is created anywhere.
    result = CliRunner().invoke(
        app(), ["simulate", "--broker", "http://127.0.0.1:1", "--steps", "2", *args]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
