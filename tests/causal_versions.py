"""Test support: registry versions of causal Wan students written by hand, as `fewstep import` writes them
(the agreed layout: WanPipeline's component folders and a `manifest.json` of kind `diffusers-causal-video`), over
the tiny WanPipeline of `tests.pipelines.wan`. Until the import exists, this is how the engine's tests get one."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from fewstep.models.causal_families import CAUSAL_FAMILIES, CausalFamily
from fewstep.models.checkpoint import FORMAT, MANIFEST, sha256_file, write_json_atomic

SMALL_WINDOW = {"block_frames": 2, "window": 5, "sink": 1}
"""A windowed family at test sizes: blocks of 2 latent frames seeing the sink's 1 and the block before."""


def family(name: str) -> CausalFamily:
    """Family `name` as served, with `SMALL_WINDOW` where it has a window."""
    f = CAUSAL_FAMILIES[name]
    return dataclasses.replace(f, **SMALL_WINDOW) if f.window is not None else f


def causal_version(
    src: Path,
    folder: Path,
    causal: CausalFamily,
    name: str = "tiny-wan",
    size: tuple[int, int] = (32, 32),
    max_frames: int = 12,
    text_length: int = 32,
    version: str = "1",
) -> Path:
    """`src` (a saved WanPipeline) copied to `folder` with a manifest serving it as a `causal` student: `size`
    (width, height) pixel frames, streams of at most `max_frames` latent frames, prompts padded to `text_length`."""
    shutil.copytree(src, folder)
    files = {
        str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
    width, height = size
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "name": name,
        "version": version,
        "kind": "diffusers-causal-video",
        "pipeline": {
            "class": "WanPipeline",
            "components": {
                "transformer": "WanTransformer3DModel",
                "vae": "AutoencoderKLWan",
                "text_encoder": "UMT5EncoderModel",
                "tokenizer": "T5TokenizerFast",
            },
            "variants": {"transformer": None, "vae": None, "text_encoder": None, "tokenizer": None},
        },
        "causal": causal.to_dict(),
        "video": {
            "height": height,
            "width": width,
            "fps": 16,
            "max_frames": max_frames,
            "latent": {"channels": 16, "spatial": 8, "temporal": 4, "patch": [1, 2, 2]},
        },
        "text": {"max_tokens": text_length, "lengths": [text_length]},
        "imported": {"pipeline": "WanPipeline", "student": {"source": "tests.pipelines.wan"}},
        "files": files,
    }
    write_json_atomic(folder / MANIFEST, manifest)
    return folder
