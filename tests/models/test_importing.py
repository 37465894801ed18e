"""`fewstep import`: users' pipeline folders (and hub-cache snapshots) become registry versions with every file
hashed; bad folders are refused with a message that names the problem, and nothing is written."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fewstep.cli import main
from fewstep.errors import CheckpointError
from fewstep.models.checkpoint import sha256_file
from fewstep.models.importing import import_pipeline
from fewstep.models.registry import Registry


def _copy(tiny_pipelines: dict[str, Path], tmp: Path, arch: str = "sd") -> Path:
    dst = tmp / f"{arch}-copy"
    shutil.copytree(tiny_pipelines[arch], dst)
    return dst


def test_a_pipeline_becomes_a_version_with_every_component_hashed(
    tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    registry = Registry(tmp_path / "registry")
    name, version = import_pipeline(tiny_pipelines["sdxl"], "tiny-xl", registry, family="dmd2")
    manifest = registry.validate(name, version)  # every file hash-checked again
    assert manifest["kind"] == "diffusers" and manifest["native_size"] == "64x64"
    assert manifest["pipeline"]["arch"] == "sdxl" and set(manifest["pipeline"]["components"]) == {
        "unet",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
    }
    assert manifest["recipe"]["family"] == "dmd2" and manifest["recipe"]["timesteps"] == {"4": [999, 749, 499, 249]}
    assert "tianweiy/DMD2" in manifest["recipe"]["source"]
    files = manifest["files"]
    assert "unet/diffusion_pytorch_model.safetensors" in files and "tokenizer_2/tokenizer_config.json" in files
    src = tiny_pipelines["sdxl"] / "vae/diffusion_pytorch_model.safetensors"
    assert files["vae/diffusion_pytorch_model.safetensors"]["sha256"] == sha256_file(src)
    assert registry.promoted(name) == version


def _refused(
    tiny_pipelines: dict[str, Path], tmp: Path, damage: Callable[[Path], None], needle: str, **kw: object
) -> None:
    folder = _copy(tiny_pipelines, tmp)
    damage(folder)
    registry = Registry(tmp / "registry")
    with pytest.raises(CheckpointError) as refused:
        import_pipeline(folder, "victim", registry, **{"family": "turbo", **kw})  # type: ignore[arg-type]
    assert needle in str(refused.value), refused.value
    assert registry.versions("victim") == [] and not (tmp / "registry" / "victim").exists()  # nothing written


def _edit_index(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        index = json.loads((folder / "model_index.json").read_text())
        change(index)
        (folder / "model_index.json").write_text(json.dumps(index))

    return damage


def _pickles_only(folder: Path) -> None:
    weights = folder / "unet/diffusion_pytorch_model.safetensors"
    weights.rename(folder / "unet/diffusion_pytorch_model.bin")  # never opened: its content does not matter


def _escaping_link(folder: Path) -> None:
    outside = folder.parent / "outside.safetensors"
    shutil.copy(folder / "unet/diffusion_pytorch_model.safetensors", outside)
    (folder / "unet/diffusion_pytorch_model.safetensors").unlink()
    os.symlink(outside, folder / "unet/diffusion_pytorch_model.safetensors")


def _edit_json(rel: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = json.loads((folder / rel).read_text())
        change(data)
        (folder / rel).write_text(json.dumps(data))

    return damage


def _index_naming_a_pickle(folder: Path) -> None:
    """A shard index beside the UNet's safetensors that maps its weights to a `torch.save` zip."""
    torch.save({"w": torch.zeros(1)}, folder / "unet/weights.txt")
    index = {"metadata": {}, "weight_map": {"conv_in.weight": "weights.txt"}}
    (folder / "unet/diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


def _hard_link_from_outside(folder: Path) -> None:
    secret = folder.parent / "id_rsa"
    secret.write_text('{"_class_name": "secret"}')
    (folder / "unet/config.json").unlink()
    os.link(secret, folder / "unet/config.json")


REFUSALS = {
    "no model_index.json": (lambda f: (f / "model_index.json").unlink(), "model_index.json is missing"),
    "pickle weights only": (_pickles_only, "weights only in pickle formats (unet/diffusion_pytorch_model.bin)"),
    "an unsupported pipeline": (
        _edit_index(lambda i: i.update(_class_name="PixArtSigmaPipeline")),
        "pipeline class 'PixArtSigmaPipeline' is not supported; supported: ['Flux2KleinPipeline', 'FluxPipeline', "
        "'LatentConsistencyModelPipeline'",
    ),
    "a pipeline whose components are another architecture's": (
        _edit_index(lambda i: i.update(_class_name="FluxPipeline")),
        "component 'unet' (UNet2DConditionModel) is not supported in a FluxPipeline",
    ),
    "an unsupported component": (
        _edit_index(lambda i: i.update(unet=["diffusers", "UNet2DModel"])),
        "unet class 'UNet2DModel' is not supported; supported: ['UNet2DConditionModel']",
    ),
    "a missing component": (_edit_index(lambda i: i.pop("vae")), "the pipeline lacks vae"),
    "a link out of the folder": (_escaping_link, "is a link that leaves the pipeline folder"),
    "a hard link": (_hard_link_from_outside, "unet/config.json is a hard link (it has 2 names)"),
    "a tokenizer longer than its text encoder": (
        _edit_json("tokenizer/tokenizer_config.json", lambda c: c.update(model_max_length=78)),
        "tokenizer: its `model_max_length` must be at most text_encoder's `max_position_embeddings` (77). Given: 78",
    ),
    "a tokenizer without bounds": (
        _edit_json("tokenizer/tokenizer_config.json", lambda c: c.update(model_max_length=10**12)),
        "Given: 1000000000000",
    ),
    "a tokenizer that does not load": (
        _edit_json("tokenizer/tokenizer.json", lambda t: t.update(model={"type": "NoSuchModel"})),
        "tokenizer does not load and encode a prompt",
    ),
    "a shard index naming another file": (
        _index_naming_a_pickle,
        "maps weights to ['weights.txt']: an index may name only the safetensors files beside it",
    ),
    "a list-valued config field": (
        _edit_json("unet/config.json", lambda c: c.update(sample_size=[32, 32])),
        "unet/config.json: `sample_size` must be an integer from 1 to 8192. Given: [32, 32]",
    ),
    "a native size past every bound": (
        _edit_json("unet/config.json", lambda c: c.update(sample_size=100000)),
        "`sample_size` must be an integer from 1 to 8192. Given: 100000",
    ),
    "a native size past the bound after the VAE's factor": (
        _edit_json("unet/config.json", lambda c: c.update(sample_size=8000)),
        "its native size 16000x16000 (unet `sample_size` × 2) is over 8192",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_folders_are_refused_and_nothing_is_written(
    tiny_pipelines: dict[str, Path], tmp_path: Path, case: str
) -> None:
    damage, needle = REFUSALS[case]
    _refused(tiny_pipelines, tmp_path, damage, needle)


def test_a_hub_snapshot_is_followed_into_its_own_blobs_and_no_further(
    tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    cache = tmp_path / "hub" / "models--someone--tiny-sd"
    snapshot = cache / "snapshots" / "0123abcd"
    blobs = cache / "blobs"
    blobs.mkdir(parents=True)
    for path in sorted(tiny_pipelines["sd"].rglob("*")):
        if path.is_file():
            rel = path.relative_to(tiny_pipelines["sd"])
            blob = blobs / sha256_file(path)
            shutil.copy(path, blob)
            (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, (snapshot / rel).parent), snapshot / rel)
    registry = Registry(tmp_path / "registry")
    name, version = import_pipeline(snapshot, "from-hub", registry, family="turbo")
    assert registry.validate(name, version)["pipeline"]["class"] == "StableDiffusionPipeline"
    stray = tmp_path / "hub" / "elsewhere.json"
    stray.write_text("{}")
    target = snapshot / "unet" / "config.json"
    target.unlink()
    os.symlink(stray, target)  # a link out of the cache's blobs
    with pytest.raises(CheckpointError, match=r"unet/config\.json is a link that leaves the pipeline folder"):
        import_pipeline(snapshot, "from-hub-2", registry, family="turbo")
    target.unlink()
    os.symlink(os.path.relpath(blobs / sha256_file(tiny_pipelines["sd"] / "unet/config.json"), target.parent), target)
    notes = blobs / "notes.json"  # in the cache's blobs, but not a blob's name
    notes.write_text("{}")
    target = snapshot / "vae" / "config.json"
    target.unlink()
    os.symlink(os.path.relpath(notes, target.parent), target)
    with pytest.raises(CheckpointError, match=r"vae/config\.json is a link that leaves the pipeline folder"):
        import_pipeline(snapshot, "from-hub-3", registry, family="turbo")


def test_a_cache_whose_blobs_folder_is_a_link_is_no_cache(tiny_pipelines: dict[str, Path], tmp_path: Path) -> None:
    """Its `blobs` could point anywhere (an operator's ~/.ssh): every link of such a snapshot is refused."""
    elsewhere = tmp_path / "home" / ".ssh"
    elsewhere.mkdir(parents=True)
    cache = tmp_path / "hub" / "models--someone--tiny-sd"
    snapshot = cache / "snapshots" / "0123abcd"
    shutil.copytree(tiny_pipelines["sd"], snapshot)
    os.symlink(elsewhere, cache / "blobs")
    key = elsewhere / ("0" * 64)
    key.write_text('{"private": "key"}')
    (snapshot / "unet" / "config.json").unlink()
    os.symlink(os.path.relpath(cache / "blobs" / key.name, snapshot / "unet"), snapshot / "unet" / "config.json")
    registry = Registry(tmp_path / "registry")
    with pytest.raises(CheckpointError, match=r"unet/config\.json is a link that leaves the pipeline folder"):
        import_pipeline(snapshot, "from-hub", registry, family="turbo")
    assert registry.versions("from-hub") == []


def test_only_known_config_and_tokenizer_files_are_copied(tiny_pipelines: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(tiny_pipelines, tmp_path)
    (folder / "unet" / "README.txt").write_text("notes")
    (folder / "tokenizer" / "secrets.json").write_text("{}")
    registry = Registry(tmp_path / "registry")
    name, version = import_pipeline(folder, "tidy", registry, family="turbo")
    files = registry.validate(name, version)["files"]
    assert "unet/config.json" in files and "tokenizer/tokenizer.json" in files
    assert "unet/README.txt" not in files and "tokenizer/secrets.json" not in files


def test_a_student_unet_replaces_the_pipelines_and_must_fit_its_config(
    tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    state = load_file(str(tiny_pipelines["sd"] / "unet/diffusion_pytorch_model.safetensors"))
    student = {k: v + 0.01 for k, v in state.items()}
    save_file(student, str(tmp_path / "student.safetensors"))
    registry = Registry(tmp_path / "registry")
    name, version = import_pipeline(
        tiny_pipelines["sd"], "student", registry, family="lightning", unet=tmp_path / "student.safetensors"
    )
    manifest = registry.validate(name, version)
    assert manifest["files"]["unet/diffusion_pytorch_model.safetensors"]["sha256"] == sha256_file(
        tmp_path / "student.safetensors"
    )
    assert manifest["imported"]["unet"]["file"] == "student.safetensors"

    bad = dict(student)
    key = next(k for k in sorted(bad) if bad[k].dim() == 4)
    bad[key] = bad[key][:, :1].contiguous()
    save_file(bad, str(tmp_path / "bad.safetensors"))
    _refused(
        tiny_pipelines,
        tmp_path / "b",
        lambda f: None,
        "does not fit the pipeline's UNet config: 1 of other shapes",
        unet=tmp_path / "bad.safetensors",
    )


def test_a_pickle_student_unet_is_converted_only_when_asked(tiny_pipelines: dict[str, Path], tmp_path: Path) -> None:
    state = load_file(str(tiny_pipelines["sd"] / "unet/diffusion_pytorch_model.safetensors"))
    torch.save({k: v.half() for k, v in state.items()}, tmp_path / "dmd2_unet_fp16.bin")
    _refused(
        tiny_pipelines,
        tmp_path / "a",
        lambda f: None,
        "only with `--convert-pickle`",
        unet=tmp_path / "dmd2_unet_fp16.bin",
    )
    registry = Registry(tmp_path / "registry")
    name, version = import_pipeline(
        tiny_pipelines["sd"], "dmd2", registry, family="dmd2", unet=tmp_path / "dmd2_unet_fp16.bin", convert_pickle=True
    )
    record = registry.validate(name, version)["imported"]["unet"]
    assert record["converted_from_pickle"].startswith("torch.load(weights_only=True)")
    assert record["sha256"] == sha256_file(tmp_path / "dmd2_unet_fp16.bin")
    assert not any(p.suffix == ".bin" for p in registry.version_dir(name, version).rglob("*"))


def test_the_family_is_read_from_the_scheduler_or_asked_for(tiny_pipelines: dict[str, Path], tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    with pytest.raises(CheckpointError, match=r"cannot tell the family .*DDIMScheduler.*pass `--family` with one of"):
        import_pipeline(tiny_pipelines["sd"], "unknown", registry)
    folder = _copy(tiny_pipelines, tmp_path)
    config = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    config.update(_class_name="EulerAncestralDiscreteScheduler", timestep_spacing="trailing")
    (folder / "scheduler/scheduler_config.json").write_text(json.dumps(config))
    name, version = import_pipeline(folder, "turbo", registry)
    assert registry.manifest(name, version)["recipe"]["family"] == "turbo"
    lcm = _copy(tiny_pipelines, tmp_path, "sd-lcm")  # an LCMScheduler and a UNet with the guidance embedding
    config = json.loads((lcm / "scheduler/scheduler_config.json").read_text())
    (lcm / "scheduler/scheduler_config.json").write_text(json.dumps({**config, "_class_name": "LCMScheduler"}))
    name, version = import_pipeline(lcm, "lcm", registry)
    recipe = registry.manifest(name, version)["recipe"]
    assert recipe["family"] == "lcm" and recipe["guidance"]["mode"] == "embedded"


def test_fewstep_import_registers_and_announces(
    tiny_pipelines: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = str(tmp_path / "registry")
    argv = [
        "import",
        str(tiny_pipelines["sd"]),
        "--name",
        "tiny",
        "--family",
        "hyper-sd",
        "--steps",
        "2",
        "--registry",
        reg,
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "imported tiny:1 (StableDiffusionPipeline, family hyper-sd, steps [2], native 64x64" in out
    assert main([*argv[:4], "--family", "warp", "--registry", reg]) == 1
    assert "unknown family 'warp'" in capsys.readouterr().err
