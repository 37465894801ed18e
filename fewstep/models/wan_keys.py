"""Causal Wan students' checkpoints, read in their own layout as diffusers `WanTransformer3DModel` weights.

Self-Forcing, CausVid and LongLive train their generator as the original Wan code's `WanModel` (`CausalWanModel`,
the same parameters) inside a wrapper whose attribute is `model`, and ship `torch.save` pickles of it:
`{'generator': state, 'generator_ema': state, ...}` (Self-Forcing's `self_forcing_dmd.pt`, CausVid's `model.pt`,
LongLive's `longlive_base.pt`), each state keyed by original Wan names under `model.`
(`model.blocks.0.self_attn.q.weight`). The two module trees hold the same tensors, in the same shapes, under
other names, so reading one as the other is a renaming and nothing else (`diffusers_name`, and its inverse
`original_name`). The map, written from both module trees:

    original, under `blocks.N.`     diffusers
    self_attn.{q,k,v,o}             attn1.to_{q,k,v,out.0}
    self_attn.norm_{q,k}            attn1.norm_{q,k}
    cross_attn.{q,k,v,o}            attn2.to_{q,k,v,out.0}
    cross_attn.norm_{q,k}           attn2.norm_{q,k}
    cross_attn.{k,v}_img            attn2.add_{k,v}_proj            (I2V)
    cross_attn.norm_k_img           attn2.norm_added_k              (I2V)
    norm3                           norm2
    ffn.{0,2}                       ffn.net.{0.proj,2}
    modulation                      scale_shift_table

    original, top level             diffusers
    patch_embedding                 patch_embedding
    text_embedding.{0,2}            condition_embedder.text_embedder.linear_{1,2}
    time_embedding.{0,2}            condition_embedder.time_embedder.linear_{1,2}
    time_projection.1               condition_embedder.time_proj
    head.head                       proj_out
    head.modulation                 scale_shift_table
    img_emb.proj.{0,1,3,4}          condition_embedder.image_embedder.{norm1,ff.net.0.proj,ff.net.2,norm2}  (I2V)

The original block's `norm3` is the (affine) norm before cross-attention, diffusers' `norm2`; the original
`norm2` (before the feed-forward) and `norm1`, like diffusers' `norm1`/`norm3`, have no weights. The rotary
table `freqs` is a plain attribute of the original model, not a buffer, so it is not in a state; a file that
has one anyway (a fork that registered it) has it dropped: diffusers computes its own table from the config.

`load_student` reads such a file: a `.safetensors` directly; a pickle only when asked (`convert_pickle`), with
`torch.load(weights_only=True)`, which refuses any object but tensors and plain containers; the state is picked,
its wrapper prefix and FSDP / activation-checkpointing / `torch.compile` name segments removed, renamed, and
checked against the `WanTransformer3DModel` its config builds (on the meta device: nothing is allocated). A file
already in diffusers names (a converted student, `proj_out.weight` at the top) is taken as it is. It returns the
state in diffusers names and a record of the renaming for the manifest. `load_lora` maps a LongLive-style PEFT
LoRA (`lora.pt`) onto the same diffusers names, ready for `models.lora.fuse`.
"""

from __future__ import annotations

import re
import zipfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from fewstep.errors import CheckpointError
from fewstep.models import lazy
from fewstep.models.checkpoint import PICKLE_SUFFIXES

MAP_VERSION = 1
"""Bumped whenever the renaming changes what a file reads as: recorded in the manifest."""
MAX_FILE_BYTES = 128 << 30
"""Largest student file read (bytes), checked before it is opened: the largest layout a Wan 2.1 causal student is
saved in is a 14B generator with its EMA copy, both float32 (2 × 14.3e9 × 4 B ≈ 106 GiB). Training checkpoints
that also carry the critic and optimizer states are larger: keep the generator states only."""
MAX_KEY_CHARS = 256
"""Longest tensor name accepted: the longest Wan name is under 60 characters, about 100 with FSDP's segments."""
MAX_TENSORS = 100_000
"""Most tensors a state may hold (Wan 2.1 14B has about 1,100; a rank-256 LoRA on it about 1,000)."""

