"""OpenVINO artifacts are served only as they were checked: every file by its sha256, made from the version's own
weights, an INT8 graph only with a passed gate, and each graph's ports as its manifest names them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from fewstep.artifacts.openvino import artifact_dir, describe, weights_name, xml_name
from fewstep.engines.backends import backend
from fewstep.errors import CheckpointError
from fewstep.models.checkpoint import read_manifest
from fewstep.models.registry import Registry

pytestmark = pytest.mark.slow  # the student is exported and quantized (once per session) first


@pytest.fixture
def student(openvino_exported: Registry, tmp_path: Path) -> Path:
    """A private copy of the exported student version, safe to break."""
    return Path(shutil.copytree(openvino_exported.version_dir("shapes", "1"), tmp_path / "1"))


def _load(folder: Path, precision: str = "fp32") -> object:
    return backend("openvino").image(folder, read_manifest(folder), precision)


def _edit(folder: Path, precision: str, change: Callable[[dict], None]) -> None:
    path = artifact_dir(folder, precision) / "manifest.json"
    art = json.loads(path.read_text())
    change(art)
    path.write_text(json.dumps(art))


def test_the_exported_graphs_load_in_both_precisions(student: Path) -> None:
    assert callable(_load(student, "fp32")) and callable(_load(student, "int8"))
    with pytest.raises(CheckpointError, match="not 'fp8'"):
        _load(student, "fp8")


@pytest.mark.parametrize("name", ["xml", "weights"])
def test_a_changed_file_is_refused(student: Path, name: str) -> None:
    path = artifact_dir(student, "fp32") / (xml_name("denoiser") if name == "xml" else weights_name("denoiser"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        _load(student)


def test_graphs_made_from_other_weights_are_refused(student: Path) -> None:
    _edit(student, "fp32", lambda art: art["source"].update(sha256="0" * 64))
    with pytest.raises(CheckpointError, match="other weights"):
        _load(student)


def test_an_int8_graph_whose_gate_failed_is_refused(student: Path) -> None:
    _edit(student, "int8", lambda art: art["gate"].update(passed=False))
    with pytest.raises(CheckpointError, match="quality gate"):
        _load(student, "int8")


def test_a_linked_or_escaping_file_is_refused(student: Path, tmp_path: Path) -> None:
    weights = artifact_dir(student, "fp32") / weights_name("denoiser")
    outside = tmp_path / "elsewhere"
    shutil.move(weights, outside)
    weights.symlink_to(outside)
    with pytest.raises(CheckpointError, match="missing"):
        _load(student)
    _edit(student, "fp32", lambda art: art["graphs"]["denoiser"]["xml"].update(file="../../manifest.json"))
    with pytest.raises(CheckpointError, match="unsafe"):
        _load(student)


def test_ports_other_than_the_manifests_are_refused(student: Path) -> None:
    _edit(student, "fp32", lambda art: art["graphs"]["denoiser"].update(inputs=["x", "t", "states", "attention"]))
    with pytest.raises(CheckpointError, match="ports"):
        _load(student)


def test_a_version_without_the_artifact_says_what_to_run(tmp_path: Path, checkpoints: Path) -> None:
    folder = Path(shutil.copytree(checkpoints / "shapes", tmp_path / "plain"))
    with pytest.raises(CheckpointError, match="fewstep export --openvino"):
        _load(folder)
    with pytest.raises(CheckpointError, match="fewstep export --openvino"):
        describe(folder, "int8")
