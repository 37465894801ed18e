"""`fewstep import` of few-step bidirectional Wan students: a WanPipeline folder becomes a `diffusers-video` version
with the clip family, the frame size, the clip bound and the text length in its manifest; a distillation LoRA in
LightX2V's layout is fused into its transformer exactly as diffusers' `load_lora_weights` + `fuse_lora` fuse it;
frame counts the VAE cannot make, unknown families and stray flags are refused with nothing written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from fewstep.cli import main
from fewstep.errors import CheckpointError
from fewstep.models.importing import import_clip_video, import_pipeline
from fewstep.models.registry import Registry
from fewstep.models.wan_clip import CLIP_FAMILIES, ClipFamily

pytestmark = pytest.mark.slow  # builds the tiny WanPipeline (UMT5, the Wan VAE) and imports it

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests import pipelines

    return pipelines.wan(tmp_path_factory.mktemp("wan") / "wan")


def lightx2v_lora(path: Path, layers: int = 2, width: int = 24, rank: int = 4, alpha: float = 8.0) -> Path:
    """A LoRA in LightX2V's layout (original Wan names under `diffusion_model.`, `lora_down` / `lora_up`, an `alpha`
    per layer) on every attention projection of the tiny transformer."""
    torch.manual_seed(3)
    state = {}
    for block in range(layers):
        for attention in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                key = f"diffusion_model.blocks.{block}.{attention}.{proj}"
                state[f"{key}.lora_down.weight"] = torch.randn(rank, width) * 0.3
                state[f"{key}.lora_up.weight"] = torch.randn(width, rank) * 0.3
                state[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return path


def test_a_wan_pipeline_becomes_a_clip_version(base: Path, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    name, version = import_clip_video(base, "tw", registry, "rcm", size=(64, 48), max_tokens=16)
    manifest = registry.validate(name, version)  # every file hash-checked again
    assert manifest["kind"] == "diffusers-video" and registry.promoted(name) == version
    assert ClipFamily.from_dict(manifest["clip"]) == CLIP_FAMILIES["turbowan"]
    assert manifest["video"] == {
        "height": 48, "width": 64, "fps": 16, "max_frames": 21,
        "latent": {"channels": 16, "spatial": 8, "temporal": 4, "patch": [1, 2, 2]},
    }  # fmt: skip
    assert manifest["text"] == {"max_tokens": 16, "lengths": [16]}
    assert manifest["imported"]["student"] == {"layout": "diffusers", "files": [WEIGHTS]}
    assert "lora" not in manifest["imported"]
    theirs, ours = load_file(str(base / WEIGHTS)), load_file(str(registry.version_dir(name, version) / WEIGHTS))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_lightx2v_lora_is_fused_as_diffusers_fuses_it(base: Path, tmp_path: Path) -> None:
    import diffusers

    lora = lightx2v_lora(tmp_path / "wan2.1_t2v_lora_rank4_lightx2v_4step.safetensors")
    registry = Registry(tmp_path / "registry")
    name, version = import_clip_video(
        base, "lightning", registry, "wan-lightning", lora=lora, lora_scale=0.5, size=(32, 32), max_tokens=16
    )
    manifest = registry.validate(name, version)
    record = manifest["imported"]["lora"]
    assert record["scale"] == 0.5 and record["fused_into"] == ["transformer"] and record["file"] == lora.name
    ours = load_file(str(registry.version_dir(name, version) / WEIGHTS))

    pipe = diffusers.WanPipeline.from_pretrained(str(base), torch_dtype=torch.float32)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="x")
    pipe.fuse_lora(lora_scale=0.5, adapter_names=["x"])
    pipe.unload_lora_weights()
    theirs = pipe.transformer.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)
    before = load_file(str(base / WEIGHTS))
    assert not torch.equal(ours["blocks.0.attn1.to_q.weight"], before["blocks.0.attn1.to_q.weight"])


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"frames": 10}, "--frames must be 1 + 4·k pixel frames (the VAE's), from 1 to 125"),
        ({"frames": 129}, "Given: 129"),
        ({"family": "wan-turbo"}, "unknown clip family 'wan-turbo'"),
        ({"lora_scale": 0.5}, "--lora-scale is taken with --lora only"),
        ({"size": (60, 48)}, "--size: the width must be a multiple of 16"),
        ({"lora": "missing.safetensors"}, "not a regular file"),
    ],
)
def test_refusals_write_nothing(base: Path, tmp_path: Path, changes: dict[str, Any], needle: str) -> None:
    registry = Registry(tmp_path / "registry")
    kw: dict[str, Any] = {"family": "fastwan", "size": (32, 32), "max_tokens": 16} | changes
    if "lora" in kw:
        kw["lora"] = tmp_path / kw["lora"]
    with pytest.raises(CheckpointError) as refused:
        import_clip_video(base, "victim", registry, **kw)
    assert needle in str(refused.value), refused.value
    assert registry.versions("victim") == [] and not (tmp_path / "registry" / "victim").exists()


def test_an_image_import_of_a_wan_pipeline_names_the_clip_families(base: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as refused:
        import_pipeline(base, "wan", Registry(tmp_path / "registry"))
    assert "--family wan-lightning | fastwan | turbowan | rcm" in str(refused.value)


def test_the_cli_imports_a_clip_family(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = str(tmp_path / "registry")
    args = ["import", str(base), "--name", "fw", "--family", "fastwan", "--size", "32x32", "--registry", reg]
    assert main([*args, "--frames", "9"]) == 0
    out = capsys.readouterr().out
    assert "imported fw:1 (WanPipeline, clip family fastwan, 32x32, up to 9 frames" in out, out
    assert main([*args, "--max-frames", "3"]) == 1
    assert "--max-frames is not taken by a clip family (fastwan)" in capsys.readouterr().err
    causal = ["import", str(base), "--name", "sf", "--family", "self-forcing", "--frames", "9", "--registry", reg]
    assert main(causal) == 1
    assert "--frames is not taken by a causal family" in capsys.readouterr().err