Which = Literal["ema", "generator"]
PREFIXES = ("model.diffusion_model.", "model.", "diffusion_model.", "")
"""Where original Wan names may sit: `model.` is the students' wrapper attribute; `model.diffusion_model.` and
`diffusion_model.` are the single-file layouts (ComfyUI's); "" is Wan's own release. The first one under which
the file has `head.head.weight` is the file's."""
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
"""Name segments that FSDP, activation checkpointing and `torch.compile` insert (an FSDP EMA's names have them):
they name no module of the model and are removed."""
DROPPED = frozenset({"freqs"})
"""Original names of tensors that are not weights: the rotary table, recomputed by diffusers from the config."""
PEFT_PREFIX = "base_model.model."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")

_TOP_MODULES = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}
_TOP_PARAMETERS = {"head.modulation": "scale_shift_table"}
_BLOCK_MODULES = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_BLOCK_PARAMETERS = {"modulation": "scale_shift_table"}
_TABLES = (_TOP_MODULES, _TOP_PARAMETERS, _BLOCK_MODULES, _BLOCK_PARAMETERS)
_INVERSE = tuple({v: k for k, v in table.items()} for table in _TABLES)
_BLOCK = re.compile(r"blocks\.(\d{1,5})\.(.+)")


def diffusers_name(original: str) -> str | None:
    """The diffusers name of the tensor an original Wan model names `original` (no prefix), or None if it has none."""
    return _rename(original, _TABLES)


def original_name(diffusers: str) -> str | None:
    """The original Wan name of the tensor diffusers names `diffusers`, or None if it has none."""
    return _rename(diffusers, _INVERSE)


def _rename(name: str, tables: tuple[dict[str, str], ...]) -> str | None:
    top_modules, top_parameters, block_modules, block_parameters = tables
    block = _BLOCK.fullmatch(name)
    head, rest = (f"blocks.{block[1]}.", block[2]) if block else ("", name)
    modules, parameters = (block_modules, block_parameters) if block else (top_modules, top_parameters)
    if rest in parameters:
        return head + parameters[rest]
    module, _, leaf = rest.rpartition(".")
    if leaf in ("weight", "bias") and module in modules:
        return f"{head}{modules[module]}.{leaf}"
    return None


def load_student(
    path: Path, config: Mapping[str, Any], convert_pickle: bool = False, which: Which = "ema"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The weights of the causal Wan student at `path` in diffusers names, fitting exactly the
    `WanTransformer3DModel` that `config` (its `config.json`) builds, and the manifest's record of how they were
    read. CheckpointError, before anything is returned, for a link or an unbounded file, a pickle without
    `convert_pickle` or one `weights_only` refuses, and a state that does not fit (its missing, unexpected and
    wrongly shaped tensors named).

    `which` picks the state of a `{'generator', 'generator_ema'}` file: `ema` (the default) takes `generator_ema`
    when the file has one, else `generator` — Self-Forcing's README runs its released checkpoint with `--use_ema`,
    and CausVid's `model.pt` has `generator` only; `generator` takes the raw generator (what LongLive's own
    inference runs: `use_ema: false`). A file of one bare state, or `{'model': state}`, has one state to take.
    The record says which was taken."""
    if which not in ("ema", "generator"):
        raise CheckpointError(f"`which` must be 'ema' or 'generator'. Given: {which!r}")
    kind = _check_file(path, convert_pickle)
    record: dict[str, Any] = {"map_version": MAP_VERSION, "file": path.name, "format": kind}
    state: Mapping[Any, Any]
    if kind == "safetensors":
        state = _read_safetensors(path)
        record["state"] = "whole file"
    else:
        state, record["state"] = _pick(_read_pickle(path), which)
    named, renaming = to_diffusers(state)
    record |= renaming
    check_fits(named, config)
    return named, record


def to_diffusers(state: Mapping[Any, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`state` (a Wan transformer's tensors in original names under any of `PREFIXES`, or already in diffusers
    names) in diffusers names, and a record of the renaming (layout, prefix, counts, dtypes). CheckpointError for
    a value that is not a tensor, an unbounded name or count, a name of the prefix that has no diffusers name, or
    one outside the prefix: the error names them."""
    import torch

    _check_names(state, "state")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{len(bad)} entries of the state are not tensors (e.g. {bad[:2]})")
    unwrapped = {_unwrap(k): v for k, v in state.items()}
    if len(unwrapped) != len(state):
        raise CheckpointError("two tensors of the state have the same name once FSDP's name segments are removed")
    record: dict[str, Any] = {"unwrapped": sum(_unwrap(k) != k for k in state)}
    if "proj_out.weight" in unwrapped and not any(k.endswith("head.head.weight") for k in unwrapped):
        named = unwrapped
        record |= {"layout": "diffusers", "prefix": None, "renamed": 0, "dropped": []}
    else:
        prefix = next((p for p in PREFIXES if f"{p}head.head.weight" in unwrapped), None)
        if prefix is None:
            raise CheckpointError(
                "neither a Wan transformer state in original names (no `head.head.weight` under "
                f"{[p for p in PREFIXES if p]} or at the top) nor one in diffusers names (no `proj_out.weight`)"
            )
        named, dropped, unknown = {}, [], []
        for key, tensor in unwrapped.items():
            original = key.removeprefix(prefix) if key.startswith(prefix) else None
            new = diffusers_name(original) if original is not None else None
            if original in DROPPED:
                dropped.append(key)
            elif new is None:
                unknown.append(key)
            else:
                named[new] = tensor
        if unknown:
            raise CheckpointError(
                f"{len(unknown)} tensors of the state have no diffusers name (e.g. {sorted(unknown)[:3]}): not "
                f"a Wan 2.1 transformer's parameters under `{prefix}`"
            )
        record |= {"layout": "original", "prefix": prefix, "renamed": len(named), "dropped": sorted(dropped)}
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in named.values())
    return named, record | {"tensors": len(named), "dtypes": dict(sorted(dtypes.items()))}


