"""Test support: new versions of the shipped student, good and bad, as a training worker might push them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from fewstep.models.checkpoint import MANIFEST, WEIGHTS, read_manifest, save_checkpoint

State = dict[str, torch.Tensor]


def variant(src: Path, dst: Path, change: Callable[[State], State]) -> Path:
    """A checkpoint folder at `dst` with `src`'s manifest and `change(weights)`, hashed as a trainer would."""
    state = change(load_file(str(src / WEIGHTS)))
    manifest = read_manifest(src)
    manifest.pop("files")
    shutil.rmtree(dst, ignore_errors=True)
    save_checkpoint(dst, state, manifest)
    return dst


def jitter(sigma: float, seed: int = 0) -> Callable[[State], State]:
    """Every tensor plus Gaussian noise of `sigma` × its own spread: small sigma, a retrained-looking
    student; large sigma, a quality regression whose outputs are still finite."""

    def change(state: State) -> State:
        g = torch.Generator().manual_seed(seed)
        out = {}
        for k, v in state.items():
            spread = v.float().std().nan_to_num(0.0) if v.numel() > 1 else torch.tensor(0.0)
            out[k] = v + sigma * spread * torch.randn(v.shape, generator=g)
        return out

    return change


def nan_weights(state: State) -> State:
    name = next(k for k in sorted(state) if k.endswith("weight") and state[k].dim() == 4)
    return {**state, name: torch.full_like(state[name], float("nan"))}


def wrong_shapes(state: State) -> State:
    name = next(k for k in sorted(state) if k.endswith("weight") and state[k].dim() == 4)
    return {**state, name: state[name][:, :-1].contiguous()}


def truncate(folder: Path) -> None:
    """Cut the weights file in half after the manifest recorded its hash (an interrupted copy)."""
    path = folder / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_byte(folder: Path) -> None:
    """Same size, one byte changed (bit rot, or tampering)."""
    path = folder / WEIGHTS
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def add_pickle(folder: Path) -> None:
    """A `model.bin` named by the manifest beside the safetensors (what a torch.save export looks like)."""
    (folder / "model.bin").write_bytes(b"\x80\x04\x95\x00\x00\x00\x00")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["model.bin"] = {"sha256": "0" * 64, "bytes": 7}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def place(folder: Path, registry: Path, model: str, version: str) -> None:
    """Put a folder straight into a registry and point the model at it, bypassing `fewstep push`'s checks
    (a shared volume written by hand, or by another tool): the serving gate must still refuse it."""
    target = registry / model / version
    shutil.copytree(folder, target)
    manifest = json.loads((target / MANIFEST).read_text())
    manifest.update(name=model, version=version)
    (target / MANIFEST).write_text(json.dumps(manifest))
    point(registry, model, version)


def point(registry: Path, model: str, version: str) -> None:
    (registry / model / "PROMOTED").write_text(json.dumps({"version": version}))
