"""Distillation LoRAs fused at import: `fewstep import BASE --lora FILE [--lora-scale S]`.

Many few-step students ship as a LoRA over their base model (Qwen-Image-Lightning, Hyper-SD, LCM-LoRA,
SDXL-Lightning's LoRAs, TCD). fewstep serves one fused network per version: the LoRA is applied exactly as
diffusers applies it, with the pipeline's own `load_lora_weights` (whatever key layout the file has: diffusers,
PEFT, kohya) and `fuse_lora(lora_scale=S)`, and the fused networks are what the version stores. Serving then
costs nothing more than the base model; a different LoRA is a different version.

Safetensors only, its header read with `safetensors` before diffusers sees it (a dict of tensors, bounded in
count); diffusers then loads a copy of the file, so that a diffusers-format LoRA's adapter metadata (its
`lora_alpha`, kept in the file's header) scales it as `load_lora_weights` from the file does. The file's sha256,
the scale and the components it changed are recorded in the manifest. It needs `peft` (diffusers'
LoRA backend): `pip install 'fewstep[lora]'`.

A causal video student's LoRA (LongLive's) is fused into the one network it changes, without loading the rest of
its pipeline (a Wan base's UMT5-XXL alone is 5.7B parameters): `fuse_network`, the same diffusers calls on the
network itself.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fewstep.errors import CheckpointError
from fewstep.models import lazy
from fewstep.models.checkpoint import PICKLE_SUFFIXES, sha256_file

MAX_LORA_TENSORS = 100_000
"""Most tensors a LoRA file may hold (an SDXL LoRA on every attention and feed-forward layer has a few thousand)."""
WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS = "model.safetensors"
LORA_WEIGHTS = "lora.safetensors"


def read_lora(path: Path) -> dict[str, Any]:
    """The LoRA's tensors; CheckpointError for a pickle, a link, an unreadable file or an unbounded one."""
    check_lora(path)
    from safetensors.torch import load_file

    return load_file(str(path))


def check_lora(path: Path) -> None:
    """CheckpointError unless `path` is a regular safetensors file whose header names 1 to `MAX_LORA_TENSORS`
    tensors (no tensor is read)."""
    if path.is_symlink() or not path.is_file():
        raise CheckpointError(f"--lora {path}: not a regular file")
    if path.name.lower().endswith(PICKLE_SUFFIXES) or not path.name.endswith(".safetensors"):
        raise CheckpointError(f"--lora {path.name}: LoRAs are read from safetensors files only")
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            count = len(list(f.keys()))
    except Exception as e:  # safetensors raises its own types for bad headers
        raise CheckpointError(f"--lora {path.name} is not a readable safetensors file ({e})") from e
    if not 1 <= count <= MAX_LORA_TENSORS:
        raise CheckpointError(f"--lora {path.name} holds {count} tensors; a LoRA holds 1 to {MAX_LORA_TENSORS}")


def fuse(
    cls: str, files: dict[str, Path], weighted: list[str], lora: Path, scale: float, work: Path
) -> tuple[dict[str, Path], dict[str, Any]]:
    """The pipeline `files` (relative path → verified source file) with `lora` fused at `scale`: the new weight
    files of the components it changed (written under `work`, replacing theirs), and the manifest's record."""
    import torch

    if not 0.0 < scale <= 4.0:
        raise CheckpointError(f"--lora-scale must be in (0, 4]. Given: {scale}")
    _needs_peft()
    check_lora(lora)
    with tempfile.TemporaryDirectory(dir=work) as staged:
        root = Path(staged)
        for rel, src in files.items():  # the pipeline as it will be stored, so diffusers reads only checked files
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, root / rel)
        adapter = root / "_lora" / LORA_WEIGHTS
        adapter.parent.mkdir()
        shutil.copyfile(lora, adapter)
        check_lora(adapter)  # the copy diffusers reads is the file checked
        try:
            pipe = lazy.attr("diffusers", cls).from_pretrained(str(root), torch_dtype=torch.float32)
            before = {c: _fingerprint(getattr(pipe, c)) for c in weighted}
            pipe.load_lora_weights(
                str(adapter.parent), weight_name=adapter.name, use_safetensors=True, adapter_name="fewstep"
            )
            pipe.fuse_lora(lora_scale=scale, adapter_names=["fewstep"])
            pipe.unload_lora_weights()
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"--lora {lora.name} does not apply to this {cls} ({type(e).__name__}: {e})") from e
        changed = [c for c in weighted if _fingerprint(getattr(pipe, c)) != before[c]]
        if not changed:
            raise CheckpointError(f"--lora {lora.name} changed no weight of this {cls}: none of its keys matched")
        out: dict[str, Path] = {}
        for component in changed:
            target = work / "fused" / component
            getattr(pipe, component).save_pretrained(str(target), safe_serialization=True, max_shard_size="1000GB")
            name = WEIGHTS if (target / WEIGHTS).is_file() else TEXT_WEIGHTS
            out[f"{component}/{name}"] = target / name
    record = {"file": lora.name, "sha256": sha256_file(lora), "scale": scale, "fused_into": changed}
    return out, record


