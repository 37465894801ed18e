"""`fewstep import`: a user's diffusers pipeline folder becomes a registry version.

The folder is a saved pipeline (`model_index.json` beside one folder per component), or a hub-cache
snapshot of one, whose files are links into the same cache's `blobs/`: those links, and no others, are
followed. Every component the pipeline needs is copied with its configs, tokenizer files and safetensors
weights, each file hashed while it is copied (a multi-GB folder is never read whole); pickle-format files
are never opened. `unet` may be replaced by a student UNet file (how SDXL-Lightning and DMD2 ship their
students); a pickle one is converted only when asked (`torch.load(weights_only=True)`, recorded in the
manifest). The family's recipe (`models.families`) is resolved against the pipeline and kept in the
manifest. Everything is checked before anything is written: a refusal leaves the registry as it was.

A Wan 2.1 text-to-video pipeline (`WanPipeline`) is the base of causal video students (Self-Forcing, CausVid,
LongLive, Rolling Forcing): `import_causal_video` copies it the same way, with the student's transformer in place of
the base's (its own checkpoint layout read by `models.wan_keys`, a LoRA fused into it by `models.lora.fuse_network`),
and the causal family (`models.causal_families`), the video sizes and the text length in a `diffusers-causal-video`
manifest, which the streaming engine reads. `import_pipeline` refuses such a base, naming the causal families.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fewstep.errors import CheckpointError
from fewstep.models import families, lazy, wan_keys
from fewstep.models.anyflow_far import DEFAULT_STEPS, FAR_FAMILY, FAR_PIPELINES, SERVED_STEPS, FARFamily
from fewstep.models.architectures import (
    CLIP_TOKENIZERS,
    T5_TOKENIZERS,
    Adapter,
    Architecture,
    Geometry,
    by_pipeline,
    config_int,
)
from fewstep.models.causal_families import CAUSAL_FAMILIES, MAX_STREAM_FRAMES, CausalFamily
from fewstep.models.checkpoint import MAX_SIDE, PICKLE_SUFFIXES, sha256_file
from fewstep.models.lora import fuse as fuse_lora
from fewstep.models.lora import fuse_network, read_wan_lora
from fewstep.models.registry import Registry
from fewstep.models.wan_clip import CLIP_FAMILIES
from fewstep.models.wan_keys import Which

CONFIG_LIMIT = 4 << 20
"""Largest config or tokenizer JSON read (bytes): untrusted input is bounded before it is parsed."""
KNOWN_FILES = frozenset(
    {
        "config.json",
        "scheduler_config.json",
        "tokenizer_config.json",
        "tokenizer.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
    }
)
"""The config and tokenizer files a component may carry; others (READMEs, notes, anything else) are not copied."""
BLOB_NAME = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
"""A hub cache's blob file names: the git (sha1) or LFS (sha256) hash of the content."""
MAX_TOKENS = 1024
"""Largest `model_max_length` a tokenizer may have (CLIP's is 77; a larger one the text encoder cannot embed)."""
SCHEDULER = "scheduler"
IGNORED = ("safety_checker", "feature_extractor", "image_encoder")
"""Optional components fewstep does not run (the safety checker is not applied); they are not copied."""
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


class Source:
    """A pipeline folder, read under its containment rule: plain files, or (a hub snapshot) links into the
    cache's own `blobs/`."""

    def __init__(self, path: Path) -> None:
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a folder")
        self.root = path.absolute()
        blobs = self.root.parent.parent / "blobs"
        # A cache whose `blobs` or `snapshots` is itself a link could send its links anywhere: not a cache.
        real = self.root.parent.name == "snapshots" and blobs.is_dir()
        real = real and not blobs.is_symlink() and not self.root.parent.is_symlink()
        self.blobs = blobs.resolve() if real else None

    def file(self, rel: str) -> Path:
        """The real file behind `rel`, or CheckpointError when it is missing or escapes the folder: a link must
        point at a blob-named file of the snapshot's own cache, and no file may be a hard link (whose other
        names may be anywhere on the machine)."""
        path = self.root
        for part in rel.split("/"):
            path = path / part
            if path.is_symlink():
                target = path.resolve()
                inside = self.blobs is not None and target.parent == self.blobs and BLOB_NAME.fullmatch(target.name)
                if not inside or not target.is_file():
                    raise CheckpointError(f"{rel} is a link that leaves the pipeline folder; links are refused")
        if not path.is_file():
            raise CheckpointError(f"{rel} is missing")
        real = path.resolve() if path.is_symlink() else path
        if real.stat().st_nlink > 1:
            raise CheckpointError(f"{rel} is a hard link (it has {real.stat().st_nlink} names); copy it instead")
        return real

    def listing(self, folder: str) -> list[str]:
        d = self.root / folder
        if d.is_symlink() or not d.is_dir():
            raise CheckpointError(f"component folder {folder!r} is missing (or is a link)")
        return sorted(p.name for p in d.iterdir() if not p.name.startswith("."))

    def json(self, rel: str) -> dict[str, Any]:
        path = self.file(rel)
        if path.stat().st_size > CONFIG_LIMIT:
            raise CheckpointError(f"{rel} is larger than {CONFIG_LIMIT} bytes")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{rel} is not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise CheckpointError(f"{rel} is not a JSON object")
        return data