def check_fits(state: Mapping[str, Any], config: Mapping[str, Any], network: str = "WanTransformer3DModel") -> None:
    """CheckpointError unless `state` (diffusers names) holds exactly the floating-point tensors, in the shapes,
    of the `network` (a diffusers class: a `WanTransformer3DModel`, or a Wan-based one) that `config` builds. The
    model is built on the meta device."""
    import torch

    cls = lazy.attr("diffusers", network)
    try:
        with torch.device("meta"):
            model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    except (TypeError, ValueError, AssertionError) as e:
        raise CheckpointError(f"the transformer config builds no {network} ({e})") from e
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    integral = sorted(k for k in set(want) & set(got) if not state[k].is_floating_point())
    parts = [f"{len(missing)} missing (e.g. {', '.join(_both(k) for k in missing[:2])})"] if missing else []
    parts += [f"{len(extra)} unexpected (e.g. {extra[:2]})"] if extra else []
    if wrong:
        first = wrong[0]
        parts += [f"{len(wrong)} of other shapes (e.g. {_both(first)}: {list(got[first])} for {list(want[first])})"]
    parts += [f"{len(integral)} not floating-point (e.g. {integral[:2]})"] if integral else []
    if parts:
        raise CheckpointError(f"the student does not fit the transformer config: {'; '.join(parts)} tensors")


