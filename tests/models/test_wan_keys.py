"""Causal Wan students' checkpoints in their own layout: a pickle written as Self-Forcing saves it (original Wan names
under `model.`, `{'generator', 'generator_ema'}`) reads back as exactly the tiny diffusers transformer it was
written from, and its output is the same; pickles are refused unless asked for, unsafe ones always; a state that
does not fit is refused naming the tensor; a LongLive-style PEFT LoRA fuses as PEFT merges it.

The original model's parameter tree is rebuilt here (`OriginalWan`: names and shapes only, from the original Wan
`WanModel`), so the renaming is checked against that tree, not against itself."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fewstep.errors import CheckpointError
from fewstep.models import wan_keys
from fewstep.models.wan_keys import diffusers_name, load_lora, load_student, original_name, to_diffusers

pytestmark = pytest.mark.slow  # builds the tiny WanPipeline (UMT5, the Wan VAE) and loads it through diffusers


class _RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class _Attention(nn.Module):
    """The parameters of the original `WanSelfAttention` (and its cross-attention subclasses; `image`: I2V's)."""

    def __init__(self, dim: int, qk_norm: bool, image: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = _RMSNorm(dim) if qk_norm else nn.Identity()
        self.norm_k = _RMSNorm(dim) if qk_norm else nn.Identity()
        if image:
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_k_img = _RMSNorm(dim) if qk_norm else nn.Identity()


class _Block(nn.Module):
    """The original `WanAttentionBlock`: `norm3` is the affine norm before cross-attention, `norm2` the bare one
    before the feed-forward."""

    def __init__(self, dim: int, ffn: int, qk_norm: bool, cross_norm: bool, image: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.self_attn = _Attention(dim, qk_norm)
        self.norm3 = nn.LayerNorm(dim) if cross_norm else nn.Identity()
        self.cross_attn = _Attention(dim, qk_norm, image)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim))


class _Head(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.head = nn.Linear(dim, out)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim))