def _weights(src: Source, component: str) -> tuple[list[str], str | None]:
    """The safetensors files of a component (an index and its shards, or one file), preferring full precision
    over a variant; and the variant taken (`fp16`), if any. CheckpointError when only pickles are there."""
    names = src.listing(component)
    tensors = [n for n in names if n.endswith(".safetensors")]
    if not tensors:
        pickles = [f"{component}/{n}" for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise CheckpointError(
                f"weights only in pickle formats ({', '.join(pickles)}): fewstep reads safetensors only; "
                "convert them (`diffusers` `save_pretrained(safe_serialization=True)`)"
            )
        raise CheckpointError(f"component {component!r} has no weights")

    by_variant: dict[str | None, list[str]] = {}
    for n in tensors:
        by_variant.setdefault(_variant(n), []).append(n)
    chosen = None if None in by_variant else "fp16" if "fp16" in by_variant else sorted(by_variant, key=str)[0]
    suffix = ".safetensors.index.json" if chosen is None else f".{chosen}.safetensors.index.json"
    index = [n for n in names if n.endswith(suffix) and _variant(n.removesuffix(".index.json")) == chosen]
    return [f"{component}/{n}" for n in by_variant[chosen] + index], chosen


def _variant(name: str) -> str | None:
    """`fp16` of `diffusion_pytorch_model.fp16.safetensors` (or of a shard of it); None without a variant."""
    stem = name.removesuffix(".safetensors")
    if "." not in stem:
        return None
    tail = stem.rsplit(".", 1)[1]
    return tail.split("-", 1)[0] if "-of-" in tail else tail


def _configs(src: Source, component: str) -> list[str]:
    """The config and tokenizer files of a component (`KNOWN_FILES`: configs, vocabularies and merges)."""
    return [f"{component}/{n}" for n in src.listing(component) if n in KNOWN_FILES]


def _check_index(src: Source, weights: list[str]) -> None:
    """Every shard a weights index maps to must be one of the safetensors files copied beside it: an index that
    names another file (a pickle, say) would make serving load what was never hashed or checked."""
    shards = {rel.rsplit("/", 1)[1] for rel in weights if rel.endswith(".safetensors")}
    for rel in (r for r in weights if r.endswith(".index.json")):
        weight_map = src.json(rel).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{rel} has no `weight_map`")
        strays = sorted({str(v)[:80] for v in weight_map.values() if not isinstance(v, str) or v not in shards})
        if strays:
            raise CheckpointError(
                f"{rel} maps weights to {strays[:3]}: an index may name only the safetensors files beside it "
                f"({sorted(shards)})"
            )


def _check_unet_file(path: Path, config: dict[str, Any]) -> None:
    """CheckpointError unless the safetensors file at `path` holds exactly the tensors the UNet config builds."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own types for bad headers
        raise CheckpointError(f"--unet {path.name} is not a readable safetensors file ({e})") from e
    unet_class = lazy.attr("diffusers", "UNet2DConditionModel")
    with torch.device("meta"):
        unet = unet_class.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    want = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or extra or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[:2]})"] if missing else []
        parts += [f"{len(extra)} unexpected (e.g. {extra[:2]})"] if extra else []
        parts += (
            [f"{len(wrong)} of other shapes (e.g. {wrong[0]}: {got[wrong[0]]} for {want[wrong[0]]})"] if wrong else []
        )
        raise CheckpointError(f"--unet {path.name} does not fit the pipeline's UNet config: {'; '.join(parts)} tensors")


def _student_unet(path: Path, convert_pickle: bool, work: Path) -> tuple[Path, dict[str, Any]]:
    """The `--unet` file as safetensors, and how it was obtained (recorded in the manifest)."""
    if path.is_symlink() or not path.is_file():
        raise CheckpointError(f"--unet {path}: not a regular file")
    record: dict[str, Any] = {"file": path.name, "sha256": sha256_file(path)}
    if path.name.endswith(".safetensors"):
        return path, record
    if not path.name.lower().endswith(PICKLE_SUFFIXES):
        raise CheckpointError(f"--unet {path.name}: neither safetensors nor a known pickle format")
    if not convert_pickle:
        raise CheckpointError(
            f"--unet {path.name} is a pickle file; fewstep converts one only with `--convert-pickle` "
            "(it is then loaded with torch.load(weights_only=True) and stored as safetensors)"
        )
    import torch
    from safetensors.torch import save_file

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # an unsafe or corrupt pickle: weights_only refuses it
        raise CheckpointError(f"--unet {path.name}: torch.load(weights_only=True) refused it ({e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"--unet {path.name}: not a dict of tensors")
    out = work / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    record["converted_from_pickle"] = "torch.load(weights_only=True) → safetensors"
    return out, record


def import_pipeline(
    path: Path,
    name: str,
    registry: Registry,
    family: str | None = None,
    unet: Path | None = None,
    teacher: str | None = None,
    convert_pickle: bool = False,
    steps: list[int] | None = None,
    handoff: str | None = None,
    teacher_guidance: float = 0.0,
    lora: Path | None = None,
    lora_scale: float = 1.0,
) -> tuple[str, str]:
    """Import the pipeline at `path` as the next version of `name`; returns (name, version).
    `family="base"` imports a base model, served only as a student's teacher (`teacher`); `handoff`: the hybrid's
    (default `trajectory` for flow pairs, `renoise` for UNet pairs); `lora`: a distillation LoRA fused into its
    networks at `lora_scale` (`models.lora`)."""
    src = Source(path)
    index = src.json("model_index.json")
    cls = str(index.get("_class_name"))
    if cls in CAUSAL_VIDEO.pipelines:
        given = f" (given {family[:40]!r})" if family else ""
        raise CheckpointError(
            f"a {cls} is the base of causal video students: import it with a causal family, "
            f"--family {' | '.join(CAUSAL_FAMILIES)}; a few-step clip student (or a base with its distillation LoRA) "
            f"with a clip family, --family {' | '.join(CLIP_FAMILIES)}{given}"
        )
    if cls in FAR.pipelines:
        raise CheckpointError(
            f"a {cls} is a causal video student of its own (family {FAR_FAMILY}): import it with `import_far` "
            "(`fewstep import` reads it so without --family)"
        )
    arch = by_pipeline(cls)
    files, components, variants = _components(src, index, arch, cls, replaced="unet" if unet is not None else None)
    shipped_scheduler = src.json("scheduler/scheduler_config.json")
    network_config = src.json(f"{arch.network}/config.json")
    vae_config = src.json("vae/config.json")
    with tempfile.TemporaryDirectory() as work:
        imported: dict[str, Any] = {"pipeline": cls}
        if unet is not None:
            if arch.network != "unet":
                raise CheckpointError(f"--unet replaces a UNet; a {cls} has a {arch.network}")
            unet_file, imported["unet"] = _student_unet(Path(unet), convert_pickle, Path(work))
            _check_unet_file(unet_file, network_config)
            files[UNET_WEIGHTS] = unet_file
            variants["unet"] = None
        if lora is not None:
            weighted = [c for c in components if c in arch.weighted]
            fused, imported["lora"] = fuse_lora(cls, files, weighted, Path(lora), lora_scale, Path(work))
            for component in imported["lora"]["fused_into"]:
                _drop_weights(files, variants, component)
            files.update(fused)
        embeds = network_config.get("time_cond_proj_dim") is not None or bool(network_config.get("guidance_embeds"))
        recipe = None
        g = arch.adapter.geometry(network_config, vae_config)
        if family != "base":
            cells = g.side // g.vae_factor
            recipe = families.resolve(
                family or families.detect(shipped_scheduler, embeds, arch.name, index), shipped_scheduler, embeds,
                steps, arch.name, arch.adapter.tokens(cells, cells),
            )  # fmt: skip
        lengths = _check_tokenizers(files, arch, components, recipe.max_sequence_length if recipe else None)
        manifest = _manifest(name, arch, cls, components, variants, g, lengths, imported)
        if family == "base":
            manifest["kind"] = "diffusers-teacher"
            manifest["scheduler"] = {k: v for k, v in shipped_scheduler.items() if not k.startswith("_")} | {
                "_class_name": shipped_scheduler.get("_class_name")
            }
        else:
            assert recipe is not None
            manifest["recipe"] = recipe.to_dict()
        if teacher is not None:
            # Flow teachers hand off along their ODE by default: their x0 estimate at t = 1 is the same for every
            # seed, so re-noising it forgets the seed (tests/engines/test_latent.py shows it).
            chosen = handoff or ("trajectory" if arch.schedulers == "flow" else "renoise")
            manifest["teacher"], manifest["hybrid"] = _teacher(registry, teacher, files, arch, chosen, teacher_guidance)
        return registry.publish_files(files, manifest, model=name, promote=True)


def _components(
    src: Source, index: dict[str, Any], arch: Architecture, cls: str, replaced: str | None = None
) -> tuple[dict[str, Path], dict[str, str], dict[str, str | None]]:
    """The files to copy (relative path → verified source file: `model_index.json`, every component's configs and
    weights, the scheduler config), each component's class and the weight variant taken, for a `cls` pipeline of
    `arch` whose `model_index.json` is `index`. `replaced`: a network whose weights come from elsewhere (its
    configs are still copied; its own weights are neither read nor required). CheckpointError for a component
    the architecture does not have or of a class it does not take, or one it needs and the folder lacks."""
    files: dict[str, Path] = {"model_index.json": src.file("model_index.json")}
    components: dict[str, str] = {}
    variants: dict[str, str | None] = {}
    for key, value in sorted(index.items()):
        if key.startswith("_") or not isinstance(value, list) or key in IGNORED or value[1:] == [None]:
            continue
        if key == SCHEDULER:
            continue
        if key not in arch.components:
            raise CheckpointError(f"component {key!r} ({value[-1]}) is not supported in a {cls}")
        if value[-1] not in arch.components[key]:
            raise CheckpointError(
                f"{key} class {value[-1]!r} is not supported; supported: {list(arch.components[key])}"
            )
        components[key] = str(value[-1])
    missing = sorted(set(arch.components) - set(components))
    if missing or SCHEDULER not in index:
        needs = sorted([*arch.components, SCHEDULER])
        raise CheckpointError(f"the pipeline lacks {', '.join(missing or [SCHEDULER])}; a {cls} needs {needs}")
    for key in components:
        for rel in _configs(src, key):
            files[rel] = src.file(rel)
        if key in arch.weighted and key != replaced:
            weights, variants[key] = _weights(src, key)
            _check_index(src, weights)
            files.update({rel: src.file(rel) for rel in weights})
    files["scheduler/scheduler_config.json"] = src.file("scheduler/scheduler_config.json")
    return files, components, variants


def _drop_weights(files: dict[str, Path], variants: dict[str, str | None], component: str) -> None:
    """Forget `component`'s weight files (new ones, without a variant, take their place)."""
    for rel in [r for r in files if r.startswith(f"{component}/") and r.endswith(WEIGHT_SUFFIXES)]:
        del files[rel]
    variants[component] = None


def _manifest(
    name: str,
    arch: Architecture,
    cls: str,
    components: dict[str, str],
    variants: dict[str, str | None],
    g: Geometry,
    lengths: list[int],
    imported: dict[str, Any],
) -> dict[str, Any]:
    return {
        "name": name,
        "version": "1",
        "kind": "diffusers",
        "pipeline": {"class": cls, "arch": arch.name, "components": components, "variants": variants},
        "native_size": f"{g.side}x{g.side}",
        "latent": {"channels": g.channels, "vae_scale_factor": g.vae_factor, "size_multiple": g.multiple},
        "text": {"max_tokens": lengths[0], "lengths": lengths},
        "imported": imported,
    }


def _check_tokenizers(
    files: dict[str, Path], arch: Architecture, components: dict[str, str], sequence: int | None
) -> list[int]:
    """Each tokenizer, as it will be copied, loads and encodes a prompt into ids its text encoder can embed: its
    padded length (`model_max_length`; a T5 or LLM encoder's: the family's `max_sequence_length`, or what the
    architecture pads that to: `Adapter.length`, e.g. with the chat template's tokens the encoding drops) at most
    the encoder's positions (a CLIP tokenizer saying 78 for 77 positions fails at the first request), ids below its
    vocabulary (a vision-language encoder's: its `text_config`). Each tokenizer's padded length."""
    lengths: list[int] = []
    with tempfile.TemporaryDirectory() as work:
        for tok_name, enc_name in zip(arch.tokenizers, arch.encoders, strict=True):
            folder = Path(work) / tok_name
            folder.mkdir()
            for rel, path in files.items():
                if rel.startswith(f"{tok_name}/"):
                    shutil.copyfile(path, folder / rel.split("/", 1)[1])
            encoder = json.loads(files[f"{enc_name}/config.json"].read_text())
            if isinstance(encoder.get("text_config"), dict):  # a vision-language encoder's text settings (Qwen2.5-VL)
                encoder = {**encoder, **encoder["text_config"]}
            relative = "relative_attention_num_buckets" in encoder  # T5: relative positions, no table to overrun
            where = f"{enc_name}/config.json"
            positions = min(
                config_int(encoder, "max_position_embeddings", where, MAX_TOKENS if relative else 77, 1 << 20),
                MAX_TOKENS,
            )
            vocabulary = config_int(encoder, "vocab_size", f"{enc_name}/config.json", 49408, 1 << 24)
            # CLIP encodes its own 77 tokens; a T5 or LLM encoder the family's `max_sequence_length`.
            clip = components[tok_name] in CLIP_TOKENIZERS
            try:
                tok = lazy.attr("transformers", components[tok_name]).from_pretrained(str(folder))
                length = (
                    arch.adapter.length(tok, len(lengths), sequence)
                    if not clip and sequence is not None
                    else tok.model_max_length
                )
                if not isinstance(length, int) or not 1 <= length <= positions:
                    raise CheckpointError(
                        f"its `model_max_length` must be at most {enc_name}'s `max_position_embeddings` ({positions})."
                        f" Given: {str(length)[:40]}"
                    )
                ids = tok(["a red circle"], padding="max_length", max_length=length, truncation=True).input_ids[0]
            except CheckpointError as e:
                raise CheckpointError(f"{tok_name}: {e}") from e
            except Exception as e:  # whatever the tokenizer files make transformers raise
                raise CheckpointError(f"{tok_name} does not load and encode a prompt ({type(e).__name__}: {e})") from e
            if len(ids) != length or not all(0 <= i < vocabulary for i in ids):
                raise CheckpointError(f"{tok_name} makes token ids {enc_name} cannot embed (vocabulary {vocabulary})")
            lengths.append(length)
    return lengths


def _teacher(
    registry: Registry, teacher: str, files: dict[str, Path], arch: Architecture, handoff: str, guidance: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The reference to a base pipeline in the registry of the student's architecture that shares its VAE and text
    encoders (identified by its denoiser's first weights file)."""
    if handoff not in ("renoise", "trajectory"):
        raise CheckpointError(f"--handoff must be renoise or trajectory. Given: {handoff!r}")
    version = registry.promoted(teacher)
    if version is None:
        raise CheckpointError(f"--teacher {teacher!r} is not in the registry: import the base pipeline first")
    theirs = registry.validate(teacher, version)
    if theirs.get("kind") not in ("diffusers", "diffusers-teacher"):
        raise CheckpointError(f"--teacher {teacher!r} is not an imported diffusers pipeline")
    if theirs.get("pipeline", {}).get("arch") != arch.name:
        raise CheckpointError(f"--teacher {teacher!r} is not a {arch.name} pipeline, as the student is")
    shared = [r for r in files if r.split("/")[0] in ("vae", *arch.encoders) and r.endswith("tensors")]
    for rel in shared:
        if theirs["files"].get(rel, {}).get("sha256") != sha256_file(files[rel]):
            raise CheckpointError(f"--teacher {teacher!r} does not share the student's {rel.split('/')[0]}")
    weights = sorted(r for r in theirs["files"] if r.startswith(f"{arch.network}/") and r.endswith(".safetensors"))
    if not weights:
        raise CheckpointError(f"--teacher {teacher!r} has no {arch.network} weights")
    ref = {"name": teacher, "version": version, "sha256": theirs["files"][weights[0]]["sha256"], "file": weights[0]}
    return ref, {"handoff": handoff, "teacher_guidance": float(guidance)}


CAUSAL_VIDEO = Architecture(
    "wan-causal",
    ("WanPipeline",),
    "transformer",
    {
        "transformer": ("WanTransformer3DModel",),
        "vae": ("AutoencoderKLWan",),
        "text_encoder": ("UMT5EncoderModel",),
        "tokenizer": T5_TOKENIZERS,
    },
    ("text_encoder",),
    ("tokenizer",),
    "flow",
    Adapter(),
)
"""The base pipeline of causal video students (Wan 2.1 text-to-video in diffusers format): the components
`import_causal_video` copies. Not an image architecture: `by_pipeline` does not know it and its adapter is never
called; the causal family (`models.causal_families`) says how it samples."""
CAUSAL_KIND = "diffusers-causal-video"
NATIVE_VIDEO = (832, 480)
"""The causal families' served frame (width, height): every source trains and samples Wan 2.1 at 480×832."""
FULL_CAUSAL_FRAMES = 21
"""Latent frames a full-causal student streams by default: its sources' training and sampling length (81 frames)."""
WAN_FPS = 16
"""Wan 2.1's frame rate (`export_to_video(..., fps=16)` in its pipelines and the students' demos)."""
WAN_TOKENS = 512
"""Wan's `max_sequence_length`: UMT5 prompts padded to 512 tokens."""
STUDENT_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
CLIP_KIND = "diffusers-video"
CLIP_FRAMES = 81
"""Pixel frames a bidirectional Wan clip may have by default: Wan 2.1's (and its students') 5 s at 16 fps."""
MAX_LORA_ALPHA = 65536.0
"""Largest `lora_alpha` taken (LongLive's is 256, its rank)."""
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn"}
"""safetensors' names of the floating-point dtypes a transformer may be stored in (any other reads as integral)."""


def import_causal_video(
    path: Path,
    name: str,
    registry: Registry,
    family: str,
    student: Path | None = None,
    convert_pickle: bool = False,
    which: Which = "ema",
    size: tuple[int, int] | None = None,
    max_frames: int | None = None,
    lora: Path | None = None,
    lora_alpha: float | None = None,
    max_tokens: int = WAN_TOKENS,
) -> tuple[str, str]:
    """Import the Wan 2.1 text-to-video pipeline at `path` (a folder or a hub snapshot, under `Source`'s
    containment) with a causal student's transformer as the next version of `name`, kind `diffusers-causal-video`,
    sampled by the causal `family`; returns (name, version).

    The student is the file `student` (its own checkpoint layout or diffusers names, read by
    `wan_keys.load_student`: a pickle only with `convert_pickle`, under `weights_only`; `which` of its generator
    states), stored as safetensors in place of the pipeline's transformer; without it, the pipeline's own
    transformer is the student (a converted student's diffusers folder), copied as it is. `lora`: a LoRA over the
    student (LongLive's PEFT `lora.pt`, `wan_keys.load_lora`, its `lora_alpha` given as `lora_alpha`: None takes
    it equal to the rank) fused into it. `size` (width, height) the served frame, default 832×480, a multiple of
    the VAE's factor × the transformer's patch; `max_frames` the stream's bound in latent frames, a multiple of
    the family's block (default: 21 for a full-causal family, the RoPE table for a windowed one); `max_tokens` the
    prompts' padded length. The manifest keeps the family, the video sizes, the text length and how the student
    was read (its file's sha256). Everything is checked before anything is written."""
    if family not in CAUSAL_FAMILIES:
        raise CheckpointError(f"unknown causal family {str(family)[:40]!r}; known: {list(CAUSAL_FAMILIES)}")
    causal = CAUSAL_FAMILIES[family]
    if lora_alpha is not None and (lora is None or not 0.0 < lora_alpha <= MAX_LORA_ALPHA):
        raise CheckpointError(
            f"--lora-alpha must be a number in (0, {MAX_LORA_ALPHA}] with --lora. Given: {lora_alpha}"
            + ("" if lora is not None else ", and no --lora")
        )
    src = Source(path)
    index = src.json("model_index.json")
    cls = str(index.get("_class_name"))
    if cls not in CAUSAL_VIDEO.pipelines:
        raise CheckpointError(
            f"a causal video student goes over a {' or '.join(CAUSAL_VIDEO.pipelines)} (Wan 2.1 text-to-video in "
            f"diffusers format). Given: {cls[:80]!r}"
        )
    replaced = "transformer" if student is not None else None
    files, components, variants = _components(src, index, CAUSAL_VIDEO, cls, replaced)
    network_config = src.json("transformer/config.json")
    video = _video(causal, network_config, src.json("vae/config.json"), size, max_frames)
    _check_text_width(src, network_config)
    with tempfile.TemporaryDirectory() as work:
        imported: dict[str, Any] = {"pipeline": cls}
        state: dict[str, Any] | None = None
        if student is not None:
            state, imported["student"] = wan_keys.load_student(Path(student), network_config, convert_pickle, which)
            imported["student"]["sha256"] = sha256_file(Path(student))
        else:
            weights = {r: p for r, p in files.items() if r.startswith("transformer/") and r.endswith(".safetensors")}
            wan_keys.check_fits(_tensors(weights, read=False), network_config)
            imported["student"] = {"layout": "diffusers", "files": sorted(weights)}
            if lora is not None:
                state = _tensors(weights, read=True)
        if lora is not None:
            assert state is not None
            layers, imported["lora"] = wan_keys.load_lora(Path(lora), convert_pickle, lora_alpha)
            state = fuse_network("WanTransformer3DModel", network_config, state, layers, Path(lora).name)
            imported["lora"] |= {"sha256": sha256_file(Path(lora)), "fused_into": ["transformer"]}
        if state is not None:
            from safetensors.torch import save_file

            _drop_weights(files, variants, "transformer")
            files[STUDENT_WEIGHTS] = Path(work) / "student.safetensors"
            save_file({k: v.contiguous() for k, v in state.items()}, str(files[STUDENT_WEIGHTS]))
        lengths = _check_tokenizers(files, CAUSAL_VIDEO, components, max_tokens)
        manifest = _causal_manifest(name, cls, components, variants, causal.to_dict(), video, lengths, imported)
        return registry.publish_files(files, manifest, model=name, promote=True)


def _causal_manifest(
    name: str,
    cls: str,
    components: dict[str, str],
    variants: dict[str, str | None],
    causal: dict[str, Any],
    video: dict[str, Any],
    lengths: list[int],
    imported: dict[str, Any],
) -> dict[str, Any]:
    """A causal video student's manifest (`diffusers-causal-video`): its family's section `causal`, which says how
    it samples, beside the sections every causal student's engine reads alike (`video`, `text`)."""
    return {
        "name": name,
        "version": "1",
        "kind": CAUSAL_KIND,
        "pipeline": {"class": cls, "components": components, "variants": variants},
        "causal": causal,
        "video": video,
        "text": {"max_tokens": lengths[0], "lengths": lengths},
        "imported": imported,
    }


def _check_text_width(src: Source, network: dict[str, Any]) -> None:
    """CheckpointError unless the transformer's `text_dim` is the text encoder's width."""
    text_dim = config_int(network, "text_dim", "transformer/config.json", 4096, 1 << 16)
    encoder_dim = config_int(src.json("text_encoder/config.json"), "d_model", "text_encoder/config.json", 4096, 1 << 16)
    if text_dim != encoder_dim:
        raise CheckpointError(
            f"transformer/config.json: `text_dim` must be the text encoder's width ({encoder_dim}). Given: {text_dim}"
        )


def import_clip_video(
    path: Path,
    name: str,
    registry: Registry,
    family: str,
    lora: Path | None = None,
    lora_scale: float = 1.0,
    size: tuple[int, int] | None = None,
    frames: int | None = None,
    max_tokens: int = WAN_TOKENS,
) -> tuple[str, str]:
    """Import the Wan 2.1 text-to-video pipeline at `path` (a folder or a hub snapshot, under `Source`'s
    containment), whose transformer is a few-step bidirectional student (or becomes one with `lora`), as the next
    version of `name`, kind `diffusers-video`, sampled by the clip `family` (`models.wan_clip`); returns (name,
    version).

    `lora`: a distillation LoRA over the transformer (LightX2V's, Kijai's or diffusers' layout: read as WanPipeline's
    `load_lora_weights` reads it, safetensors only) fused into it at `lora_scale`, as `fuse_lora(lora_scale=...)`
    fuses it. `size` (width, height): the served frame, default 832×480, a multiple of the VAE's factor × the
    transformer's patch; `frames`: the longest clip in pixel frames (1 + 4k, default 81, within the transformer's
    RoPE table); `max_tokens`: the prompts' padded length. The manifest keeps the family, the video sizes (its
    `video.max_frames` in latent frames, as a causal student's), the text length and the LoRA's record. Everything is
    checked before anything is written."""
    if family not in CLIP_FAMILIES:
        raise CheckpointError(f"unknown clip family {str(family)[:40]!r}; known: {list(CLIP_FAMILIES)}")
    clip = CLIP_FAMILIES[family]
    if lora is None and lora_scale != 1.0:
        raise CheckpointError(f"--lora-scale is taken with --lora only. Given: {lora_scale}")
    if not 0.0 < lora_scale <= 4.0:
        raise CheckpointError(f"--lora-scale must be in (0, 4]. Given: {lora_scale}")
    src = Source(path)
    index = src.json("model_index.json")
    cls = str(index.get("_class_name"))
    if cls not in CAUSAL_VIDEO.pipelines:
        raise CheckpointError(
            f"a bidirectional video student is a {' or '.join(CAUSAL_VIDEO.pipelines)} (Wan 2.1 text-to-video in "
            f"diffusers format). Given: {cls[:80]!r}"
        )
    files, components, variants = _components(src, index, CAUSAL_VIDEO, cls)
    network_config = src.json("transformer/config.json")
    video, rope = _wan_video(network_config, src.json("vae/config.json"), size)
    temporal = video["latent"]["temporal"]
    most = 1 + temporal * (rope - 1)
    count = CLIP_FRAMES if frames is None else frames
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= most or (count - 1) % temporal:
        raise CheckpointError(
            f"--frames must be 1 + {temporal}·k pixel frames (the VAE's), from 1 to {most} (the transformer's RoPE "
            f"table: `rope_max_seq_len` {rope}). Given: {str(count)[:20]}"
        )
    video["max_frames"] = 1 + (count - 1) // temporal
    _check_text_width(src, network_config)
    weights = {r: p for r, p in files.items() if r.startswith("transformer/") and r.endswith(".safetensors")}
    wan_keys.check_fits(_tensors(weights, read=False), network_config)
    with tempfile.TemporaryDirectory() as work:
        imported: dict[str, Any] = {"pipeline": cls, "student": {"layout": "diffusers", "files": sorted(weights)}}
        if lora is not None:
            layers, metadata = read_wan_lora(Path(lora), Path(work))
            state = fuse_network(
                "WanTransformer3DModel", network_config, _tensors(weights, read=True), layers, Path(lora).name,
                scale=lora_scale, metadata=metadata,
            )  # fmt: skip
            imported["lora"] = {
                "file": Path(lora).name, "sha256": sha256_file(Path(lora)), "scale": lora_scale,
                "fused_into": ["transformer"],
            }  # fmt: skip
            from safetensors.torch import save_file

            _drop_weights(files, variants, "transformer")
            files[STUDENT_WEIGHTS] = Path(work) / "student.safetensors"
            save_file({k: v.contiguous() for k, v in state.items()}, str(files[STUDENT_WEIGHTS]))
        lengths = _check_tokenizers(files, CAUSAL_VIDEO, components, max_tokens)
        manifest = {
            "name": name,
            "version": "1",
            "kind": CLIP_KIND,
            "pipeline": {"class": cls, "components": components, "variants": variants},
            "clip": clip.to_dict(),
            "video": video,
            "text": {"max_tokens": lengths[0], "lengths": lengths},
            "imported": imported,
        }
        return registry.publish_files(files, manifest, model=name, promote=True)


def _video(
    causal: CausalFamily,
    network: dict[str, Any],
    vae: dict[str, Any],
    size: tuple[int, int] | None,
    max_frames: int | None,
) -> dict[str, Any]:
    """The manifest's `video`: the served frame, the stream's bound in latent frames and the latent geometry, from
    the configs; CheckpointError for a size or bound the transformer cannot serve, or configs that disagree."""
    video, rope = _wan_video(network, vae, size)
    block = causal.block_frames
    longest = rope // block * block
    frames = max_frames if max_frames is not None else FULL_CAUSAL_FRAMES if causal.window is None else longest
    if isinstance(frames, bool) or not isinstance(frames, int) or not block <= frames <= longest or frames % block:
        raise CheckpointError(
            f"--max-frames must be a multiple of the {causal.name} block ({block} latent frames) from {block} to "
            f"{longest} (the transformer's RoPE table: `rope_max_seq_len` {rope}). Given: {str(frames)[:20]}"
        )
    return video | {"max_frames": frames}


def _wan_video(
    network: dict[str, Any], vae: dict[str, Any], size: tuple[int, int] | None
) -> tuple[dict[str, Any], int]:
    """A Wan manifest's `video` without its frame bound (the served frame, its rate and the latent geometry), and
    the transformer's RoPE positions (the most latent frames or patches a side it can place), from the configs;
    CheckpointError for a size the transformer cannot serve, or configs that disagree."""
    where_t, where_v = "transformer/config.json", "vae/config.json"
    channels = config_int(vae, "z_dim", where_v, 16, 1024)
    spatial = config_int(vae, "scale_factor_spatial", where_v, 8, 64)
    temporal = config_int(vae, "scale_factor_temporal", where_v, 4, 64)
    downsample = vae.get("temperal_downsample", [False, True, True])
    vae_patch = vae.get("patch_size") or 1
    if not isinstance(downsample, list) or not 1 <= len(downsample) <= 8 or not isinstance(vae_patch, int):
        raise CheckpointError(f"{where_v}: `temperal_downsample` must be a list of 1 to 8 flags")
    if (spatial, temporal) != (2 ** len(downsample) * vae_patch, 2 ** sum(map(bool, downsample))):
        raise CheckpointError(
            f"{where_v}: `scale_factor_spatial` and `scale_factor_temporal` must be what the VAE's layers make "
            f"({2 ** len(downsample) * vae_patch} and {2 ** sum(map(bool, downsample))}). Given: {spatial}, {temporal}"
        )
    patch = network.get("patch_size")
    if not isinstance(patch, list) or len(patch) != 3 or patch[0] != 1 or not all(p in (1, 2, 4) for p in patch):
        raise CheckpointError(f"{where_t}: `patch_size` must be [1, p, p] with p 1, 2 or 4. Given: {str(patch)[:40]}")
    for key in ("in_channels", "out_channels"):
        if config_int(network, key, where_t, 16, 4096) != channels:
            raise CheckpointError(
                f"{where_t}: `{key}` must be the VAE's {channels} latent channels (a text-to-video transformer). "
                f"Given: {network.get(key)}"
            )
    rope = config_int(network, "rope_max_seq_len", where_t, 1024, MAX_STREAM_FRAMES)
    width, height = size or NATIVE_VIDEO
    for what, side, step in (("width", width, spatial * patch[2]), ("height", height, spatial * patch[1])):
        most = min(MAX_SIDE // step, rope) * step  # a side of more tokens than the RoPE table has no positions
        if isinstance(side, bool) or not isinstance(side, int) or not step <= side <= most or side % step:
            raise CheckpointError(
                f"--size: the {what} must be a multiple of {step} (the VAE's {spatial} × the transformer's patch) "
                f"from {step} to {most}. Given: {str(side)[:20]}"
            )
    latent = {"channels": channels, "spatial": spatial, "temporal": temporal, "patch": patch}
    return {"height": height, "width": width, "fps": WAN_FPS, "latent": latent}, rope


def _tensors(paths: dict[str, Path], read: bool) -> dict[str, Any]:
    """The tensors of safetensors files (relative path → file): read, or (`read` false) as meta tensors of their
    header's shapes and dtypes, so that a multi-GB transformer is checked without reading its weights."""
    import torch
    from safetensors import safe_open

    out: dict[str, Any] = {}
    for rel, path in paths.items():
        try:
            with safe_open(str(path), "pt") as f:
                for key in f.keys():  # noqa: SIM118
                    if read:
                        out[key] = f.get_tensor(key)
                        continue
                    part = f.get_slice(key)
                    dtype = getattr(torch, _DTYPES.get(part.get_dtype(), "int64"))
                    out[key] = torch.empty(part.get_shape(), dtype=dtype, device="meta")
        except Exception as e:  # safetensors raises its own types for bad headers
            raise CheckpointError(f"{rel} is not a readable safetensors file ({e})") from e
    return out


# -- AnyFlow FAR: a causal student that is a diffusers pipeline of its own ------------------------------------------
FAR = Architecture(
    FAR_FAMILY,
    FAR_PIPELINES,
    "transformer",
    {
        "transformer": ("AnyFlowFARTransformer3DModel",),
        "vae": ("AutoencoderKLWan",),
        "text_encoder": ("UMT5EncoderModel",),
        "tokenizer": T5_TOKENIZERS,
    },
    ("text_encoder",),
    ("tokenizer",),
    "flow",
    Adapter(),
)
"""NVIDIA's AnyFlow FAR in diffusers format (`AnyFlowFARPipeline`): the components `import_far` copies. Like
`CAUSAL_VIDEO`, not an image architecture: its adapter is never called; `models.anyflow_far` says how it samples."""
FAR_SCHEDULER = "FlowMapEulerDiscreteScheduler"


def pipeline_class(path: Path) -> str:
    """The pipeline class a folder's `model_index.json` names (read under `Source`'s containment), so that the
    command line picks the importer that takes it."""
    return str(Source(path).json("model_index.json").get("_class_name"))[:200]


def import_far(
    path: Path,
    name: str,
    registry: Registry,
    size: tuple[int, int] | None = None,
    steps: list[int] | None = None,
    max_tokens: int = WAN_TOKENS,
) -> tuple[str, str]:
    """Import the `AnyFlowFARPipeline` folder at `path` (a folder or a hub snapshot, under `Source`'s containment)
    as the next version of `name`, kind `diffusers-causal-video`, family `anyflow-far`; returns (name, version).

    Its transformer (`AnyFlowFARTransformer3DModel`: its safetensors headers must hold exactly the tensors its
    config builds), Wan VAE, UMT5 encoder and tokenizer are copied as they are, with the scheduler config
    (`FlowMapEulerDiscreteScheduler`). The manifest keeps the FAR family (`anyflow_far.FARFamily`: the
    transformer's chunk partition, whose sum is the stream's bound in latent frames, its `full_chunk_limit`, the
    step counts served, `steps` or 1 to 8, and the default count, 4 where served), the video sizes (`size`
    (width, height), default 832×480, a multiple of the VAE's factor × the compressed patch, within the RoPE
    table) and the prompts' padded length. Everything is checked before anything is written."""
    src = Source(path)
    index = src.json("model_index.json")
    cls = str(index.get("_class_name"))
    if cls not in FAR.pipelines:
        raise CheckpointError(f"an AnyFlow FAR student is an {' or '.join(FAR.pipelines)} folder. Given: {cls[:80]!r}")
    scheduler = index.get(SCHEDULER)
    shipped = src.json("scheduler/scheduler_config.json").get("_class_name")
    if not isinstance(scheduler, list) or scheduler[-1:] != [FAR_SCHEDULER] or shipped != FAR_SCHEDULER:
        given = scheduler[-1] if isinstance(scheduler, list) and scheduler else scheduler
        raise CheckpointError(
            f"scheduler must be {FAR_SCHEDULER} (the flow map's sampler). Given: {str(given)[:60]!r} in "
            f"model_index.json, {str(shipped)[:60]!r} in scheduler/scheduler_config.json"
        )
    files, components, variants = _components(src, index, FAR, cls)
    network = src.json("transformer/config.json")
    family, video = _far_video(network, src.json("vae/config.json"), size, steps)
    _check_text_width(src, network)
    weights = {r: p for r, p in files.items() if r.startswith("transformer/") and r.endswith(".safetensors")}
    wan_keys.check_fits(_tensors(weights, read=False), network, FAR.components["transformer"][0])
    lengths = _check_tokenizers(files, FAR, components, max_tokens)
    imported = {"pipeline": cls, "student": {"layout": "diffusers", "files": sorted(weights)}}
    manifest = _causal_manifest(name, cls, components, variants, family.to_dict(), video, lengths, imported)
    return registry.publish_files(files, manifest, model=name, promote=True)


def _far_video(
    network: dict[str, Any], vae: dict[str, Any], size: tuple[int, int] | None, steps: list[int] | None
) -> tuple[FARFamily, dict[str, Any]]:
    """The FAR family and the manifest's `video` from the configs: CheckpointError for a partition, patch, size or
    step count the transformer cannot serve."""
    where = "transformer/config.json"
    video, rope = _wan_video(network, vae, size)
    spatial, patch = video["latent"]["spatial"], video["latent"]["patch"]
    compressed = network.get("compressed_patch_size", [1, 4, 4])
    if (
        not isinstance(compressed, list)
        or len(compressed) != 3
        or compressed[0] != 1
        or compressed[1] != compressed[2]
        or not all(type(c) is int and c in (1, 2, 4, 8) and c % p == 0 for c, p in zip(compressed, patch, strict=True))
    ):
        raise CheckpointError(
            f"{where}: `compressed_patch_size` must be [1, c, c] with c 1, 2, 4 or 8, a multiple of the patch "
            f"{patch}. Given: {str(compressed)[:40]}"
        )
    multiple = spatial * compressed[1]  # older chunks are seen through the compressed patches: whole ones only
    for what in ("width", "height"):
        if video[what] % multiple:
            raise CheckpointError(
                f"--size: the {what} must be a multiple of {multiple} (the VAE's {spatial} × the compressed patch "
                f"{compressed[1]}). Given: {video[what]}"
            )
    partition = network.get("chunk_partition", [1, 3, 3, 3, 3, 3, 3, 2])
    if not isinstance(partition, list):
        raise CheckpointError(
            f"{where}: `chunk_partition` must be a list of frame counts. Given: {str(partition)[:60]}"
        )
    served = SERVED_STEPS if steps is None else tuple(sorted(set(steps)))
    if steps is not None and len(served) != len(steps):
        raise CheckpointError(f"--steps must not repeat a count. Given: {steps}")
    default = DEFAULT_STEPS if DEFAULT_STEPS in served else served[-1] if served else 0
    try:
        family = FARFamily(tuple(partition), config_int(network, "full_chunk_limit", where, 3, 256), served, default)
    except CheckpointError as e:
        raise CheckpointError(f"{where} or --steps: {e}") from e
    if family.max_frames > rope:
        raise CheckpointError(
            f"{where}: `chunk_partition` sums to {family.max_frames} latent frames, more than the RoPE table's "
            f"{rope} (`rope_max_seq_len`)"
        )
    return family, video | {"max_frames": family.max_frames}
