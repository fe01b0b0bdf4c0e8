"""The guest's install: ``pip install tmem-broker`` without extras, in a fresh venv, drives a
real broker (put/get through ``TmemClient``, an NBD export through ``tmem-agent nbd``) and has
none of the broker's server stack; ``tmem-broker`` there says how to add it.

The broker itself runs from the test venv (which has ``[server]``), as on a host.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.entry import INSTALL_HINT, SERVER_MODULES
from tests.e2e.brokerproc import BrokerProcess
from tests.e2e.nbd_support import NbdAgent, new_guest, persistent_pages, run

ROOT = Path(__file__).resolve().parents[2]
# What a wheel of the project is built from; copied so that the build (egg-info, build/) never
# writes into the checkout other test runs read.
SOURCES = ("pyproject.toml", "README.md", "broker", "guest_agent", "schemas")
# Not in the base install: the server extra's packages and the sim extra's matplotlib.
ABSENT = (*SERVER_MODULES, "starlette", "matplotlib")


def _import_names(requirements: list[str]) -> list[str]:
    """``"psycopg[binary]>=3.1,<4"`` -> ``"psycopg"``: a requirement's import name (true of
    every package the server extra lists)."""
    return [re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].replace("-", "_") for req in requirements]


@pytest.mark.timeout(10)
def test_entry_checks_exactly_the_server_extra() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _import_names(extras["optional-dependencies"]["server"]) == list(SERVER_MODULES)
    assert extras["scripts"]["tmem-broker"].startswith("broker.entry:main")
    base = _import_names(extras["dependencies"])
    assert not set(base) & set(ABSENT), base


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A venv holding the project's base install only (a non-editable build of a copy)."""
    tmp = tmp_path_factory.mktemp("agent-alone")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        else:
            shutil.copy2(ROOT / name, src / name)
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    # The pip cache is shared with the suite's own install; only the build backend and the
    # base dependencies are fetched.
    run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(src)],
        timeout=420,
    )
    yield venv
    shutil.rmtree(tmp, ignore_errors=True)


def venv_python(venv: Path, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with the fresh venv's python, from a directory outside the checkout (so
    that the checkout's packages cannot shadow the installed ones)."""
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=venv,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_base_install_has_no_server_stack(fresh_venv: Path) -> None:
    done = venv_python(fresh_venv, "import fastapi")
    assert done.returncode != 0
    assert "No module named 'fastapi'" in done.stderr, done.stderr
    found = venv_python(
        fresh_venv,
        """
        import importlib.util, sys
        print(" ".join(n for n in sys.argv[1:] if importlib.util.find_spec(n) is not None))
        """,
        *ABSENT,
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == [], f"the base install has {found.stdout.strip()}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_agent_module_imports_without_extras(fresh_venv: Path) -> None:
    """Optional dependencies (matplotlib) are imported where they are used, never at a
    module's top, so no agent module needs an extra to load."""
    done = venv_python(
        fresh_venv,
        """
        import importlib, pkgutil
        import guest_agent, schemas
        from guest_agent import TmemClient, Frontswap, Cleancache
        for pkg in (guest_agent, schemas):
            for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                if not mod.name.endswith(".__main__"):  # __main__ runs the command
                    importlib.import_module(mod.name)
        print(guest_agent.__file__)
        """,
    )
    assert done.returncode == 0, done.stderr
    assert str(fresh_venv) in done.stdout, done.stdout  # the installed copy, not the checkout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_agent_cli_runs_and_broker_cli_says_how_to_install(fresh_venv: Path) -> None:
    bin_dir = fresh_venv / "bin"
    helped = run([str(bin_dir / "tmem-agent"), "--help"])
    for command in ("put", "get", "nbd", "simulate"):
        assert command in helped.stdout, helped.stdout
    for args in ([], ["serve"], ["--help"]):
        done = subprocess.run(
            [str(bin_dir / "tmem-broker"), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, (args, done.returncode, done.stdout, done.stderr)
        assert done.stdout == ""
        lines = done.stderr.splitlines()
        assert len(lines) == 1, done.stderr
        assert INSTALL_HINT in lines[0] and "fastapi" in lines[0], lines[0]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_client_put_get_round_trip_against_a_broker(fresh_venv: Path, tmp_path: Path) -> None:
    with BrokerProcess(tmp_path / "broker") as broker:
        guest_id, token = new_guest(broker, "agent-alone-client")
        done = venv_python(
            fresh_venv,
            """
            import sys
            from guest_agent import TmemClient
            url, token = sys.argv[1:]
            page = bytes(range(256)) * 16
            with TmemClient(url, token) as client:
                pool = client.create_pool("persistent")
                assert client.put(pool, 7, 3, page), "put declined"
                assert client.get(pool, 7, 3) == page, "page differs"
                assert client.get(pool, 7, 4) is None, "a miss was not a miss"
            """,
            broker.url,
            token,
        )
        assert done.returncode == 0, done.stderr
        assert persistent_pages(broker, guest_id) == 1  # the broker's side of the round trip


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not shutil.which("qemu-io"), reason="needs qemu-utils (scripts/system-deps.sh)")
def test_nbd_export_from_the_base_install(fresh_venv: Path, tmp_path: Path) -> None:
    with BrokerProcess(tmp_path / "broker") as broker:
        guest_id, token = new_guest(broker, "agent-alone-nbd")
        agent = NbdAgent.for_broker(broker, token, tmp_path, size="16MiB")
        agent.args[0] = str(fresh_venv / "bin" / "tmem-agent")  # the base install's command
        with agent:
            run(["qemu-io", "-f", "raw", agent.uri, "-c", "write -P 0x5a 0 256k", "-c", "flush"])
            out = run(["qemu-io", "-f", "raw", agent.uri, "-c", "read -P 0x5a 0 256k"]).stdout
            assert "fail" not in out.lower() and "read 262144/262144" in out, out
            assert persistent_pages(broker, guest_id) == 64