def fuse_network(
    network_class: str,
    config: Mapping[str, Any],
    state: dict[str, Any],
    lora: dict[str, Any],
    name: str,
    scale: float = 1.0,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`state` (the weights, in diffusers names, of the `network_class` that `config` builds) with the LoRA `lora`
    fused at `scale`, as diffusers fuses it into that network: `load_lora_adapter` (keys under `transformer.`, the
    layout a pipeline's `load_lora_weights` hands its transformer; `metadata`: the adapter config a diffusers-format
    file carries), `fuse_lora(lora_scale=scale)`, `unload_lora`. The network is built on the meta device and takes
    `state`'s own tensors, so nothing but the changed weights is allocated. CheckpointError (naming the file `name`)
    when the LoRA does not apply or changes nothing."""
    import torch

    _needs_peft()
    with torch.device("meta"):
        network = lazy.attr("diffusers", network_class).from_config(dict(config))
    network.load_state_dict(state, strict=True, assign=True)
    before = _fingerprint(network)
    try:
        network.load_lora_adapter(dict(lora), prefix="transformer", adapter_name="fewstep", metadata=metadata)
        network.fuse_lora(lora_scale=scale, adapter_names=["fewstep"])
        network.unload_lora()
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"--lora {name} does not apply to this {network_class} ({type(e).__name__}: {e})") from e
    if _fingerprint(network) == before:
        raise CheckpointError(f"--lora {name} changed no weight of this {network_class}: none of its keys matched")
    return dict(network.state_dict())


def read_wan_lora(path: Path, work: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A Wan LoRA's layers in diffusers names (keys under `transformer.`) and its adapter metadata, read as
    WanPipeline's `load_lora_weights` reads them (`WanLoraLoaderMixin.lora_state_dict`: LightX2V's and Kijai's
    `diffusion_model.` layout and musubi's converted, `alpha` folded in), from a checked copy of the safetensors
    file `path` made under `work`. Nothing of a pipeline is loaded. CheckpointError when it is not a readable LoRA."""
    check_lora(path)
    folder = work / "_lora"
    folder.mkdir()
    copy = folder / LORA_WEIGHTS
    shutil.copyfile(path, copy)
    check_lora(copy)  # the copy diffusers reads is the file checked
    _needs_peft()
    try:
        layers, metadata = lazy.attr("diffusers", "WanPipeline").lora_state_dict(
            str(folder), weight_name=LORA_WEIGHTS, use_safetensors=True, return_lora_metadata=True
        )
    except (ValueError, KeyError, RuntimeError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"--lora {path.name} is not a Wan LoRA diffusers reads ({type(e).__name__}: {e})") from e
    if not layers or not all("lora" in key for key in layers):
        raise CheckpointError(f"--lora {path.name} is not a LoRA: every key must name its `lora` layers")
    return dict(layers), metadata


def _needs_peft() -> None:
    try:
        importlib.import_module("peft")
    except ImportError as e:
        raise CheckpointError("--lora needs diffusers' LoRA backend: pip install 'fewstep[lora]' (peft)") from e


def _fingerprint(module: Any) -> tuple[float, float]:
    """Numbers that change when any weight does (every parameter's sum and sum of squares, in float64), one
    parameter at a time: a float64 copy of a whole 20B-parameter transformer (Qwen-Image's) would be 160 GB."""
    total, squares = 0.0, 0.0
    for p in module.parameters():
        x = p.detach().double()
        total += float(x.sum())
        squares += float((x * x).sum())
    return total, squares
