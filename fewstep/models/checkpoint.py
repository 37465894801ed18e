"""Checkpoint I/O: safetensors weights plus a `manifest.json` that describes and hashes them.

A checkpoint folder holds exactly one manifest and the files it names: weights (only `.safetensors`
files are ever read as weights: no pickle anywhere), and for an imported diffusers pipeline its
components' configs and tokenizer files (`.json`, `.txt`) in nested folders (`unet/config.json`). Every
file is hashed, and every name is a relative path of plain names inside the folder. Anything else is
refused with `CheckpointError`.

Manifest (the fields fewstep reads; trainers may add more)::

    {"format": 1, "name": "shapes", "version": "1", "kind": "image" | "image-teacher" | "classifier",
     "architecture": {"class": "UNet2DConditionModel", "config": {...}},
     "text_encoder": {"name": "all-MiniLM-L6-v2", "max_tokens": 16, "dim": 384},
     "schedule": {...}, "native_size": "32x32",
     "files": {"model.safetensors": {"sha256": "...", "bytes": 123}},
     "metrics": {...}, "trainer": {...}}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from fewstep.errors import CheckpointError

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
FORMAT = 1
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_DEPTH = 3
MAX_SIDE = 8192
"""Largest native width or height a manifest may give: warm-up, the gate's probes and every request without a
`size` run at it (the service's `image_max_side` bounds it further)."""
FILE_SUFFIXES = (".safetensors", ".onnx", ".json", ".txt", ".jinja")
"""What a manifest may name: safetensors weights, ONNX graphs, and JSON / text configs, vocabularies and chat
templates (`chat_template.jinja`, which transformers saves beside an LLM tokenizer)."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
"""Formats that may execute code when loaded: a folder holding one is refused without opening it."""


def check_relative(name: str) -> str:
    """`name` if it is a relative path of at most `MAX_DEPTH` plain names (`unet/config.json`), else
    CheckpointError: no absolute paths, no `..`, no hidden or odd names."""
    parts = name.split("/")
    if len(parts) > MAX_DEPTH or not all(_FILE_NAME.match(p) for p in parts) or name == MANIFEST:
        raise CheckpointError(f"unsafe file name {name!r} in manifest")
    return name


def copy_hashed(src: Path, dst: Path) -> dict[str, Any]:
    """Copy `src` to `dst` in chunks, hashing on the way (a multi-GB file is never read whole); the file's
    manifest entry."""
    h = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for chunk in iter(lambda: fin.read(1 << 20), b""):
            h.update(chunk)
            fout.write(chunk)
            size += len(chunk)
    return {"sha256": h.hexdigest(), "bytes": size}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON beside `path`, fsync, then rename over it: readers never see half a file."""
    # A writer-unique name: the PID is 1 in every container, and pods share the registry volume.
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir(built: Path, target: Path) -> None:
    """Move the finished folder `built` to `target`, replacing an older one whole: the old one is moved aside
    first (a writer-unique name), so `target` is never half removed."""
    if target.exists():
        old = target.with_name(f".old-{target.name}-{secrets.token_hex(8)}")
        os.replace(target, old)
        shutil.rmtree(old)
    os.replace(built, target)


def save_checkpoint(folder: Path, state: dict[str, torch.Tensor], manifest: dict[str, Any]) -> dict[str, Any]:
    """Write `state` as safetensors and the manifest (with file hashes) into `folder`.

    Returns the manifest as written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(weights))
    manifest = dict(manifest)
    manifest["format"] = FORMAT
    manifest["files"] = {WEIGHTS: {"sha256": sha256_file(weights), "bytes": weights.stat().st_size}}
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    """The parsed manifest of `folder`; CheckpointError when missing or malformed."""
    path = folder / MANIFEST
    if not path.is_file() or path.is_symlink():
        raise CheckpointError(f"{folder}: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a format-{FORMAT} manifest")
    for key in ("name", "kind", "files"):
        if key not in manifest:
            raise CheckpointError(f"{path}: manifest lacks {key!r}")
    return manifest


def read_verified(path: Path, sha256: str | None, label: str) -> bytes:
    """The bytes of `path`, read once and checked against `sha256`: what the caller loads is what was
    hashed (hashing a file and then opening it again by path leaves a window to swap it)."""
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(f"{label} does not match its sha256 in the manifest")
    return data


def verify_files(folder: Path, manifest: dict[str, Any], hashed_on_load: tuple[str, ...] = ()) -> None:
    """Check every file the manifest names: a safe relative path, an allowed kind of file, size and sha256
    (except for `hashed_on_load`, whose caller reads them with `read_verified`)."""
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{folder}: manifest names no files")
    refuse_pickles(folder)
    for name, meta in files.items():
        try:
            check_relative(name)
        except CheckpointError as e:
            raise CheckpointError(f"{folder}: {e}") from e
        path = folder
        for part in name.split("/"):
            path = path / part
            if path.is_symlink():
                raise CheckpointError(f"{folder}: {name} is a symlink (or lies in one); links are refused")
        if not path.is_file():
            raise CheckpointError(f"{folder}: {name} is missing or not a regular file")
        if not name.endswith(FILE_SUFFIXES):
            raise CheckpointError(f"{folder}: {name}: only safetensors weights and JSON / text configs are accepted")
        if path.stat().st_size != meta.get("bytes"):
            raise CheckpointError(
                f"{folder}: {name} has {path.stat().st_size} bytes, manifest says {meta.get('bytes')}"
            )
        if name not in hashed_on_load and sha256_file(path) != meta.get("sha256"):
            raise CheckpointError(f"{folder}: {name} does not match its sha256 in the manifest")


def refuse_pickles(folder: Path) -> None:
    """CheckpointError if `folder` (or a folder inside it) holds a pickle-format file, named or not; such files
    are never opened.

    A stray `model.bin` beside good safetensors is how unsafe weights end up loaded by the next
    tool that looks for them, so the whole folder is refused.
    """
    if not folder.is_dir():
        return
    found = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.lower().endswith(PICKLE_SUFFIXES))
    if found:
        raise CheckpointError(
            f"{folder}: holds {', '.join(found)}: pickle-format files are refused unread (safetensors only)"
        )


def load_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Manifest and weights of a verified checkpoint folder."""
    manifest = read_manifest(folder)
    verify_files(folder, manifest, hashed_on_load=(WEIGHTS,))
    if WEIGHTS not in manifest["files"]:
        raise CheckpointError(f"{folder}: manifest does not name {WEIGHTS}")
    data = read_verified(folder / WEIGHTS, manifest["files"][WEIGHTS].get("sha256"), f"{folder}: {WEIGHTS}")
    try:
        state = load_safetensors(data)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{folder}: cannot read {WEIGHTS} ({e})") from e
    return manifest, state


def reference(folder: Path) -> dict[str, Any]:
    """How a manifest names another model (a teacher, a first-frame model): by name, version and the
    sha256 of its weights, so that exactly those weights are found again (`Registry.named_dir`)."""
    m = read_manifest(folder)
    return {"name": m["name"], "version": m.get("version"), "sha256": m["files"][WEIGHTS]["sha256"]}
