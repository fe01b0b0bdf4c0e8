"""The side-by-side benchmarks still run: tiny ``--quick`` configurations, no figure checked
against a time (benchmarks are not tests), only that each section produced its rows."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_all(tmp_path: Path, *args: str, timeout: float = 160) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.run_all", "--json", str(tmp_path / "out.json"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


needs_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


@needs_redis
@pytest.mark.timeout(420)
@pytest.mark.parametrize(
    ("only", "measures"),
    [
        ("a", {"put one page", "get one page"}),
        ("b,c", {"put_many 256 pages", "get_many 256 pages", "put_many 256, durability sync"}),
        ("e,f", {"overhead per stored 4 KiB page"}),
        (
            "g",
            {
                "pages held: TMEM_COMPRESS=pressure + trusted domain",
                "guest faults served by the broker: pressure + trusted",
                "persistent pages lost, all 4 configurations",
            },
        ),
        (
            "h",
            {
                "Redis bytes per unique page per copy",
                "one image through 3 brokers",
                "durable batch 256, ClusterEngine",
            },
        ),
    ],
)
def test_sections_run_and_write_their_figures(
    tmp_path: Path, only: str, measures: set[str]
) -> None:
    # a loaded machine slows the sections several-fold (h starts 6 Redis nodes and 3 brokers
    # and ran 160 s at load 14); the bound only stops a hang
    done = run_all(tmp_path, "--quick", "--only", only, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["sections"] == only.split(",")
    assert report["machine"]["nproc"] >= 1
    rows = report["rows"]
    assert {r["section"] for r in rows} == set(only.split(","))
    names = {r["measure"].split(" (")[0] for r in rows}
    assert measures <= names, names
    for r in rows:
        if r["unit"] in ("pages lost", "changes"):  # counts that must be 0, against nothing
            assert (r["broker"], r["met"]) == (0, True), r
        else:
            assert r["broker"] > 0 and r["baseline"] > 0, r
    assert "tmem broker vs baselines" in done.stdout  # the table was printed


@pytest.mark.skipif(
    not (shutil.which("nbdkit") and shutil.which("fio")), reason="nbdkit or fio missing"
)
@pytest.mark.timeout(170)
def test_nbd_section_runs(tmp_path: Path) -> None:
    done = run_all(tmp_path, "--quick", "--only", "d")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    paths = ("broker export, unix socket", "agent on the broker's unix socket", "agent over tcp")
    iops = {f"fio 4k {rw} qd{d} ({path})" for rw in ("randwrite", "randread") for d in (1, 32)
            for path in paths}  # fmt: skip
    p99 = {f"fio 4k {rw} qd1 p99 latency ({path})" for rw in ("randwrite", "randread")
           for path in paths}  # fmt: skip
    assert {r["measure"] for r in rows} == iops | p99
    aims = {r["measure"]: r["aim"] for r in rows}
    assert aims["fio 4k randread qd32 (broker export, unix socket)"] == ">= 0.8x"
    assert aims["fio 4k randread qd1 (broker export, unix socket)"] == ">= 0.5x"
    assert aims["fio 4k randread qd32 (agent over tcp)"] == ""
    against = {r["measure"]: r["baseline_name"] for r in rows}
    assert against["fio 4k randread qd1 (broker export, unix socket)"] == "nbdkit memory (unix)"
    assert against["fio 4k randread qd1 (agent over tcp)"] == "nbdkit memory (tcp)"
    assert all(r["broker"] > 0 and r["baseline"] > 0 for r in rows)


def test_a_and_b_compare_with_hiredis_and_plain_redis_py(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    done = run_all(tmp_path, "--quick", "--only", "b")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["machine"]["hiredis"] is True  # redis[hiredis] is in the test extras
    against = {(r["measure"], r["baseline_name"]): r["aim"] for r in report["rows"]}
    assert against[("get_many 256 pages", "redis-py+hiredis MGET")] == ">= 1x"
    assert against[("get_many 256 pages", "plain redis-py MGET")] == ""


def test_unknown_section_is_refused(tmp_path: Path) -> None:
    done = run_all(tmp_path, "--only", "a,z")
    assert done.returncode == 2
    assert "unknown section" in done.stderr
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("item", ["TMEM_COMPRESS=always", "PERSISTENT_SHARE=0.9", "TMEM_X"])
def test_capacity_bench_refuses_a_broker_setting_it_cannot_pass(tmp_path: Path, item: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.capacity_bench", "--quick", "--broker-env", item,
         "--json", str(tmp_path / "out.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "give TMEM_NAME=VALUE" in done.stderr
    assert not (tmp_path / "out.json").exists()
