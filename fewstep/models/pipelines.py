"""Users' diffusers pipelines as parts the latent engine runs: components loaded from a registry version, the
guidance embedding and conditioning helpers, and the VAE's normalisation, written as diffusers writes them, so
that fewstep's images are the pipeline's images (tests/engines/test_latent.py checks it, family by family). What
differs between architectures (text conditioning, the denoiser's call) is their adapter's
(`models.architectures`).

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
from fewstep.models.architectures import Adapter, Conditioning, TextOut, architecture


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
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The denoiser's prediction for latents `sample` (B, C, h, w) at per-row `timestep` (B,); `mask`: the
        token mask of `states` where prompts keep their own lengths (`TextOut.mask`)."""
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
    lengths: list[int] | None = None
    adapter: Adapter | None = None
    """The architecture's adapter: what text each tokenizer is given for a prompt (`Adapter.template`)."""
    """Each tokenizer's padded length: its `model_max_length` unless the family says (FLUX's T5: the pipeline's
    `max_sequence_length`)."""

    def length(self, i: int) -> int:
        return int(self.lengths[i] if self.lengths else self.items[i].model_max_length)

    @property
    def max_tokens(self) -> int:
        return self.length(0)

    def __call__(self, prompts: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Ids and attention masks per tokenizer, (B, length) each: padded, and cut at the limit (diffusers' rule:
        the prompt's first tokens are kept, the end mark last)."""
        ids, masks = [], []
        side = None if self.adapter is None else self.adapter.padding_side
        padding = {} if side is None else {"padding_side": side}
        for i, tok in enumerate(self.items):
            texts = prompts if self.adapter is None else [self.adapter.template(tok, i, p) for p in prompts]
            batch = tok(
                texts, padding="max_length", max_length=self.length(i), truncation=True, return_tensors="pt", **padding
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
    names = architecture(manifest["pipeline"]["arch"]).tokenizers
    lengths = manifest.get("text", {}).get("lengths")
    items = [lazy.attr("transformers", components[n]).from_pretrained(str(folder / n)) for n in names]
    spec = architecture(manifest["pipeline"]["arch"])
    return Tokenizers(items, [int(n) for n in lengths] if isinstance(lengths, list) else None, spec.adapter)


class TorchNets:
    """`LatentNets` on torch: the pipeline's own modules, loaded from a verified registry version."""

    def __init__(self, folder: Path, manifest: dict[str, Any], device: str, dtype: torch.dtype) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        pipe = manifest["pipeline"]
        spec = architecture(pipe["arch"])
        self.arch, self.adapter = spec.name, spec.adapter
        variants = pipe.get("variants") or {}
        kw: dict[str, Any] = {"torch_dtype": dtype, "use_safetensors": True, "local_files_only": True}
        try:
            # The classes the manifest names (checked against the architecture's at import).
            network = lazy.attr("diffusers", _component(pipe, spec.components, spec.network))
            self.unet_model = network.from_pretrained(
                str(folder / spec.network), variant=variants.get(spec.network), **kw
            )
            vae_class = lazy.attr("diffusers", _component(pipe, spec.components, "vae"))
            self.vae = vae_class.from_pretrained(str(folder / "vae"), variant=variants.get("vae"), **kw)
            self.encoders = [
                lazy.attr("transformers", pipe["components"][n]).from_pretrained(
                    str(folder / n), variant=variants.get(n), **kw
                )
                for n in spec.encoders
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
        self.time_cond_dim = getattr(self.unet_model.config, "time_cond_proj_dim", None)

    @torch.inference_mode()
    def encode(self, ids: list[torch.Tensor], masks: list[torch.Tensor]) -> TextOut:
        return self.adapter.encode(self.encoders, [x.to(self.device) for x in ids], [m.to(self.device) for m in masks])

    @torch.inference_mode()
    def unet(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        states: torch.Tensor,
        timestep_cond: torch.Tensor | None,
        pooled: torch.Tensor | None,
        time_ids: torch.Tensor | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # The networks run in their dtype (half types on CUDA); the scheduler's math stays in float32.
        def cast(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(self.device, self.dtype)

        cond = Conditioning(
            states.to(self.device, self.dtype),
            cast(timestep_cond),
            cast(pooled),
            cast(time_ids),
            None if mask is None else mask.to(self.device),
        )
        x = sample.to(self.device, torch.float32 if self.adapter.float_sample else self.dtype)
        return self.adapter.denoise(self.unet_model, x, timestep.to(self.device), cond).float()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.adapter.decode(self.vae, latents.to(self.device, self.vae_dtype)).float()

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, self.vae_dtype)
        return self.adapter.encode_image(self.vae, images, noise.to(self.device)).float()


def _component(pipe: dict[str, Any], allowed: dict[str, tuple[str, ...]], key: str) -> str:
    """The class the manifest names for component `key`, if the architecture allows it (a manifest is untrusted)."""
    cls = pipe.get("components", {}).get(key, allowed[key][0])
    if cls not in allowed[key]:
        raise CheckpointError(f"{key} class {str(cls)[:60]!r} is not one a {pipe.get('class')} takes")
    return str(cls)


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
