"""Export an imported diffusers pipeline to ONNX (text encoders, UNet, VAE decoder), check it, quantize it.

`export_pipeline_onnx` writes `onnx/fp32/` (layout in `fewstep.artifacts.pipeline`). The graphs are traced
with torch's TorchScript exporter: diffusers' UNets trace in seconds there, against minutes through
torch.export, with the same outputs (docs/decisions/pipeline-onnx.md). A transformer (FLUX, SD3) goes through
torch.export, which keeps its token counts symbolic (sides in whole patches, `latent.size_multiple`). A graph
whose weights pass `external_data_bytes` (default: under protobuf's 2 GiB limit) keeps them in
`<graph>.onnx.data`.

Parity: the version is sampled by fewstep's latent engine on torch and on the fresh graphs, the same
prompts, seeds, sizes and guidance at every step count the family serves; the export fails (nothing is
left behind) when any step count's PSNR is under `MIN_PSNR_DB`.

`quantize_pipeline` writes `onnx/<precision>/` with a quantized UNet (the network that runs every step;
text encoders and VAE decoder run once per prompt and image and stay fp32), calibrated on the UNet's real
inputs at every step count and gated on image PSNR against the fp32 graphs.
"""

from __future__ import annotations

import contextlib
import math
import operator
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.artifacts.pipeline import (
    PRECISIONS,
    ROOT,
    GraphNets,
    artifact_dir,
    graph_entry,
    recording,
    source_digest,
    verified_graphs,
)
from fewstep.errors import CheckpointError
from fewstep.evaluation.metrics import psnr
from fewstep.exporters.onnx import psnr_parity
from fewstep.exporters.quantize import quantize_graph
from fewstep.models.architectures import Conditioning, architecture
from fewstep.models.checkpoint import read_manifest, replace_dir, write_json_atomic
from fewstep.models.families import Recipe
from fewstep.models.latent_sampler import Draw, LatentSampler
from fewstep.models.pipelines import (
    LatentNets,
    TorchNets,
    guidance_embedding,
    load_tokenizers,
    postprocess,
    size_multiple,
    time_ids,
    vae_factor,
)

MIN_PSNR_DB = 40.0
GATE_MIN_PSNR_DB = 25.0
"""A quantized UNet serves when its images are within this PSNR of the fp32 graphs' at every step count."""
MAX_BASE_REL_DIFF = 1e-3
EXTERNAL_DATA_BYTES = 1_800_000_000
"""Weights above this go to an external data file: protobuf refuses messages over 2 GiB."""
OPSET = 17
PARITY_PROMPTS = ("a red circle on a white background", "two blue squares")
CALIBRATION_PROMPTS = (
    "a photo of a cat",
    "a watercolor landscape with mountains",
    "a red sports car on a street",
    "a bowl of fruit, studio lighting",
    "an astronaut riding a horse",
    "a portrait of an old man",
)
GATE_PROMPTS = ("a lighthouse at dusk", "a plate of pasta", "a forest path in autumn", "a city skyline at night")


class TextGraph(torch.nn.Module):
    """All text encoders as one graph, as `TorchNets.encode` computes the conditioning: every tokenizer's ids,
    then every tokenizer's attention mask. The exported graph keeps the masks its adapter reads (an SD encoder
    with `use_attention_mask`) and drops the others: its manifest lists the inputs the graph really has."""

    def __init__(self, nets: TorchNets) -> None:
        super().__init__()
        self.adapter = nets.adapter
        self.encoders = torch.nn.ModuleList(nets.encoders)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = len(self.encoders)
        out = self.adapter.encode(list(self.encoders), list(inputs[:n]), list(inputs[n:]))
        return (out.states,) if out.pooled is None else (out.states, out.pooled)