def load_lora(
    path: Path, convert_pickle: bool = False, alpha: float | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A PEFT LoRA over an original-layout Wan model (LongLive's `lora.pt`: `{'generator_lora': state}` or a bare
    state, `base_model.model.blocks.N.self_attn.q.lora_A.weight`) as a diffusers Wan LoRA
    (`transformer.blocks.N.attn1.to_q.lora_A.weight`) that `WanPipeline.load_lora_weights` takes, and its record.

    A PEFT state does not carry `lora_alpha` (it is in the training config: LongLive's `adapter.alpha` 256, equal
    to its rank); `alpha` None takes it equal to each layer's rank, as diffusers does for a file without it;
    another value is folded into `lora_B` (× alpha / rank), so the fused weight is what PEFT merges."""
    import torch

    kind = _check_file(path, convert_pickle)
    if kind == "safetensors":
        state = _read_safetensors(path)
    else:
        loaded = _read_pickle(path)
        state = loaded.get("generator_lora", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path.name}: not a LoRA state (a dict of tensors, or one under `generator_lora`)")
    _check_names(state, path.name)
    out: dict[str, Any] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        name = _unwrap(key).removeprefix(PEFT_PREFIX).removeprefix("model.")
        suffix = next((s for s in LORA_SUFFIXES if name.endswith(s)), None)
        module = diffusers_name(name.removesuffix(suffix) + ".weight") if suffix else None
        if module is None or not isinstance(tensor, torch.Tensor):
            unknown.append(key)
            continue
        out[f"transformer.{module.removesuffix('.weight')}{suffix}"] = tensor
    if unknown:
        raise CheckpointError(
            f"{path.name}: {len(unknown)} entries are not LoRA weights of a Wan layer (e.g. {sorted(unknown)[:3]})"
        )
    pairs = {k.removesuffix(LORA_SUFFIXES[0]) for k in out if k.endswith(LORA_SUFFIXES[0])}
    if {k.removesuffix(LORA_SUFFIXES[1]) for k in out if k.endswith(LORA_SUFFIXES[1])} != pairs:
        raise CheckpointError(f"{path.name}: some layers have `lora_A` without `lora_B` or the other way round")
    ranks = sorted({int(out[m + LORA_SUFFIXES[0]].shape[0]) for m in pairs})
    if alpha is not None:
        for m in pairs:
            rank = out[m + LORA_SUFFIXES[0]].shape[0]
            out[m + LORA_SUFFIXES[1]] = out[m + LORA_SUFFIXES[1]] * (alpha / rank)
    record = {"map_version": MAP_VERSION, "file": path.name, "format": kind, "layers": len(pairs), "ranks": ranks}
    return out, record | {"alpha": alpha if alpha is not None else "rank"}


def _check_file(path: Path, convert_pickle: bool) -> Literal["safetensors", "pickle"]:
    """Which reader `path` takes; CheckpointError for a link, a missing or unbounded file, an unknown suffix, or
    a pickle not asked for."""
    if path.is_symlink() or not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise CheckpointError(f"{path.name} is {size} bytes; a student file may have at most {MAX_FILE_BYTES}")
    if path.name.endswith(".safetensors"):
        return "safetensors"
    if not path.name.lower().endswith(PICKLE_SUFFIXES):
        raise CheckpointError(f"{path.name}: neither safetensors nor a known pickle format")
    if not convert_pickle:
        raise CheckpointError(
            f"{path.name} is a pickle file; fewstep converts one only when asked (`--convert-pickle`): it is then "
            "loaded with torch.load(weights_only=True), which refuses anything but tensors and plain containers"
        )
    return "pickle"


def _read_pickle(path: Path) -> Any:
    """The object in the pickle at `path`, under `weights_only` (no code runs: an object with `__reduce__` is
    refused). A zip-format file (every `torch.save` since torch 1.6) is memory-mapped, so the states not taken
    (the other of generator / EMA) are never read from disk."""
    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # an unsafe or corrupt pickle: weights_only raises UnpicklingError, others their own
        raise CheckpointError(f"{path.name}: torch.load(weights_only=True) refused it ({type(e).__name__}: {e})") from e


def _read_safetensors(path: Path) -> dict[str, Any]:
    """Every tensor of the safetensors file at `path`, its names checked (from the header) before one is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            names = list(f.keys())
            _check_names(dict.fromkeys(names), path.name)
            return {k: f.get_tensor(k) for k in names}
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own types for bad headers
        raise CheckpointError(f"{path.name} is not a readable safetensors file ({e})") from e


def _pick(loaded: Any, which: Which) -> tuple[Mapping[Any, Any], str]:
    """The state `which` asks for in a loaded pickle, and what was taken."""
    if not isinstance(loaded, dict):
        raise CheckpointError(f"the pickle holds a {type(loaded).__name__}, not a dict of states or of tensors")
    order = ("generator_ema", "generator") if which == "ema" else ("generator",)
    if "generator" in loaded or "generator_ema" in loaded:
        taken = next((k for k in order if isinstance(loaded.get(k), dict)), None)
        if taken is None:
            raise CheckpointError(f"the file has no `{order[-1]}` state (it has {sorted(map(str, loaded))[:6]})")
        return loaded[taken], taken
    if isinstance(loaded.get("model"), dict):
        return loaded["model"], "model"
    return loaded, "whole file"


def _check_names(state: Mapping[Any, Any], what: str) -> None:
    if len(state) > MAX_TENSORS:
        raise CheckpointError(f"{what} holds {len(state)} entries; at most {MAX_TENSORS} are read")
    bad = [k for k in state if not isinstance(k, str) or len(k) > MAX_KEY_CHARS]
    if bad:
        shown = repr(bad[0])[:80]
        raise CheckpointError(f"{what}: {len(bad)} names are not strings of at most {MAX_KEY_CHARS} chars ({shown}…)")


def _unwrap(key: str) -> str:
    for segment in WRAPPER_SEGMENTS:
        key = key.replace(segment, "")
    return key


def _both(name: str) -> str:
    """`name`, with its original Wan name when it has one (what a user searching the file would look for)."""
    original = original_name(name)
    return f"{name} (original {original})" if original else name
