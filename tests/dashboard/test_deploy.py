"""deploy/: the Prometheus alert rules (``promtool check rules`` and their promtool unit test)
and the Grafana dashboard (valid JSON, a layout that fits, PromQL that parses, and, once the
typed exposition of docs/metrics.md is there, only metric names a live broker exports)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import ADMIN, page, page_url
from tests.harden.conftest import new_guest, new_pool

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "tmem-alerts.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "tmem-alerts.test.yml"
SCRAPE = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana" / "tmem-broker.json"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="needs promtool (Debian's prometheus package; make system-deps)"
)
_METRIC = re.compile(r"\b(tmem_[a-z0-9_]+)\b")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=RULES.parent
    )


def panels() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(GRAFANA.read_text())["panels"]
    return found


def grafana_exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p.get("targets") or []]


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


@needs_promtool
def test_the_alert_rules_check_and_pass_their_unit_test() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout
    tested = promtool("test", "rules", str(RULES_TEST))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = {
        rule["alert"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    }
    assert alerts == {
        "TmemBrokerDown",
        "TmemBrokerNotReady",
        "TmemStorageAboveHighWatermark",
        "TmemShedsOverdue",
        "TmemCapacityDeclinesRising",
    }
    unit = yaml.safe_load(RULES_TEST.read_text())
    fired = {
        case["alertname"]
        for test in unit["tests"]
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert fired == alerts  # every alert is seen firing, not only staying quiet


def test_the_grafana_dashboard_fits_its_grid() -> None:
    board = json.loads(GRAFANA.read_text())
    assert board["uid"] == "tmem-broker" and board["schemaVersion"] >= 36
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels():
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, p["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
        if p["type"] != "row":
            assert p.get("targets"), p["title"]
            assert all(
                t["expr"] and t["datasource"]["uid"] == "${datasource}" for t in p["targets"]
            )
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "job", "instance"}


@needs_promtool
def test_the_scrape_config_checks_and_sends_the_admin_token(tmp_path: Path) -> None:
    config = yaml.safe_load(SCRAPE.read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "tmem-broker"  # what TmemBrokerDown selects
    assert job["authorization"]["type"] == "Bearer"
    # promtool wants the credentials file to exist: point it at one in tmp_path
    token = tmp_path / "tmem-admin-token"
    token.write_text("token\n")
    job["authorization"]["credentials_file"] = str(token)
    config["rule_files"] = [str(RULES)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    checked = promtool("check", "config", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_promtool
def test_every_grafana_query_parses(tmp_path: Path) -> None:
    # promtool parses PromQL only inside rules: each query becomes a recording rule, with
    # Grafana's variables replaced by what they stand for.
    rules = [
        {
            "record": f"tmem_dashboard:query_{i}",
            "expr": expr.replace("$__rate_interval", "5m")
            .replace("$job", ".+")
            .replace("$instance", ".+"),
        }
        for i, expr in enumerate(grafana_exprs())
    ]
    path = tmp_path / "grafana-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "grafana", "rules": rules}]}))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout


def test_every_metric_named_is_exported(client: TestClient) -> None:
    _, a = new_guest(client, "a", cap_pages=100)  # an unbounded quota has no sample
    pool = new_pool(client, a)
    assert client.put(page_url(pool, 1, 0), content=page(1), headers=a).status_code == 204
    exposition = client.get("/metrics", headers=ADMIN).text  # as deploy/ scrapes it
    samples = {
        sample.name
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }
    if "tmem_request_duration_seconds_bucket" not in samples:
        pytest.skip("the typed exposition of docs/metrics.md ([reshape] metrics) has not landed")
    named = {m for expr in rule_exprs() + grafana_exprs() for m in _METRIC.findall(expr)}
    assert named - samples == set(), "metrics the rules or the Grafana dashboard name"
