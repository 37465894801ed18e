"""Observability as shipped: the alert rules and the Grafana dashboard name only metrics fewstep exports, in
valid PromQL (checked by the real `promtool`), and the rules' unit tests pass. A real Prometheus scraping
a running gateway and workers is in `test_local.py` (on the local stack, to start no second one)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.core import Metric

from fewstep.service.metrics import Metrics, QueueCollector
from fewstep.service.queue.base import QueueStats
from tests.conftest import ROOT

PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "fewstep.json"
needs_promtool = pytest.mark.slow
"""Tests that run the real `promtool`: the slow layer, whose `make test` installs it (`make test-fast` installs
nothing beyond the venv)."""
SUFFIX = re.compile(r"_(total|bucket|count|sum|info)$")


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: `make test` installs Debian's prometheus package"
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def families() -> list[Metric]:
    """Every metric family a gateway or worker exports (the queue's read from a stub at scrape time)."""
    stats = QueueStats(depth={"interactive": 0}, in_flight=0, oldest_age_s=0, dead=0, reclaims=0, retries=0, workers=0)
    return [*Metrics().registry.collect(), *QueueCollector(lambda: stats).collect()]


def exported() -> set[str]:
    """Their names without the sample suffixes."""
    return {SUFFIX.sub("", f.name) for f in families()}


def named(expr: str) -> set[str]:
    return {SUFFIX.sub("", m) for m in re.findall(r"\bfewstep_\w+", expr)}


def rules() -> list[dict]:  # type: ignore[type-arg]
    return [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


@needs_promtool
def test_promtool_accepts_the_config_and_rules_and_the_rule_unit_tests_pass() -> None:
    for args in (
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts.test.yml"),
    ):
        out = promtool(*args)
        assert out.returncode == 0, out.stdout + out.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROM / "alerts.test.yml").read_text()))
    must = {
        "FewstepQueueBacklog",
        "FewstepServerErrors",
        "FewstepNoWorkers",
        "FewstepVideoLateFrames",
        "FewstepVersionRefused",
    }
    assert must <= tested and tested <= {r["alert"] for r in rules()}


@needs_promtool
def test_promtool_fails_a_rule_whose_threshold_is_wrong(tmp_path: Path) -> None:
    """Negative control: the unit tests can fail (a backlog alert at 10 minutes instead of 2)."""
    shutil.copy(PROM / "alerts.test.yml", tmp_path)
    (tmp_path / "alerts.yml").write_text(
        (PROM / "alerts.yml").read_text().replace("oldest_age_seconds) > 120", "oldest_age_seconds) > 600")
    )
    assert promtool("test", "rules", "alerts.test.yml", cwd=tmp_path).returncode != 0


def test_every_metric_named_in_rules_and_dashboard_is_exported() -> None:
    known = exported()
    assert "fewstep_build" in known and "fewstep_queue_depth" in known
    in_rules = set().union(*(named(r["expr"]) for r in rules()))
    in_dash = set().union(*(named(e) for _, e in dashboard_exprs()))
    assert in_rules - known == set(), f"alert rules name metrics that do not exist: {in_rules - known}"
    assert in_dash - known == set(), f"the dashboard names metrics that do not exist: {in_dash - known}"


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel's query (as a recording rule), with Grafana's variables filled in."""
    dash = json.loads(DASHBOARD.read_text())
    assert {"latency", "throughput", "queue", "batch", "video", "version", "refus"} <= {
        w
        for p in dash["panels"]
        for w in ("latency", "throughput", "queue", "batch", "video", "version", "refus")
        if w in (p["title"] + p["description"]).lower()
    }
    filled = [(t, e.replace("$__rate_interval", "5m").replace("$model", ".*")) for t, e in dashboard_exprs()]
    groups = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:panel_{i}", "expr": e} for i, (_, e) in enumerate(filled)],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(groups))
    out = promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    path.write_text(
        yaml.safe_dump(
            {"groups": [{"name": "bad", "rules": [{"record": "x", "expr": "sum(rate(fewstep_images_total[5m])"}]}]}
        )
    )
    assert promtool("check", "rules", str(path)).returncode != 0  # the check does refuse bad PromQL


def test_the_runbook_catalogues_every_metric_and_every_alert() -> None:
    runbook = (ROOT / "docs" / "operations.md").read_text()
    for f in families():
        assert f"`{f.name}" in runbook, f"docs/operations.md does not describe {f.name}"
    for r in rules():
        assert f"`{r['alert']}`" in runbook, f"docs/operations.md says nothing about {r['alert']}"
