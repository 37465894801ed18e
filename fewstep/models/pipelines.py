"""Users' diffusers pipelines as parts the latent engine runs: components loaded from a registry version, and
the prompt encoding, guidance embedding and conditioning of Stable Diffusion (1.x/2.x) and SDXL pipelines,
written as diffusers writes them (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`), so that fewstep's
images are the pipeline's images (tests/engines/test_latent.py checks it, family by family).

`LatentNets` is what any backend provides (torch here; ONNX Runtime graphs in `artifacts`): the text
encoders, the UNet and the VAE decoder as tensor functions. Tokenizers are not networks: the engine runs them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from fewstep.errors import CheckpointError
from fewstep.models import lazy

ENCODERS = {"sd": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}
TOKENIZERS = {"sd": ("tokenizer",), "sdxl": ("tokenizer", "tokenizer_2")}


@dataclass(frozen=True)
class TextOut:
    """What the UNet is conditioned on: token states (B, L, D), and for SDXL the pooled text embeds (B, P)."""

    states: torch.Tensor
    pooled: torch.Tensor | None = None

    def take(self, rows: list[int]) -> TextOut:
        return TextOut(self.states[rows], None if self.pooled is None else self.pooled[rows])


class LatentNets(Protocol):
    """The networks of a latent pipeline, as tensor functions."""

    arch: str
    time_cond_dim: int | None
    """Width of the UNet's guidance embedding input (LCM students), or None."""

    def encode(self, ids: list[torch.Tensor], masks: list[torch.Tensor]) -> TextOut:
        """Token ids and attention masks per tokenizer, each (B, L) → the UNet's conditioning, as the pipeline
        computes it."""
        ...

    def unet(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        states: torch.Tensor,
        timestep_cond: torch.Tensor | None,
        pooled: torch.Tensor | None,
        time_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """The UNet's prediction for latents `sample` (B, C, h, w) at per-row `timestep` (B,)."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the sampler ends with them → images (B, 3, H, W) in [-1, 1]."""
        ...


class EncodingNets(LatentNets, Protocol):
    """Latent networks with the VAE's encoder too: what an edit (img2img) needs."""

    def encode_image(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] → latents as the sampler starts from them: the VAE's posterior sampled
        with `noise` (its mean + its std × noise, as `latent_dist.sample` draws it), scaled as the pipelines
        scale it."""
        ...


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The LCM guidance embedding of scales `w` (B,): what the pipelines pass as `timestep_cond` for w − 1."""
    w = w * 1000.0
    half = dim // 2
    emb = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w.to(torch.float32)[:, None] * emb[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 == 1 else emb


def time_ids(height: int, width: int) -> torch.Tensor:
    """SDXL's added time ids for a (height, width) image made whole: original size, crop (0, 0), target size."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)


def postprocess(images: torch.Tensor) -> Any:
    """Decoded images (B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8, as diffusers' image processor rounds."""
    x = (images * 0.5 + 0.5).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).float().numpy() * 255).round().astype("uint8")


@dataclass
class Tokenizers:
    """The pipeline's tokenizers, one per text encoder, truncating as the pipelines do."""

    items: list[Any]

    @property
    def max_tokens(self) -> int:
        return int(self.items[0].model_max_length)

    def __call__(self, prompts: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Ids and attention masks per tokenizer, (B, model_max_length) each: padded, and cut at the limit
        (diffusers' rule: the prompt's first model_max_length − 2 tokens are kept)."""
        ids, masks = [], []
        for tok in self.items:
            batch = tok(
                prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
            )
            ids.append(batch.input_ids)
            masks.append(batch.attention_mask)
        return ids, masks

    def count(self, prompt: str) -> int:
        """Tokens the first tokenizer makes of `prompt` (begin and end marks included)."""
        return len(self.items[0](prompt).input_ids)


def load_tokenizers(folder: Path, manifest: dict[str, Any]) -> Tokenizers:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    components = manifest["pipeline"]["components"]
    names = TOKENIZERS[manifest["pipeline"]["arch"]]
    return Tokenizers([lazy.attr("transformers", components[n]).from_pretrained(str(folder / n)) for n in names])


class TorchNets:
    """`LatentNets` on torch: the pipeline's own modules, loaded from a verified registry version."""

    def __init__(self, folder: Path, manifest: dict[str, Any], device: str, dtype: torch.dtype) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        pipe = manifest["pipeline"]
        self.arch = str(pipe["arch"])
        variants = pipe.get("variants") or {}
        kw: dict[str, Any] = {"torch_dtype": dtype, "use_safetensors": True, "local_files_only": True}
        try:
            self.unet_model = lazy.attr("diffusers", "UNet2DConditionModel").from_pretrained(
                str(folder / "unet"), variant=variants.get("unet"), **kw
            )
            vae_class = lazy.attr("diffusers", "AutoencoderKL")
            self.vae = vae_class.from_pretrained(str(folder / "vae"), variant=variants.get("vae"), **kw)
            self.encoders = [
                lazy.attr("transformers", pipe["components"][n]).from_pretrained(
                    str(folder / n), variant=variants.get(n), **kw
                )
                for n in ENCODERS[self.arch]
            ]
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{folder.name}: the pipeline's components do not load ({type(e).__name__}: {e})"
            ) from e
        for m in (self.unet_model, self.vae, *self.encoders):
            m.to(device).eval().requires_grad_(False)
        # VAEs that overflow in float16 say so (SDXL's): they decode in float32, as the pipelines do.
        self.vae_dtype = torch.float32 if dtype == torch.float16 and self.vae.config.get("force_upcast") else dtype
        self.vae.to(self.vae_dtype)
        self.device, self.dtype = device, dtype
        self.time_cond_dim = self.unet_model.config.time_cond_proj_dim

    @torch.inference_mode()
    def encode(self, ids: list[torch.Tensor], masks: list[torch.Tensor]) -> TextOut:
        return encode_text(
            self.arch, self.encoders, [x.to(self.device) for x in ids], [m.to(self.device) for m in masks]
        )

    @torch.inference_mode()
    def unet(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        states: torch.Tensor,
        timestep_cond: torch.Tensor | None,
        pooled: torch.Tensor | None,
        time_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        # The networks run in their dtype (half types on CUDA); the scheduler's math stays in float32.
        def cast(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(self.device, self.dtype)

        added = {"text_embeds": cast(pooled), "time_ids": cast(time_ids)} if pooled is not None else None
        return self.unet_model(
            cast(sample),
            timestep.to(self.device),
            encoder_hidden_states=cast(states),
            timestep_cond=cast(timestep_cond),
            added_cond_kwargs=added,
            return_dict=False,
        )[0].float()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, latents.to(self.device, self.vae_dtype)).float()

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return encode_latents(self.vae, images.to(self.device, self.vae_dtype), noise.to(self.device)).float()


def encode_text(arch: str, encoders: list[Any], ids: list[torch.Tensor], masks: list[Any]) -> TextOut:
    """The UNet's conditioning as the pipelines compute it: SD the (optionally masked) last hidden state; SDXL
    the penultimate hidden states of both encoders side by side and the projection model's pooled embeds."""
    if arch == "sd":
        enc = encoders[0]
        mask = masks[0] if getattr(enc.config, "use_attention_mask", False) else None
        return TextOut(enc(ids[0], attention_mask=mask)[0])
    states, pooled = [], None
    for enc, x in zip(encoders, ids, strict=True):
        out = enc(x, output_hidden_states=True)
        if out[0].ndim == 2:  # the projection model's text embeds: the pooled conditioning
            pooled = out[0]
        states.append(out.hidden_states[-2])
    return TextOut(torch.cat(states, dim=-1), pooled)


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents as the sampler ends with them → images in [-1, 1], undoing the VAE's scaling (and SDXL-style
    per-channel latent statistics where the VAE has them)."""
    cfg = vae.config
    scaling = float(cfg.scaling_factor)
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        c = latents.shape[1]
        m = torch.tensor(mean).view(1, c, 1, 1).to(latents)
        latents = latents * torch.tensor(std).view(1, c, 1, 1).to(latents) / scaling + m
    else:
        latents = latents / scaling
    return vae.decode(latents, return_dict=False)[0]


def encode_latents(vae: Any, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] → scaled latents, as the img2img pipelines make their starting latents: the posterior
    sampled (mean + std × `noise`), then scaled (and normalised by the per-channel latent statistics where the
    VAE has them: SDXL-style)."""
    dist = vae.encode(images, return_dict=False)[0]
    x = dist.mean + dist.std * noise.to(dist.mean)
    cfg = vae.config
    scaling = float(cfg.scaling_factor)
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        c = x.shape[1]
        m, s = torch.tensor(mean).view(1, c, 1, 1).to(x), torch.tensor(std).view(1, c, 1, 1).to(x)
        return (x - m) * scaling / s
    return x * scaling


def vae_factor(manifest: dict[str, Any]) -> int:
    """Pixels per latent cell (8 for Stable Diffusion)."""
    return int(manifest.get("latent", {}).get("vae_scale_factor", 8))


def size_multiple(manifest: dict[str, Any]) -> int:
    """Pixels each side of a served image is a multiple of: the VAE factor times the UNet's downsampling."""
    latent = manifest.get("latent", {})
    return int(latent.get("size_multiple", vae_factor(manifest)))


def dtype_of(name: str) -> torch.dtype:
    """`float32`, `float16` or `bfloat16` as a torch dtype; CheckpointError otherwise."""
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise CheckpointError(f"dtype must be one of {sorted(table)}. Given: {name!r}")
    return table[name]