class OriginalWan(nn.Module):
    """The original Wan 2.1 `WanModel`'s parameter tree for a diffusers `WanTransformer3DModel` config (no forward);
    its rotary table `freqs` is a plain attribute there, so it is not in its state."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        dim = config["num_attention_heads"] * config["attention_head_dim"]
        patch = tuple(config["patch_size"])
        image = config.get("image_dim")
        qk_norm = config["qk_norm"] is not None
        self.patch_embedding = nn.Conv3d(config["in_channels"], dim, kernel_size=patch, stride=patch)
        self.text_embedding = nn.Sequential(nn.Linear(config["text_dim"], dim), nn.GELU(), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config["freq_dim"], dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(
            _Block(dim, config["ffn_dim"], qk_norm, config["cross_attn_norm"], image is not None)
            for _ in range(config["num_layers"])
        )
        self.head = _Head(dim, config["out_channels"] * math.prod(patch))
        if image is not None:  # the original's MLPProj
            self.img_emb = nn.Module()
            self.img_emb.proj = nn.Sequential(
                nn.LayerNorm(image), nn.Linear(image, image), nn.GELU(), nn.Linear(image, dim), nn.LayerNorm(dim)
            )


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests import pipelines

    return pipelines.wan(tmp_path_factory.mktemp("wan") / "wan")


def transformer(folder: Path) -> Any:
    import diffusers

    loaded = diffusers.WanTransformer3DModel.from_pretrained(str(folder / "transformer"))
    # Copied into storage of its own: `from_pretrained`'s weights are views into the file's buffer at unaligned
    # addresses, where CPU kernels round differently (outputs differ by ~4e-7 from the same weights elsewhere).
    model = diffusers.WanTransformer3DModel.from_config(loaded.config).eval()
    model.load_state_dict(loaded.state_dict(), strict=True)
    return model


def config_of(model: Any) -> dict[str, Any]:
    return {k: v for k, v in model.config.items() if not k.startswith("_")}


def as_original(state: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """`state` (diffusers names) in original Wan names under `prefix`, by the inverse map."""
    out = {}
    for name, tensor in state.items():
        original = original_name(name)
        assert original is not None, name
        out[prefix + original] = tensor.clone()
    return out


def write_student(path: Path, ema: dict[str, torch.Tensor], generator: dict[str, torch.Tensor]) -> Path:
    """A checkpoint as Self-Forcing saves its students: both states of the wrapped generator, original names."""
    torch.save({"generator": as_original(generator), "generator_ema": as_original(ema)}, path)
    return path


def write_longlive_lora(
    path: Path, state: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A LoRA as LongLive saves it (`peft.get_peft_model` over the original model, rank 4, `lora_alpha` 8, on every
    Linear of the blocks; `{'generator_lora': get_peft_model_state_dict}`) over the transformer of `state`; returns
    PEFT's merge of it in diffusers names, and the original names of the layers it targets."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    original = OriginalWan(config)
    original.load_state_dict(as_original(state, prefix=""), strict=True)
    targets = sorted(n for n, m in original.named_modules() if n.startswith("blocks.") and isinstance(m, nn.Linear))
    torch.manual_seed(5)
    wrapped = get_peft_model(original, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    torch.save({"generator_lora": get_peft_model_state_dict(wrapped), "step": 100}, path)
    merged, _ = to_diffusers(wrapped.merge_and_unload().state_dict())
    return merged, targets


def perturbed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v + 0.25 for k, v in state.items()}


def inputs(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "hidden_states": torch.randn(1, config["in_channels"], 3, 4, 4, generator=g),
        "timestep": torch.tensor([750]),
        "encoder_hidden_states": torch.randn(1, 5, config["text_dim"], generator=g),
    }


def test_the_inverse_map_writes_exactly_the_original_models_tensors() -> None:
    import diffusers
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    image = {"image_dim": 20, "added_kv_proj_dim": 24}
    for extra in ({}, image):
        config = dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", **extra,
        )  # fmt: skip
        with torch.device("meta"):
            ours = diffusers.WanTransformer3DModel(**config).state_dict()
            theirs = OriginalWan(config).state_dict()
        written = as_original(ours, prefix="")
        assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in theirs.items()}
        named, _ = to_diffusers(theirs)
        assert {k: v.shape for k, v in named.items()} == {k: v.shape for k, v in ours.items()}
        for name in theirs:  # diffusers' own single-file conversion of Wan's release names each tensor alike
            (theirs_named,) = convert_wan_transformer_to_diffusers({name: torch.empty(0)})
            assert theirs_named == diffusers_name(name), name


def test_a_students_pickle_reads_as_the_transformer_it_was_written_from(tiny_wan: Path, tmp_path: Path) -> None:
    import diffusers

    model = transformer(tiny_wan)
    state = model.state_dict()
    path = write_student(tmp_path / "self_forcing_dmd.pt", ema=state, generator=perturbed(state))
    config = config_of(model)

    loaded, record = load_student(path, config, convert_pickle=True)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert record["state"] == "generator_ema" and record["prefix"] == "model." and record["layout"] == "original"
    assert record["renamed"] == record["tensors"] == len(state) and record["map_version"] == wan_keys.MAP_VERSION
    assert record["format"] == "pickle" and record["dropped"] == [] and record["unwrapped"] == 0

    rebuilt = diffusers.WanTransformer3DModel.from_config(config).eval()
    rebuilt.load_state_dict(loaded, strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(**inputs(config)).sample, model(**inputs(config)).sample)

    raw, record = load_student(path, config, convert_pickle=True, which="generator")
    assert record["state"] == "generator" and all(torch.equal(raw[k], state[k] + 0.25) for k in state)


def test_other_students_layouts_read_as_the_same_tensors(tiny_wan: Path, tmp_path: Path) -> None:
    model = transformer(tiny_wan)
    state = model.state_dict()
    config = config_of(model)
    original = as_original(state)
    fsdp = {k.replace("blocks.0.", "blocks.0._fsdp_wrapped_module."): v for k, v in original.items()}
    layouts = {
        "causvid.pt": ({"generator": original}, "generator"),  # CausVid's model.pt: no EMA; `ema` falls back
        "longlive_base.pt": ({"model": original}, "model"),
        "ema_fsdp.pt": ({"generator_ema": fsdp}, "generator_ema"),
        "rope.pt": ({"generator": original | {"model.freqs": torch.ones(4, 2, dtype=torch.complex128)}}, "generator"),
    }
    for name, (saved, taken) in layouts.items():
        torch.save(saved, tmp_path / name)
        loaded, record = load_student(tmp_path / name, config, convert_pickle=True)
        assert record["state"] == taken and all(torch.equal(loaded[k], state[k]) for k in state), name
    assert record["dropped"] == ["model.freqs"]
    with pytest.raises(CheckpointError, match="no `generator` state"):
        load_student(tmp_path / "ema_fsdp.pt", config, convert_pickle=True, which="generator")

    save_file(as_original(state, prefix=""), tmp_path / "wan_release.safetensors")  # Wan's own layout
    loaded, record = load_student(tmp_path / "wan_release.safetensors", config)
    assert record["prefix"] == "" and all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_safetensors_file_in_diffusers_names_is_taken_as_it_is(tiny_wan: Path, tmp_path: Path) -> None:
    model = transformer(tiny_wan)
    state = model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "student.safetensors")
    loaded, record = load_student(tmp_path / "student.safetensors", config_of(model))
    assert all(torch.equal(loaded[k], state[k]) for k in state) and loaded.keys() == state.keys()
    assert record["layout"] == "diffusers" and record["renamed"] == 0 and record["state"] == "whole file"


def test_a_pickle_is_refused_unless_asked_for_and_an_unsafe_one_always(tiny_wan: Path, tmp_path: Path) -> None:
    model = transformer(tiny_wan)
    state = model.state_dict()
    path = write_student(tmp_path / "model.pt", ema=state, generator=state)
    with pytest.raises(CheckpointError, match=r"pickle file.*--convert-pickle"):
        load_student(path, config_of(model))

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    torch.save({"generator": {"model.head.head.weight": Payload()}}, evil)
    with pytest.raises(CheckpointError, match=r"weights_only=True\) refused it"):
        load_student(evil, config_of(model), convert_pickle=True)
    plain = tmp_path / "evil.pth"
    plain.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match=r"weights_only=True\) refused it"):
        load_student(plain, config_of(model), convert_pickle=True)
    assert not marker.exists()


def test_a_state_that_does_not_fit_is_refused_naming_the_tensor(tiny_wan: Path, tmp_path: Path) -> None:
    model = transformer(tiny_wan)
    config = config_of(model)
    original = as_original(model.state_dict())

    def refused(state: dict[str, torch.Tensor], name: str, match: str) -> None:
        torch.save({"generator_ema": state}, tmp_path / name)
        with pytest.raises(CheckpointError, match=match):
            load_student(tmp_path / name, config, convert_pickle=True)

    missing = {k: v for k, v in original.items() if k != "model.blocks.1.cross_attn.k.weight"}
    refused(missing, "missing.pt", r"1 missing \(e\.g\. blocks\.1\.attn2\.to_k\.weight \(original blocks\.1\.cross")
    wrong = original | {"model.blocks.0.norm3.weight": torch.ones(7)}
    refused(wrong, "wrong.pt", r"1 of other shapes \(e\.g\. blocks\.0\.norm2\.weight .*: \[7\] for \[24\]")
    stray = original | {"model.blocks.0.self_attn.lora.weight": torch.ones(2)}
    refused(stray, "stray.pt", r"no diffusers name \(e\.g\. \['model\.blocks\.0\.self_attn\.lora\.weight'\]")
    outside = original | {"_cls_pred_branch.0.weight": torch.ones(2)}
    refused(outside, "outside.pt", r"no diffusers name \(e\.g\. \['_cls_pred_branch")
    integral = original | {"model.head.modulation": torch.ones(1, 2, 24, dtype=torch.int64)}
    refused(integral, "integral.pt", r"1 not floating-point \(e\.g\. \['scale_shift_table'\]")
    refused({"model.x": torch.ones(1)}, "other.pt", "neither a Wan transformer state in original names")

    extra = {k: v.contiguous() for k, v in model.state_dict().items()} | {"blocks.0.attn1.to_kv.weight": torch.ones(1)}
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"1 unexpected \(e\.g\. \['blocks\.0\.attn1\.to_kv\.weight'\]"):
        load_student(tmp_path / "extra.safetensors", config)


def test_files_and_names_are_bounded(tiny_wan: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = transformer(tiny_wan)
    config = config_of(model)
    path = write_student(tmp_path / "model.pt", ema=model.state_dict(), generator=model.state_dict())
    monkeypatch.setattr(wan_keys, "MAX_FILE_BYTES", 1000)
    with pytest.raises(CheckpointError, match="bytes; a student file may have at most 1000"):
        load_student(path, config, convert_pickle=True)
    monkeypatch.undo()

    long = as_original(model.state_dict()) | {"model." + "x" * 300: torch.ones(1)}
    torch.save({"generator": long}, tmp_path / "long.pt")
    with pytest.raises(CheckpointError, match="names are not strings of at most 256"):
        load_student(tmp_path / "long.pt", config, convert_pickle=True)
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_student(link, config)
    (tmp_path / "weights.gguf").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="neither safetensors nor a known pickle"):
        load_student(tmp_path / "weights.gguf", config)


def test_a_longlive_peft_lora_fuses_as_peft_merges_it(tiny_wan: Path, tmp_path: Path) -> None:
    """LongLive wraps its `CausalWanModel` in `peft.get_peft_model` on every Linear of the blocks and saves
    `get_peft_model_state_dict`; merged by PEFT, then renamed, it must equal the LoRA mapped here and fused by
    `models.lora.fuse` into the diffusers transformer."""
    from fewstep.models.lora import fuse

    model = transformer(tiny_wan)
    merged, targets = write_longlive_lora(tmp_path / "lora.pt", model.state_dict(), config_of(model))

    with pytest.raises(CheckpointError, match="pickle file"):
        load_lora(tmp_path / "lora.pt")
    layers, record = load_lora(tmp_path / "lora.pt", convert_pickle=True, alpha=8)
    assert record["layers"] == len(targets) == 20 and record["ranks"] == [4] and record["alpha"] == 8
    assert "transformer.blocks.1.attn2.to_out.0.lora_B.weight" in layers
    save_file({k: v.contiguous() for k, v in layers.items()}, tmp_path / "lora.safetensors")

    files = {str(p.relative_to(tiny_wan)): p for p in tiny_wan.rglob("*") if p.is_file()}
    work = tmp_path / "work"
    work.mkdir()
    fused, fuse_record = fuse("WanPipeline", files, ["transformer"], tmp_path / "lora.safetensors", 1.0, work)
    assert fuse_record["fused_into"] == ["transformer"]
    ours = load_file(str(fused["transformer/diffusion_pytorch_model.safetensors"]))
    assert ours.keys() == merged.keys()
    for name in merged:
        torch.testing.assert_close(ours[name], merged[name], rtol=1e-5, atol=1e-6, msg=name)
    changed = [k for k in merged if not torch.equal(merged[k], model.state_dict()[k])]
    assert len(changed) == len(targets)  # every targeted Linear's weight, and nothing else (no LoRA bias)
