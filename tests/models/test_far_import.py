"""`fewstep import` of AnyFlow FAR students: an `AnyFlowFARPipeline` folder becomes a `diffusers-causal-video`
version of family `anyflow-far` (detected from the pipeline class), its components copied and hashed as they are,
the chunk partition, step counts, frame and stream bound in its manifest; wrong classes, sizes, partitions, step
counts and weights are refused with nothing written."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from fewstep.cli import main
from fewstep.errors import CheckpointError
from fewstep.models.anyflow_far import FARFamily
from fewstep.models.checkpoint import sha256_file
from fewstep.models.importing import import_far, import_pipeline
from fewstep.models.registry import Registry

pytestmark = pytest.mark.slow  # builds the tiny AnyFlowFARPipeline (UMT5, the Wan VAE) and imports it

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.anyflow import anyflow_far

    return anyflow_far(tmp_path_factory.mktemp("anyflow") / "far", chunk_partition=(1, 2, 1, 2), full_chunk_limit=2)


def test_a_far_pipeline_is_imported_as_it_is(src: Path, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    name, version = import_far(src, "far", registry, size=(64, 32), max_tokens=16)
    manifest = registry.validate(name, version)  # every file hash-checked again
    assert manifest["kind"] == "diffusers-causal-video" and registry.promoted(name) == version
    family = FARFamily.from_dict(manifest["causal"])
    assert (family.name, family.chunk_partition, family.full_chunk_limit) == ("anyflow-far", (1, 2, 1, 2), 2)
    assert (family.step_counts, family.default_steps) == (tuple(range(1, 9)), 4)
    assert manifest["video"] == {
        "height": 32, "width": 64, "fps": 16, "max_frames": 6,
        "latent": {"channels": 16, "spatial": 8, "temporal": 4, "patch": [1, 2, 2]},
    }  # fmt: skip
    assert manifest["text"] == {"max_tokens": 16, "lengths": [16]}
    assert manifest["pipeline"]["class"] == "AnyFlowFARPipeline"
    assert manifest["pipeline"]["components"]["transformer"] == "AnyFlowFARTransformer3DModel"
    folder = registry.version_dir(name, version)
    assert sha256_file(folder / WEIGHTS) == sha256_file(src / WEIGHTS)
    assert json.loads((folder / "scheduler/scheduler_config.json").read_text())["_class_name"] == (
        "FlowMapEulerDiscreteScheduler"
    )


def test_served_step_counts_may_be_chosen(src: Path, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    for steps, default in (([2, 1, 4], 4), ([1, 2], 2)):
        name, version = import_far(src, "far", registry, size=(32, 32), steps=steps)
        causal = registry.manifest(name, version)["causal"]
        assert (causal["step_counts"], causal["default_steps"]) == (sorted(steps), default)


def _edit(rel: str, change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = json.loads((folder / rel).read_text())
        change(data)
        (folder / rel).write_text(json.dumps(data))

    return damage


def _fewer_layers(folder: Path) -> None:
    path = folder / WEIGHTS
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("blocks.1.")}
    save_file(state, str(path))


REFUSALS: dict[str, tuple[Callable[[Path], None], dict[str, Any], str]] = {
    "a side not a multiple of the compressed patch": (
        lambda f: None, {"size": (48, 32)},
        "--size: the width must be a multiple of 32 (the VAE's 8 × the compressed patch 4). Given: 48",
    ),
    "the native size on a tiny RoPE table": (lambda f: None, {"size": None}, "Given: 832"),
    "a step count past the bound": (
        lambda f: None, {"steps": [1, 17]}, "`step_counts` must list integers from 1 to 16"
    ),
    "a repeated step count": (lambda f: None, {"steps": [2, 2]}, "--steps must not repeat a count"),
    "another pipeline": (
        _edit("model_index.json", lambda i: i.update(_class_name="WanPipeline")), {},
        "an AnyFlow FAR student is an AnyFlowFARPipeline folder. Given: 'WanPipeline'",
    ),
    "another transformer class": (
        _edit("model_index.json", lambda i: i.update(transformer=["diffusers", "WanTransformer3DModel"])), {},
        "transformer class 'WanTransformer3DModel' is not supported; supported: ['AnyFlowFARTransformer3DModel']",
    ),
    "another scheduler": (
        _edit("scheduler/scheduler_config.json", lambda c: c.update(_class_name="UniPCMultistepScheduler")), {},
        "scheduler must be FlowMapEulerDiscreteScheduler (the flow map's sampler)",
    ),
    "a partition past the RoPE table": (
        _edit("transformer/config.json", lambda c: c.update(chunk_partition=[1, 16, 16])), {},
        "`chunk_partition` sums to 33 latent frames, more than the RoPE table's 32",
    ),
    "an empty chunk": (
        _edit("transformer/config.json", lambda c: c.update(chunk_partition=[1, 0, 2])), {},
        "`chunk_partition` must list integers from 1 to 64",
    ),
    "a compressed patch finer than the patch": (
        _edit("transformer/config.json", lambda c: c.update(compressed_patch_size=[1, 3, 3])), {},
        "`compressed_patch_size` must be [1, c, c] with c 1, 2, 4 or 8, a multiple of the patch",
    ),
    "weights that do not fit the config": (_fewer_layers, {}, "the student does not fit the transformer config"),
    "a missing component": (
        _edit("model_index.json", lambda i: i.pop("vae")), {}, "the pipeline lacks vae; a AnyFlowFARPipeline needs"
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_imports_are_refused_with_nothing_written(src: Path, tmp_path: Path, case: str) -> None:
    damage, changes, needle = REFUSALS[case]
    folder = tmp_path / "far"
    shutil.copytree(src, folder)
    damage(folder)
    registry = Registry(tmp_path / "registry")
    with pytest.raises(CheckpointError) as refused:
        import_far(folder, "victim", registry, **{"size": (32, 32), **changes})
    assert needle in str(refused.value), refused.value
    assert registry.versions("victim") == [] and not (tmp_path / "registry" / "victim").exists()


def test_the_image_import_points_at_the_far_import(src: Path, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    with pytest.raises(CheckpointError, match=r"causal video student of its own \(family anyflow-far\)"):
        import_pipeline(src, "far", registry)
    assert registry.versions("far") == []


def test_the_command_reads_a_far_folder_by_its_class(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = str(tmp_path / "registry")
    args = ["import", str(src), "--name", "far", "--size", "32x64", "--registry", reg]
    assert main([*args, "--max-frames", "3"]) == 1
    assert "--max-frames is not taken by an AnyFlow FAR pipeline (anyflow-far)" in capsys.readouterr().err
    assert main([*args, "--steps", "1,2,4"]) == 0
    out = capsys.readouterr().out
    assert "imported far:1 (AnyFlowFARPipeline, causal family anyflow-far, 32x64, up to 6 latent frames" in out, out
    assert Registry(Path(reg)).validate("far", "1")["causal"]["step_counts"] == [1, 2, 4]
    assert main([*args, "--family", "self-forcing"]) == 1
    assert "a causal video student goes over a WanPipeline" in capsys.readouterr().err