class UNetGraph(torch.nn.Module):
    """The denoiser (a UNet, or a transformer with its packing) as its architecture's adapter calls it, its
    optional inputs as positional graph inputs."""

    def __init__(self, nets: TorchNets, inputs: list[str]) -> None:
        super().__init__()
        self.unet = nets.unet_model
        self.adapter = nets.adapter
        self.inputs = inputs

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        a = dict(zip(self.inputs, args, strict=True))
        cond = Conditioning(a["states"], a.get("timestep_cond"), a.get("pooled"), a.get("time_ids"))
        return self.adapter.denoise(self.unet, a["sample"], a["timestep"], cond)


class DecoderGraph(torch.nn.Module):
    """Latents as the sampler ends with them → images in [-1, 1] (`TorchNets.decode`)."""

    def __init__(self, nets: TorchNets) -> None:
        super().__init__()
        self.vae = nets.vae
        self.adapter = nets.adapter

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.adapter.decode(self.vae, latents)


def _graphs(
    nets: TorchNets, manifest: dict[str, Any]
) -> dict[str, tuple[torch.nn.Module, tuple[torch.Tensor, ...], list[str], list[str], dict[str, dict[int, str]]]]:
    """Each graph: module, example inputs, input and output names, dynamic axes."""
    text_info = manifest.get("text", {})
    lengths = [int(n) for n in text_info.get("lengths") or [text_info.get("max_tokens", 77)] * len(nets.encoders)]
    text = TextGraph(nets)
    n = len(nets.encoders)
    text_in = [f"ids_{i}" for i in range(n)] + [f"mask_{i}" for i in range(n)]
    text_ex = tuple(torch.ones((2, lengths[min(i % n, len(lengths) - 1)]), dtype=torch.int64) for i in range(2 * n))
    with torch.inference_mode(False), torch.no_grad():
        sample_text = text(*text_ex)
    text_out = ["states", "pooled"][: len(sample_text)]
    side = 2 * size_multiple(manifest) // vae_factor(manifest)
    channels = int(manifest.get("latent", {}).get("channels", 4))
    unet_ex: dict[str, torch.Tensor] = {
        "sample": torch.randn(2, channels, side, side),
        "timestep": torch.tensor([999.0, 499.0]),
        "states": sample_text[0],
    }
    if nets.time_cond_dim is not None:
        unet_ex["timestep_cond"] = torch.randn(2, int(nets.time_cond_dim))
    if len(sample_text) > 1:
        unet_ex["pooled"] = sample_text[1]
    if nets.adapter.size_ids:
        unet_ex["time_ids"] = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
    spatial = {0: "batch", 2: "height", 3: "width"}
    return {
        "text": (text, text_ex, text_in, text_out, {n: {0: "batch"} for n in text_in + text_out}),
        "unet": (
            UNetGraph(nets, list(unet_ex)),
            tuple(unet_ex.values()),
            list(unet_ex),
            ["pred"],
            {n: spatial if n == "sample" else {0: "batch"} for n in unet_ex} | {"pred": spatial},
        ),
        "vae_decoder": (
            DecoderGraph(nets),
            (torch.randn(1, channels, side, side),),
            ["latents"],
            ["images"],
            {"latents": spatial, "images": spatial},
        ),
    }


def _dims(axes: dict[int, str], multiple: int) -> dict[int, Any]:
    """torch.export's dynamic dimensions for one input from its ONNX dynamic axes (spatial ones in `multiple`s of
    latent cells)."""
    made = {}
    for dim, label in axes.items():
        made[dim] = torch.export.Dim(label) if label == "batch" else multiple * torch.export.Dim(label, max=4096)
    return made


def floor_division(a: Any, b: Any) -> Any:
    """Python's `a // b` of symbolic ints in ONNX, for torch.export's graphs. onnxscript's own translation is
    ONNX `Div`, which truncates: right for non-negative numerators only (microsoft/onnxscript#2342), and
    torch.export's simplifier writes SD3's centred crop of its position embeddings, `(max - n) // 2 + n`, as
    `max // 2 + n + (-n) // 2`: one token too many at odd patch counts. ONNX `Mod` takes the divisor's sign, as
    Python's `%`, so `a - a % b` divides exactly."""
    from onnxscript import opset18 as op

    return op.Div(op.Sub(a, op.Mod(a, b)), b)


