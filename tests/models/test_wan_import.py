"""`fewstep import` of causal Wan video students: a student's checkpoint in its own layout (or a diffusers-format
student folder) over a Wan 2.1 base becomes a `diffusers-causal-video` version whose transformer is exactly the
student's weights, with the family, the video sizes and how the student was read in its manifest; bad sizes,
families and folders are refused with nothing written."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from fewstep.cli import main
from fewstep.errors import CheckpointError
from fewstep.models.causal_families import CAUSAL_FAMILIES, CausalFamily
from fewstep.models.checkpoint import sha256_file
from fewstep.models.importing import import_causal_video, import_pipeline
from fewstep.models.registry import Registry
from tests.models.test_wan_keys import config_of, perturbed, transformer, write_longlive_lora, write_student

pytestmark = pytest.mark.slow  # builds the tiny WanPipeline (UMT5, the Wan VAE) and imports it

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
TINY = (64, 48)
"""A frame the tiny base serves (width, height): its RoPE table of 32 positions bounds a side to 32 × 16 px."""


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests import pipelines

    return pipelines.wan(tmp_path_factory.mktemp("wan") / "wan")


@pytest.fixture(scope="module")
def student(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A Self-Forcing-style checkpoint over the tiny base (`generator_ema` differs from the base's transformer
    and from `generator`), and its EMA state in diffusers names."""
    state = transformer(base).state_dict()
    ema = perturbed(state)
    path = write_student(tmp_path_factory.mktemp("student") / "self_forcing_dmd.pt", ema=ema, generator=state)
    return path, ema


def stored(registry: Registry, name: str, version: str) -> dict[str, torch.Tensor]:
    return load_file(str(registry.version_dir(name, version) / WEIGHTS))


def test_a_students_checkpoint_replaces_the_bases_transformer(
    base: Path, student: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    path, ema = student
    registry = Registry(tmp_path / "registry")
    name, version = import_causal_video(
        base, "sf", registry, "self-forcing", student=path, convert_pickle=True, size=TINY, max_tokens=16
    )
    manifest = registry.validate(name, version)  # every file hash-checked again
    ours = stored(registry, name, version)
    assert ours.keys() == ema.keys() and all(torch.equal(ours[k], ema[k]) for k in ema)

    assert manifest["kind"] == "diffusers-causal-video" and registry.promoted(name) == version
    assert CausalFamily.from_dict(manifest["causal"]) == CAUSAL_FAMILIES["self-forcing"]
    assert manifest["video"] == {
        "height": 48, "width": 64, "fps": 16, "max_frames": 21,
        "latent": {"channels": 16, "spatial": 8, "temporal": 4, "patch": [1, 2, 2]},
    }  # fmt: skip
    assert manifest["text"] == {"max_tokens": 16, "lengths": [16]}
    assert manifest["pipeline"] == {
        "class": "WanPipeline",
        "components": {
            "transformer": "WanTransformer3DModel", "vae": "AutoencoderKLWan",
            "text_encoder": "UMT5EncoderModel", "tokenizer": "T5Tokenizer",
        },
        "variants": {"transformer": None, "vae": None, "text_encoder": None},
    }  # fmt: skip
    record = manifest["imported"]["student"]
    assert record["sha256"] == sha256_file(path) and record["file"] == "self_forcing_dmd.pt"
    assert record["state"] == "generator_ema" and record["layout"] == "original" and record["prefix"] == "model."
    assert record["renamed"] == record["tensors"] == len(ema) and record["format"] == "pickle"
    files = manifest["files"]
    copied = ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "tokenizer/tokenizer.json")
    for rel in copied:
        assert files[rel]["sha256"] == sha256_file(base / rel), rel
    assert "scheduler/scheduler_config.json" in files and "transformer/config.json" in files

    again, _ = import_causal_video(base, "sf-raw", registry, "self-forcing", student=path, convert_pickle=True,
                                   which="generator", size=TINY)  # fmt: skip
    raw = stored(registry, again, "1")
    assert all(torch.equal(raw[k], v) for k, v in transformer(base).state_dict().items())
    assert registry.manifest(again, "1")["text"]["lengths"] == [512]  # Wan's own padded length by default


