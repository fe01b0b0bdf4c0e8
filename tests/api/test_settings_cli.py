"""Settings (flags, TMEM_* environment, sizes) and the ``tmem-broker`` commands that need no
running broker (``db upgrade``, refusing bad flags)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import create_engine, inspect
from typer.testing import CliRunner

from broker.cli import app
from broker.settings import Settings, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("1GiB", 1 << 30),
        ("512 MiB", 512 << 20),
        ("64KiB", 64 << 10),
        ("7B", 7),
        ("2gib", 2 << 30),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1GB", "1.5GiB", "-1", "lots", "", "1 PiB"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TMEM_CAPACITY", "2GiB")
    monkeypatch.setenv("TMEM_PORT", "9001")
    monkeypatch.setenv("TMEM_DURABILITY", "none")
    monkeypatch.setenv("TMEM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TMEM_ADMIN_TOKEN", "secret-admin")
    s = Settings()
    assert (s.capacity, s.port, s.durability, s.data_dir) == (2 << 30, 9001, "none", tmp_path)
    assert s.admin_token is not None and s.admin_token.get_secret_value() == "secret-admin"
    assert "secret-admin" not in repr(s)
    assert s.sqlalchemy_url == f"sqlite:///{tmp_path.resolve() / 'broker.sqlite3'}"
    assert Settings(port=1234).port == 1234  # explicit values (flags) win


def test_the_unix_socket_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TMEM_UDS", raising=False)
    assert Settings().uds is None  # TCP only unless asked
    monkeypatch.setenv("TMEM_UDS", str(tmp_path / "broker.sock"))
    assert Settings().uds == tmp_path / "broker.sock"


def test_settings_defaults_match_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("TMEM_HOST", "TMEM_PORT", "TMEM_DATA_DIR", "TMEM_CAPACITY", "TMEM_DURABILITY"):
        monkeypatch.delenv(key, raising=False)
    s = Settings()
    assert (s.host, s.port, str(s.data_dir), s.capacity, s.durability) == (
        "127.0.0.1", 8470, "var", 1 << 30, "sync",
    )  # fmt: skip
    assert s.max_batch_ops == 1024
    assert s.max_batch_bytes == 1024 * (29 + 4096)


@pytest.mark.parametrize(
    "values",
    [
        {"durability": "maybe"},
        {"capacity": "1GB"},
        {"port": 70000},
        {"capacity": "1KiB"},
        {"colour": 1},
    ],
)
def test_settings_refuse_bad_values(values: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(**values)  # type: ignore[arg-type]


def test_db_upgrade_command(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ops.sqlite3'}"
    result = CliRunner().invoke(app, ["db", "upgrade", "--database-url", url])
    assert result.exit_code == 0, result.output
    engine = create_engine(url)
    try:
        assert {"guests", "pools", "notices", "shared_auth", "settings"} <= set(
            inspect(engine).get_table_names()
        )
    finally:
        engine.dispose()


def test_serve_refuses_bad_flags(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["serve", "--capacity", "1GB", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "capacity" in result.output
    assert not (tmp_path / "broker.sqlite3").exists()


def test_admin_without_a_token_says_how_to_give_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TMEM_ADMIN_TOKEN", raising=False)
    result = CliRunner().invoke(app, ["admin", "list", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "TMEM_ADMIN_TOKEN" in result.output
