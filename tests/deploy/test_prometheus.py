"""The Prometheus configuration in deploy/ parses and refers only to metrics fewstep exports."""

from __future__ import annotations

import re

import httpx
import pytest
import yaml

from tests.conftest import ROOT, Server

pytestmark = pytest.mark.slow  # a `fewstep serve` process

PROM = ROOT / "deploy/prometheus"


def test_scrape_config_loads_the_alert_rules() -> None:
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"] and (PROM / "alerts.yml").is_file()
    assert {job["job_name"] for job in config["scrape_configs"]} == {"fewstep-gateway", "fewstep-worker"}


def test_every_metric_in_the_alert_rules_is_exported(server: Server) -> None:
    rules = [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    assert rules and all({"alert", "expr", "labels", "annotations"} <= set(r) for r in rules)
    httpx.post(server.url + "/v1/images/generations", json={"model": "shapes", "prompt": "a red circle"}, timeout=60)
    # Families are declared by `# TYPE` lines even before a labelled series has a sample.
    text = httpx.get(server.url + "/metrics").text
    base = re.compile(r"_(total|bucket|count|sum)$")
    families = {base.sub("", ln.split()[2]) for ln in text.splitlines() if ln.startswith("# TYPE")}
    named = {base.sub("", m) for r in rules for m in re.findall(r"\bfewstep_\w+", r["expr"])}
    assert named - families == set(), f"alert rules name metrics that do not exist: {named - families}"