def test_a_pickle_student_is_refused_without_convert_pickle(
    base: Path, student: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    registry = Registry(tmp_path / "registry")
    with pytest.raises(CheckpointError, match=r"pickle file.*--convert-pickle"):
        import_causal_video(base, "sf", registry, "self-forcing", student=student[0], size=TINY)
    assert registry.versions("sf") == [] and not (tmp_path / "registry" / "sf").exists()


def test_a_diffusers_format_student_folder_is_its_own_student(base: Path, tmp_path: Path) -> None:
    folder = tmp_path / "converted"
    shutil.copytree(base, folder)
    state = perturbed(transformer(base).state_dict())
    save_file({k: v.contiguous() for k, v in state.items()}, folder / WEIGHTS)
    registry = Registry(tmp_path / "registry")
    name, version = import_causal_video(folder, "ll", registry, "longlive", size=(32, 32))
    manifest = registry.validate(name, version)
    assert manifest["files"][WEIGHTS]["sha256"] == sha256_file(folder / WEIGHTS)
    assert manifest["imported"]["student"] == {"layout": "diffusers", "files": [WEIGHTS]}
    assert CausalFamily.from_dict(manifest["causal"]).window == 12
    # A windowed family streams up to the RoPE table (32 positions), in whole blocks.
    assert manifest["video"]["max_frames"] == 30 and manifest["video"]["width"] == 32

    merged, _ = write_longlive_lora(tmp_path / "lora.pt", state, config_of(transformer(base)))
    name, version = import_causal_video(
        folder, "ll-lora", registry, "longlive", size=(32, 32), lora=tmp_path / "lora.pt", convert_pickle=True
    )
    ours = stored(registry, name, version)  # no alpha given: alpha = rank (4), half the change PEFT's alpha 8 makes
    for key, tensor in ours.items():
        lifted = state[key] + (merged[key] - state[key]) / 2
        torch.testing.assert_close(tensor, lifted, rtol=1e-5, atol=1e-6, msg=key)

    save_file({k: v.contiguous() for k, v in list(state.items())[1:]}, folder / WEIGHTS)
    with pytest.raises(CheckpointError, match=r"the student does not fit the transformer config: 1 missing"):
        import_causal_video(folder, "broken", registry, "longlive", size=(32, 32))
    assert registry.versions("broken") == []


def _edit_index(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        index = json.loads((folder / "model_index.json").read_text())
        change(index)
        (folder / "model_index.json").write_text(json.dumps(index))

    return damage


def _escaping_link(folder: Path) -> None:
    outside = folder.parent / "outside.safetensors"
    (folder / "vae/diffusion_pytorch_model.safetensors").rename(outside)
    (folder / "vae/diffusion_pytorch_model.safetensors").symlink_to(outside)


REFUSALS: dict[str, tuple[Callable[[Path], None], dict[str, Any], str]] = {
    "a side not a multiple of 16": (
        lambda f: None, {"size": (50, 48)},
        "--size: the width must be a multiple of 16 (the VAE's 8 × the transformer's patch) from 16 to 512. Given: 50",
    ),
    "a side past the RoPE table": (lambda f: None, {"size": (64, 528)}, "the height must be a multiple of 16"),
    "the native size on a tiny RoPE table": (lambda f: None, {"size": None}, "Given: 832"),
    "frames not in whole blocks": (
        lambda f: None, {"max_frames": 20},
        "--max-frames must be a multiple of the self-forcing block (3 latent frames) from 3 to 30",
    ),
    "an unknown family": (
        lambda f: None, {"family": "diagonal-forcing"},
        "unknown causal family 'diagonal-forcing'; known: ['self-forcing', 'causvid', 'longlive', 'rolling-forcing']",
    ),
    "a LoRA alpha without a LoRA": (
        lambda f: None, {"lora_alpha": 8.0}, "--lora-alpha must be a number in (0, 65536.0] with --lora. Given: 8.0"
    ),
    "a missing component": (_edit_index(lambda i: i.pop("vae")), {}, "the pipeline lacks vae; a WanPipeline needs"),
    "a link out of the folder": (_escaping_link, {}, "vae/diffusion_pytorch_model.safetensors is a link that leaves"),
    "an image pipeline": (
        _edit_index(lambda i: i.update(_class_name="FluxPipeline")), {},
        "a causal video student goes over a WanPipeline (Wan 2.1 text-to-video in diffusers format). "
        "Given: 'FluxPipeline'",
    ),
    "a Wan 2.2 second expert": (
        _edit_index(lambda i: i.update(transformer_2=["diffusers", "WanTransformer3DModel"])), {},
        "component 'transformer_2' (WanTransformer3DModel) is not supported in a WanPipeline",
    ),
    "a transformer of another text width": (
        lambda f: (f / "text_encoder/config.json").write_text(
            json.dumps({**json.loads((f / "text_encoder/config.json").read_text()), "d_model": 48})
        ),
        {}, "`text_dim` must be the text encoder's width (48). Given: 32",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_imports_are_refused_with_nothing_written(base: Path, tmp_path: Path, case: str) -> None:
    damage, changes, needle = REFUSALS[case]
    folder = tmp_path / "wan"
    shutil.copytree(base, folder)
    damage(folder)
    registry = Registry(tmp_path / "registry")
    kw: dict[str, Any] = {"family": "self-forcing", "size": TINY, **changes}
    with pytest.raises(CheckpointError) as refused:
        import_causal_video(folder, "victim", registry, **kw)
    assert needle in str(refused.value), refused.value
    assert registry.versions("victim") == [] and not (tmp_path / "registry" / "victim").exists()


def test_a_wan_pipeline_without_a_causal_family_is_told_the_causal_families(base: Path, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    for family in (None, "turbo"):
        with pytest.raises(CheckpointError) as refused:
            import_pipeline(base, "wan", registry, family=family)
        message = str(refused.value)
        assert "a WanPipeline is the base of causal video students" in message
        assert "--family self-forcing | causvid | longlive | rolling-forcing" in message
    assert registry.versions("wan") == []


def test_a_longlive_lora_is_fused_into_the_student_as_peft_merges_it(
    base: Path, student: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    """LongLive's `lora.pt` (PEFT over the original model, `lora_alpha` 8 for rank 4) over the student: the stored
    transformer is PEFT's merge of the student, renamed."""
    path, ema = student
    merged, targets = write_longlive_lora(tmp_path / "lora.pt", ema, config_of(transformer(base)))

    registry = Registry(tmp_path / "registry")
    name, version = import_causal_video(
        base, "ll", registry, "longlive", student=path, convert_pickle=True, size=TINY,
        lora=tmp_path / "lora.pt", lora_alpha=8,
    )  # fmt: skip
    ours = stored(registry, name, version)
    assert ours.keys() == merged.keys()
    for key in merged:
        torch.testing.assert_close(ours[key], merged[key], rtol=1e-5, atol=1e-6, msg=key)
    assert sum(not torch.equal(ours[k], ema[k]) for k in ema) == len(targets)
    lora = registry.validate(name, version)["imported"]["lora"]
    assert lora["sha256"] == sha256_file(tmp_path / "lora.pt") and lora["alpha"] == 8 and lora["ranks"] == [4]
    assert lora["fused_into"] == ["transformer"] and lora["layers"] == len(targets)


def test_the_command_imports_a_causal_student(
    base: Path, student: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = str(tmp_path / "registry")
    args = ["import", str(base), "--name", "cv", "--family", "causvid", "--student", str(student[0])]
    assert main([*args, "--size", "64x48", "--max-frames", "9", "--registry", reg]) == 1
    assert "--convert-pickle" in capsys.readouterr().err
    assert main([*args, "--convert-pickle", "--size", "64x48", "--max-frames", "9", "--registry", reg]) == 0
    out = capsys.readouterr().out
    assert "imported cv:1 (WanPipeline, causal family causvid, 64x48, up to 9 latent frames" in out, out
    manifest = Registry(Path(reg)).validate("cv", "1")
    assert manifest["causal"]["name"] == "causvid" and manifest["video"]["max_frames"] == 9
    assert main([*args, "--convert-pickle", "--size", "64", "--registry", reg]) == 1
    assert "--size must be WIDTHxHEIGHT" in capsys.readouterr().err
    assert main([*args[:6], "--unet", str(student[0]), "--registry", reg]) == 1
    assert "--unet is not taken by a causal family" in capsys.readouterr().err


def test_the_command_imports_a_rolling_forcing_student_the_engine_serves(
    base: Path, student: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rolling_forcing_dmd.pt` has Self-Forcing's layout (`generator`, `generator_ema`): imported with
    `--family rolling-forcing`, it streams up to the RoPE table in whole blocks, and the engine loads its
    rolling runner."""
    from fewstep.engines.wan_stream import WanStreamEngine
    from fewstep.models.wan_rolling import RollingWan

    reg = str(tmp_path / "registry")
    args = ["import", str(base), "--name", "rf", "--family", "rolling-forcing", "--student", str(student[0])]
    assert main([*args, "--convert-pickle", "--size", "64x48", "--registry", reg]) == 0
    out = capsys.readouterr().out
    assert "imported rf:1 (WanPipeline, causal family rolling-forcing, 64x48, up to 30 latent frames" in out, out
    registry = Registry(Path(reg))
    manifest = registry.validate("rf", "1")
    assert CausalFamily.from_dict(manifest["causal"]) == CAUSAL_FAMILIES["rolling-forcing"]
    torch.testing.assert_close(stored(registry, "rf", "1"), student[1], rtol=0, atol=0)
    engine = WanStreamEngine(registry.version_dir("rf", "1"), capacity=1)
    engine.load()
    try:
        assert isinstance(engine.runner, RollingWan)
        assert (engine.spec.sink, engine.spec.window, engine.spec.step_counts) == (3, 21, (5,))
    finally:
        engine.close()