@contextlib.contextmanager
def exportable_rms_norm() -> Iterator[None]:
    """`F.rms_norm` spelled in ops opset 17 has, while a graph is exported (T5's and the FLUX transformer's
    norms call it; the exporter has no symbolic for it): the same math, x · rsqrt(mean(x²) + eps) · weight."""
    fn = torch.nn.functional
    real = fn.rms_norm

    def rms_norm(x: torch.Tensor, shape: Any, weight: torch.Tensor | None = None, eps: float | None = None) -> Any:
        dims = tuple(range(-len(shape), 0))
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
        return y if weight is None else y * weight

    fn.rms_norm = rms_norm  # type: ignore[assignment]
    try:
        yield
    finally:
        fn.rms_norm = real


def _save(raw: Path, target: Path, external_data_bytes: int) -> tuple[list[str], int]:
    """The exported graph at `raw` as `target`, its weights external when they pass `external_data_bytes`; the
    graph's inputs (those the traced module read) and its default-domain opset."""
    import onnx

    model = onnx.load(str(raw), load_external_data=True)
    inputs = [i.name for i in model.graph.input]
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    if weights > external_data_bytes:
        onnx.save_model(
            model,
            str(target),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=target.name + ".data",
            size_threshold=0,
        )
    else:
        onnx.save_model(model, str(target))
    return inputs, opset


def _place(built: Path, folder: Path, precision: str) -> None:
    """Move a finished artifact folder into `onnx/<precision>`, replacing an older one whole."""
    replace_dir(built, artifact_dir(folder, precision))


def export_pipeline_onnx(folder: Path, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> dict[str, Any]:
    """Write `onnx/fp32/` into the imported pipeline version at `folder`; returns its artifact manifest.

    CheckpointError when parity fails; nothing is left behind then."""
    import onnx
    import onnxruntime

    manifest = read_manifest(folder)
    if manifest.get("kind") not in ("diffusers", "diffusers-teacher"):
        raise CheckpointError(f"{folder.name}: not an imported diffusers pipeline")
    nets = TorchNets(folder, manifest, "cpu", torch.float32)
    transformer = architecture(manifest["pipeline"]["arch"]).network == "transformer"
    cells = size_multiple(manifest) // vae_factor(manifest)  # latent cells per served side step: whole patches
    root = folder / ROOT
    root.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".partial-") as tmp_name:
        tmp = Path(tmp_name)
        built = tmp / "fp32"
        built.mkdir()
        graphs: dict[str, Any] = {}
        opsets = []
        for role, (module, example, inputs, outputs, axes) in _graphs(nets, manifest).items():
            raw = tmp / "raw" / role / "graph.onnx"
            raw.parent.mkdir(parents=True)
            with warnings.catch_warnings(), torch.no_grad(), exportable_rms_norm():
                warnings.simplefilter("ignore")
                if role == "unet" and transformer:
                    # The TorchScript exporter freezes a transformer's token reshapes to the example's sizes;
                    # torch.export keeps them symbolic (sides in whole patches).
                    shapes = (tuple(_dims(axes[name], cells) for name in inputs),)
                    torch.onnx.export(
                        module, example, str(raw), dynamo=True, input_names=inputs, output_names=outputs,
                        dynamic_shapes=shapes, opset_version=18, verbose=False,
                        custom_translation_table={operator.floordiv: floor_division},
                    )  # fmt: skip
                else:
                    torch.onnx.export(
                        module,
                        example,
                        str(raw),
                        dynamo=False,
                        input_names=inputs,
                        output_names=outputs,
                        dynamic_axes=axes,
                        opset_version=OPSET,
                    )
            kept, opset = _save(raw, built / f"{role}.onnx", external_data_bytes)
            opsets.append(opset)
            graphs[role] = graph_entry(tmp, built / f"{role}.onnx", kept, outputs)
        shutil.rmtree(tmp / "raw")
        art: dict[str, Any] = {
            "format": 1,
            "precision": "fp32",
            "arch": nets.arch,
            "time_cond_dim": nets.time_cond_dim,
            "opset": max(opsets),
            "size_multiple": size_multiple(manifest),
            "graphs": graphs,
            "batch_invariant": True,
            "source": {"name": manifest["name"], "version": manifest.get("version"), "sha256": source_digest(manifest)},
            "tools": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        }
        fresh = GraphNets(
            {r: built / f"{r}.onnx" for r in graphs}, art, providers=["CPUExecutionProvider"], arena=False
        )
        try:
            art["parity"] = (
                pipeline_parity(folder, nets, fresh)
                if "recipe" in manifest
                else base_parity(manifest, folder, nets, fresh)
            )
        except CheckpointError:
            raise
        except Exception as e:  # onnxruntime's own exception types: a graph that fails at a size it was not traced at
            raise CheckpointError(f"ONNX parity failed: sampling raised {type(e).__name__}: {str(e)[:300]}") from e
        write_json_atomic(built / "manifest.json", art)
        _place(built, folder, "fp32")
    return art


