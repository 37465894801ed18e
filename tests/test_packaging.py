"""Packaging: a plain install serves, extras add roles, `gpu` does not also pull the CPU ONNX Runtime, the
lock file pins what the image installs, the lower bounds admit only versions with the features we use."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import CHECKPOINTS, ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
TRAIN_OR_EXPORT_ONLY = {
    "onnx",
    "onnxruntime",
    "onnxscript",
    "matplotlib",
    "tensorrt",
    "onnxruntime-gpu",
    "openvino",
    "nncf",
}


def names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name for r in requirements}


def test_a_plain_install_carries_no_training_export_or_gpu_packages() -> None:
    assert names(PROJECT["dependencies"]) & TRAIN_OR_EXPORT_ONLY == set()
    extras = PROJECT["optional-dependencies"]
    assert {"onnx", "openvino", "export", "train", "gpu", "dev"} <= set(extras)
    assert "matplotlib" in names(extras["train"]) and {"onnxscript", "onnxruntime"} <= names(extras["export"])
    assert {"openvino", "nncf"} <= names(extras["openvino"])


def test_the_gpu_extra_brings_the_cuda_runtime_and_not_the_cpu_one() -> None:
    gpu = names(PROJECT["optional-dependencies"]["gpu"])
    assert "onnxruntime-gpu" in gpu and "tensorrt" in gpu
    assert "onnxruntime" not in gpu and "onnxruntime" not in names(PROJECT["dependencies"])


@pytest.mark.parametrize(("package", "needed"), [("uvicorn", "0.35"), ("pydantic-settings", "2.7")])
def test_lower_bounds_admit_only_versions_with_what_the_code_uses(package: str, needed: str) -> None:
    (req,) = [Requirement(r) for r in PROJECT["dependencies"] if Requirement(r).name == package]
    older = (*Version(needed).release[:-1], Version(needed).release[-1] - 1)
    assert req.specifier.contains(needed) and not req.specifier.contains(".".join(map(str, older)))


def test_the_lock_pins_every_runtime_dependency_and_the_image_installs_from_it() -> None:
    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            lock[req.name.lower().replace("_", "-")] = spec.version
    for dep in PROJECT["dependencies"]:
        req = Requirement(dep)
        if req.name == "torch":
            continue  # pinned exactly in pyproject; the image takes it from the CPU or CUDA index
        key = req.name.lower().replace("_", "-")
        assert key in lock, f"{req.name} is not in requirements.lock"
        assert req.specifier.contains(lock[key]), f"{req.name}=={lock[key]} does not satisfy {req.specifier}"
    assert not set(lock) & TRAIN_OR_EXPORT_ONLY
    docker = (ROOT / "Dockerfile").read_text()
    assert "-r requirements.lock" in docker and "--no-deps" in docker


def test_the_license_file_is_the_one_the_metadata_names() -> None:
    assert PROJECT["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text[:200] and "Version 2.0, January 2004" in text[:200]


BLOCKED = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` fails and find_spec says absent, as without the package
"""

SERVE = """
import asyncio, pathlib, tempfile
from tests.service.gateway import in_process, settings

async def main():
    tmp = pathlib.Path(tempfile.mkdtemp())
    config = settings(tmp, checkpoints=pathlib.Path({checkpoints!r}), engine="registry", video_max_sessions=1)
    async with in_process(config, ready_within=300) as c:
        r = await c.post("/v1/images/generations", json={{"model": "shapes", "prompt": "a red circle", "steps": 2}})
        assert r.status_code == 200, r.text
        models = {{m["id"] for m in (await c.get("/v1/models")).json()["data"]}}
        assert {{"shapes", "shapes-video"}} <= models, models
        assert (await c.get("/")).status_code == 200
    print("served")

asyncio.run(main())
"""


@pytest.mark.slow
def test_the_shipped_models_serve_without_any_extra(tmp_path: Path) -> None:
    """The gateway, its workers and both shipped models, with every extra-only package unimportable."""
    script = BLOCKED.format(blocked=sorted(m.replace("-gpu", "") for m in TRAIN_OR_EXPORT_ONLY)) + SERVE.format(
        checkpoints=str(CHECKPOINTS)
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "served" in out.stdout, out.stdout[-3000:] + out.stderr[-5000:]


def test_a_role_whose_extra_is_missing_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from fewstep.cli import main

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as in a plain install
    with pytest.raises(SystemExit) as done:
        main(["export", "shapes"])
    assert done.value.code == 2 and "pip install 'fewstep[export]'" in capsys.readouterr().err
