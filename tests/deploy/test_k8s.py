"""The Kubernetes manifests and the Dockerfile: they parse, compose, and name only real commands and settings.

No cluster here: this checks what can drift without one (a renamed subcommand or flag, a setting
that no longer exists, a probe on a path the gateway does not serve, a missing resource file).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from fewstep.cli import parser
from fewstep.service.settings import Settings
from tests.conftest import ROOT

K8S = ROOT / "k8s"
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir())


def documents(folder: Path) -> list[dict[str, Any]]:
    """Every object a kustomization folder builds (resources and overlay patches, not merged)."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    out: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        path = (folder / res).resolve()
        assert path.exists(), f"{folder}: resource {res} does not exist"
        if path.is_dir():
            out += documents(path)
        else:
            out += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kust.get("patches", []):
        assert (folder / patch["path"]).is_file()
    return out


def containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for d in docs:
        spec = d.get("spec", {}).get("template", {}).get("spec", {})
        found += [(d["metadata"]["name"], c) for c in spec.get("containers", [])]
    return found


def known_env() -> set[str]:
    """FEWSTEP_* names the code reads: the settings fields, and the few read directly from the environment."""
    names = {f"FEWSTEP_{name.upper()}" for name in Settings.model_fields}
    for src in (ROOT / "fewstep").rglob("*.py"):
        names |= set(re.findall(r"environ(?:\.get)?\(?\[?\"(FEWSTEP_\w+)\"", src.read_text()))
    return names


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[o.name for o in OVERLAYS])
def test_every_overlay_builds_from_existing_files(overlay: Path) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in documents(overlay)}
    for needed in ("fewstep-gateway", "fewstep-worker", "fewstep-trainer"):
        assert ("Deployment", needed) in kinds
    assert ("StatefulSet", "fewstep-redis") in kinds and ("PersistentVolumeClaim", "fewstep-registry") in kinds


def test_every_fewstep_command_parses_with_the_real_cli() -> None:
    docs = documents(K8S / "base") + documents(K8S / "overlays" / "gpu")
    commands = [c["command"] for _, c in containers(docs) if c.get("command", [""])[0] == "fewstep"]
    assert {cmd[1] for cmd in commands} >= {"serve", "worker", "trainer", "export"}
    for cmd in commands:
        parser().parse_args(cmd[1:])  # exits (fails the test) on an unknown subcommand or flag


def test_every_setting_named_exists() -> None:
    known = known_env()
    config = next(d for d in documents(K8S / "base") if d["kind"] == "ConfigMap")
    named = set(config["data"])
    patch = yaml.safe_load((K8S / "overlays" / "gpu" / "worker-gpu.yaml").read_text())
    named |= {e["name"] for c in patch["spec"]["template"]["spec"]["containers"] for e in c["env"]}
    assert named - known == set(), f"settings that do not exist: {named - known}"
    Settings(**{k.removeprefix("FEWSTEP_").lower(): v for k, v in config["data"].items()})  # values validate


def test_probes_use_the_gateways_health_routes_and_workers_drain_before_they_are_killed() -> None:
    docs = documents(K8S / "base")
    by_name = {name: c for name, c in containers(docs)}
    gw = by_name["fewstep-gateway"]
    assert gw["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz"
    worker = next(d for d in docs if d["metadata"]["name"] == "fewstep-worker" and d["kind"] == "Deployment")
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 60  # the worker drains ≤ 60 s
    for d in docs:
        if d["kind"] == "Deployment":
            assert d["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_dockerfile_pins_cpu_torch_and_runs_unprivileged() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert '"torch==2.13.0"' in text and "--index-url" in text
    assert re.search(r"^USER 10001$", text, re.M) and 'ENTRYPOINT ["fewstep"]' in text
    assert "COPY checkpoints" in text  # the reference models seed an empty registry