def parity_draws(manifest: dict[str, Any], prompts: tuple[str, ...], first_seed: int) -> list[Draw]:
    """Every step count the family serves, at the native size and a smaller one, with its default guidance. The
    smaller one is an odd number of size multiples wide and one more high: odd token counts along a side (where
    a centred crop's or a floor division's rounding goes wrong) and height and width told apart."""
    recipe = Recipe.from_dict(manifest["recipe"])
    g = recipe.guidance
    multiple = size_multiple(manifest)
    native = int(str(manifest["native_size"]).split("x")[0])
    width = (max(1, native // 2 // multiple) | 1) * multiple
    height = min(width + multiple, native)
    draws: list[Draw] = []
    for n in recipe.steps:
        for i, p in enumerate(prompts):
            w, h = (native, native) if i % 2 == 0 else (width, height)
            cfg = g.mode == "cfg" and g.default > 1.0
            draws.append(Draw(p, first_seed + len(draws), n, w, h, g.default, None, cfg))
    return draws


SAMPLE_CHUNK = 2
"""Draws sampled together in the exporters' checks: a transformer at its native size attends over thousands of
tokens, and a batch of every draw at once held gigabytes of attention (each image is its own whatever its batch)."""


def pipeline_images(folder: Path, nets: LatentNets, draws: list[Draw]) -> list[np.ndarray]:
    sampler = LatentSampler(folder, read_manifest(folder), nets)
    images = [x for i in range(0, len(draws), SAMPLE_CHUNK) for x in sampler.sample(draws[i : i + SAMPLE_CHUNK])]
    if any(x is None for x in images):
        raise CheckpointError(f"{folder.name}: sampling for the parity check made non-finite images")
    return images  # type: ignore[return-value]


def psnr_by_steps(draws: list[Draw], a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, float]:
    figures: dict[str, float] = {}
    for n in sorted({d.steps for d in draws}):
        rows = [i for i, d in enumerate(draws) if d.steps == n]
        figures[str(n)] = min(psnr(a[i], b[i]) for i in rows)
    return figures


def pipeline_parity(folder: Path, ref: LatentNets, fresh: LatentNets, what: str = "ONNX") -> dict[str, Any]:
    draws = parity_draws(read_manifest(folder), PARITY_PROMPTS, 9_000_000)
    figures = psnr_by_steps(draws, pipeline_images(folder, ref, draws), pipeline_images(folder, fresh, draws))
    return psnr_parity(figures, what, MIN_PSNR_DB, images=len(draws))


def base_parity(manifest: dict[str, Any], folder: Path, ref: LatentNets, fresh: LatentNets) -> dict[str, Any]:
    """A base pipeline only ever takes a hybrid's first step: its networks are compared call by call."""
    ids, masks = load_tokenizers(folder, manifest)(list(PARITY_PROMPTS))
    a, b = ref.encode(ids, masks), fresh.encode(ids, masks)
    g = torch.Generator().manual_seed(0)
    side = int(str(manifest["native_size"]).split("x")[0]) // int(manifest["latent"]["vae_scale_factor"])
    x = torch.randn((len(PARITY_PROMPTS), int(manifest["latent"]["channels"]), side, side), generator=g)
    t = torch.tensor([999.0, 499.0])
    tcond = None if ref.time_cond_dim is None else guidance_embedding(torch.full((2,), 4.0), ref.time_cond_dim)
    sized = architecture(manifest["pipeline"]["arch"]).adapter.size_ids
    tids = torch.cat([time_ids(side, side)] * 2) if sized else None
    p = ref.unet(x, t, a.states, tcond, a.pooled, tids)
    q = fresh.unet(x, t, b.states, tcond, b.pooled, tids)
    rel = float((p - q).abs().max() / p.abs().max().clamp(min=1e-8))
    db = psnr(postprocess(ref.decode(x)), postprocess(fresh.decode(x)))
    if rel > MAX_BASE_REL_DIFF or db < MIN_PSNR_DB:
        raise CheckpointError(f"ONNX parity failed: UNet relative difference {rel:.1e}, decoder PSNR {db:.1f} dB")
    return {
        "metric": "per_network",
        "unet_max_relative_diff": rel,
        "max_allowed": MAX_BASE_REL_DIFF,
        "decoder_psnr_db": None if math.isinf(db) else round(db, 2),
        "min_required": MIN_PSNR_DB,
    }


BASE_TIMESTEPS = (999.0, 749.0, 499.0)
"""Where a hybrid's walk begins: the first timestep of trailing and leading spacings at 1–4 steps."""
BASE_GATE_MAX_REL_RMS = 0.1
"""As fewstep's own teachers (`exporters/quantize.py`): a base model takes one step, its prediction error counts."""


def base_inputs(
    folder: Path, manifest: dict[str, Any], nets: LatentNets, prompts: tuple[str, ...], seed: int
) -> list[tuple[torch.Tensor | None, ...]]:
    """A hybrid base's UNet inputs where it works, a walk's first step: the seed's noise at `BASE_TIMESTEPS`,
    the prompts' states and the empty prompt's (its guidance is classifier-free)."""
    ids, masks = load_tokenizers(folder, manifest)([*prompts, ""])
    text = nets.encode(ids, masks)
    native = int(str(manifest["native_size"]).split("x")[0])
    side = native // int(manifest["latent"]["vae_scale_factor"])
    n = len(prompts) + 1
    g = torch.Generator().manual_seed(seed)
    sized = architecture(manifest["pipeline"]["arch"]).adapter.size_ids
    out: list[tuple[torch.Tensor | None, ...]] = []
    for t in BASE_TIMESTEPS:
        x = torch.randn((n, int(manifest["latent"]["channels"]), side, side), generator=g)
        tcond = None if nets.time_cond_dim is None else guidance_embedding(torch.full((n,), 4.0), nets.time_cond_dim)
        tids = torch.cat([time_ids(native, native)] * n) if sized else None
        out.append((x, torch.full((n,), t), text.states, tcond, text.pooled, tids))
    return out


def unet_calibration(
    folder: Path, manifest: dict[str, Any], paths: dict[str, Path], fp32: dict[str, Any]
) -> list[dict[str, np.ndarray]]:
    """The UNet's inputs through the fp32 graphs (`paths`), what every quantization of this pipeline is calibrated
    on: real trajectories of every step count the family serves, or a hybrid base's first-step inputs (a base
    has no recipe: it only ever takes that step)."""
    nets = GraphNets(paths, fp32, providers=["CPUExecutionProvider"], arena=False)
    feeds: list[dict[str, np.ndarray]] = []
    if "recipe" not in manifest:
        rec = recording(nets, feeds)
        for args in base_inputs(folder, manifest, nets, CALIBRATION_PROMPTS, 7_000_000):
            rec(*args)
        return feeds
    nets.unet = recording(nets, feeds)  # type: ignore[method-assign]
    pipeline_images(folder, nets, parity_draws(manifest, CALIBRATION_PROMPTS, 7_000_000))
    return feeds


def unet_gate(folder: Path, manifest: dict[str, Any], ref: LatentNets, quant: LatentNets) -> dict[str, Any]:
    """A quantized UNet judged against the fp32 graphs (`ref`) on other prompts and seeds: a student's images at
    every step count (PSNR), a hybrid base's first-step prediction (relative RMS error). Its `quality` and
    `gate`."""
    if "recipe" not in manifest:
        errs = []
        for args in base_inputs(folder, manifest, ref, GATE_PROMPTS, 8_000_000):
            p, q = ref.unet(*args), quant.unet(*args)  # type: ignore[arg-type]
            errs.append(float((p - q).pow(2).mean().sqrt() / p.pow(2).mean().sqrt().clamp(min=1e-8)))
        worst = max(errs)
        return {
            "quality": {"relative_rms_error_vs_fp32": round(worst, 4), "calls": len(errs)},
            "gate": {
                "passed": bool(worst <= BASE_GATE_MAX_REL_RMS),
                "rule": f"relative RMS error of the first-step prediction vs fp32 <= {BASE_GATE_MAX_REL_RMS}",
            },
        }
    draws = parity_draws(manifest, GATE_PROMPTS, 8_000_000)
    figures = psnr_by_steps(draws, pipeline_images(folder, ref, draws), pipeline_images(folder, quant, draws))
    return {
        "quality": {"psnr_db_vs_fp32_by_steps": {k: round(v, 2) for k, v in figures.items()}, "images": len(draws)},
        "gate": {
            "passed": bool(min(figures.values()) >= GATE_MIN_PSNR_DB),
            "rule": f"image PSNR vs the fp32 graphs >= {GATE_MIN_PSNR_DB} dB at every step count",
        },
    }


def calibration_record(manifest: dict[str, Any], feeds: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """What a quantized UNet was calibrated on, for its manifest."""
    if "recipe" not in manifest:
        return {"unet_calls": len(feeds), "prompts": len(CALIBRATION_PROMPTS), "first_step": list(BASE_TIMESTEPS)}
    return {"unet_calls": len(feeds), "prompts": len(CALIBRATION_PROMPTS), "step_aware": True}


def quantize_pipeline(folder: Path, precision: str) -> dict[str, Any]:
    """Write `onnx/<precision>/` (a quantized UNet beside the fp32 text and VAE graphs); returns its manifest
    with calibration, quality by step count and the gate."""
    if precision not in PRECISIONS[1:]:
        raise CheckpointError(f"pipelines quantize to {PRECISIONS[1:]}, not {precision!r}")
    manifest = read_manifest(folder)
    paths, fp32 = verified_graphs(folder, manifest, "fp32")
    feeds = unet_calibration(folder, manifest, paths, fp32)
    root = folder / ROOT
    with tempfile.TemporaryDirectory(dir=root, prefix=".partial-") as tmp_name:
        tmp = Path(tmp_name)
        built = tmp / precision
        built.mkdir()
        target = built / "unet.onnx"
        external = fp32["graphs"]["unet"]["data"] is not None
        quantize_graph(paths["unet"], target, precision, feeds, tmp, external_data=external)
        unet = graph_entry(tmp, target, fp32["graphs"]["unet"]["inputs"], ["pred"])
        art = {
            **{k: v for k, v in fp32.items() if k not in ("parity", "graphs")},
            "precision": precision,
            "graphs": {**fp32["graphs"], "unet": unet},
            # Dynamic quantization takes activation ranges from the whole batch: served one row per call.
            "batch_invariant": precision != "int8-dynamic",
            "derived_from": {"artifact": "fp32", "unet_sha256": fp32["graphs"]["unet"]["sha256"]},
            "calibration": calibration_record(manifest, feeds),
        }
        quant = GraphNets({**paths, "unet": target}, art, providers=["CPUExecutionProvider"], arena=False)
        ref = GraphNets(paths, fp32, providers=["CPUExecutionProvider"], arena=False)
        art.update(unet_gate(folder, manifest, ref, quant))
        write_json_atomic(built / "manifest.json", art)
        _place(built, folder, precision)
    return art
