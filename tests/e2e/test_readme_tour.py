"""The README's curl tour, run verbatim against a real ``tmem-broker serve`` process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.brokerproc import dies_with_us, free_port

ROOT = Path(__file__).resolve().parents[2]
TOUR = re.compile(r"<!-- tour:begin -->\s*```sh\n(.*?)```\s*<!-- tour:end -->", re.DOTALL)


def tour_script() -> str:
    match = TOUR.search((ROOT / "README.md").read_text(encoding="utf-8"))
    assert match, "README.md lost its tour block (<!-- tour:begin --> ... <!-- tour:end -->)"
    return match.group(1)


def broker_command() -> list[str]:
    script = Path(sys.executable).with_name("tmem-broker")
    return [str(script)] if script.exists() else [sys.executable, "-m", "broker.cli"]


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the broker exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise AssertionError("the broker did not become ready")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """A broker started the way the README says (data dir ./var), in tmp_path."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TMEM_")}
    log_path = tmp_path / "broker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            dies_with_us([*broker_command(), "serve", "--port", str(port)]),
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, proc)
            yield url, tmp_path, log_path
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.mark.timeout(120)
def test_readme_tour(broker: tuple[str, Path, Path]) -> None:
    url, workdir, log_path = broker
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", tour_script()],
        cwd=workdir,
        env={**os.environ, "BROKER": url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert "got the same page back" in out
    assert "statuses: 0 0 1 bytes: 4099" in out
    stats = json.loads(out[-1])
    assert stats["logical_pages"] == 2  # index 0 and index 1 of oid 42
    assert stats["unique_pages"] == 1  # the same content, stored once
    assert stats["used_bytes"] == 4096
    assert stats["puts"] == 2
    assert stats["get_hits"] == 2
    admin_token = (workdir / "var" / "admin-token").read_text().strip()
    log = log_path.read_text(errors="replace")
    assert "admin-token" in log  # the path was printed ...
    assert admin_token not in log  # ... never the token


def admin_token_of(workdir: Path) -> str:
    return (workdir / "var" / "admin-token").read_text().strip()


@pytest.mark.timeout(120)
def test_admin_cli_against_the_running_broker(broker: tuple[str, Path, Path]) -> None:
    from typer.testing import CliRunner

    from broker.cli import app

    url, workdir, log_path = broker
    common = ["--url", url, "--data-dir", str(workdir / "var")]
    runner = CliRunner(env={"TMEM_ADMIN_TOKEN": "", "COLUMNS": "200"})

    def run(*args: str) -> str:
        result = runner.invoke(app, ["admin", *args, *common])
        assert result.exit_code == 0, result.output
        return result.output

    created = run("create-guest", "cli-vm", "--cap-pages", "10", "--weight", "5")
    token = re.search(r"token \(shown once\): (\S+)", created)
    assert token is not None
    assert "cli-vm" in run("list")
    assert "cap_pages" in run("show", "1")
    run("freeze", "1")
    assert "yes" in run("list")  # the frozen column
    run("thaw", "1")
    run("flush", "1")
    assert "nothing to shed" in run("shed", "1", "--pages", "3", "--deadline", "5")
    assert runner.invoke(app, ["admin", "shed", "1", "--pages", "0", *common]).exit_code == 2
    run("shared-auth", "6f1d3a2e-1b7c-4e55-9d1a-0e8f2c3b4a5d", "1")
    assert "logical_pages" in run("stats")
    # compression and dedup domains (issue #16): a guest that inherits, a domain's settings
    run("create-guest", "cli-img", "--dedup-domain", "tenant", "--compress", "on")
    shown = run("set-domain", "tenant", "--trusted", "--compress", "pressure")
    assert "pressure" in shown and "keep their own compress setting" in shown
    assert "tenant" in run("domains")
    assert re.search(r"compress_mode\W+pressure", run("set-guest", "2", "--compress", "inherit"))
    run("set-compress", "always")
    assert runner.invoke(app, ["admin", "set-compress", "sometimes", *common]).exit_code == 2
    listed = json.loads(
        urllib.request.urlopen(
            urllib.request.Request(
                f"{url}/v1/domains", headers={"Authorization": f"Bearer {admin_token_of(workdir)}"}
            ),
            timeout=10,
        ).read()
    )
    (tenant,) = [d for d in listed if d["name"] == "tenant"]
    assert tenant["trusted"] is True and tenant["compress"] == "pressure"
    run("delete", "2")
    request = urllib.request.Request(
        f"{url}/v1/notices", headers={"Authorization": f"Bearer {token.group(1)}"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        assert [n["type"] for n in json.loads(r.read())] == ["freeze", "thaw"]
    # The WebSocket with the token in the query: its first frames are the backlog, and the
    # token must not reach uvicorn's log lines.
    from websockets.sync.client import connect

    ws_url = url.replace("http://", "ws://") + f"/v1/notices/ws?after=1&token={token.group(1)}"
    with connect(ws_url, open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "thaw"
    run("delete", "1")
    time.sleep(0.2)  # let the broker write its log lines
    log = log_path.read_text(errors="replace")
    assert "token=<redacted>" in log  # uvicorn logged the WebSocket's path, redacted
    assert token.group(1) not in log
    failed = runner.invoke(app, ["admin", "show", "1", *common])
    assert failed.exit_code == 1
    assert "unknown_guest" in failed.output
