"""Pipeline architectures as data: what each supported diffusers pipeline class is made of, and how its networks are
called.

An `Architecture` is one table entry: the pipeline classes it covers, its components and the classes accepted
for each, which component is the denoiser (`unet` or `transformer`), its text encoders and tokenizers, the
kind of families that sample it (`unet`: the DDPM-era schedulers; `flow`: flow matching; `trigflow`: SANA-Sprint's
sCM), and its `Adapter`.
The adapter is the part that differs in code, kept small:

* `geometry`: the native size, latent channels, VAE factor and the size multiple, from the configs;
* `encode`: the text encoders' outputs as the pipeline conditions its denoiser on them (`TextOut`);
* `denoise`: the denoiser's call convention: latents (B, C, h, w) as the sampler keeps them, the scheduler's
  timestep, the conditioning; any packing into tokens, position ids and timestep scale are the adapter's.

Everything else is shared: `fewstep import` copies and checks the components the entry names, the sampler walks
the family's scheduler on unpacked latents (the schedulers' updates are elementwise, so packing is invisible to
them), the VAE decode and encode normalise by the VAE config's own fields (`scaling_factor`, `shift_factor`,
`latents_mean`/`latents_std`). Adding an architecture is an entry here and its adapter (docs/architecture.md;
`tests/models/test_architectures.py` adds one).
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fewstep.errors import CheckpointError
from fewstep.models import lazy
from fewstep.models.checkpoint import MAX_SIDE

CLIP_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
T5_TOKENIZERS = ("T5TokenizerFast", "T5Tokenizer")
QWEN_TOKENIZERS = ("Qwen2Tokenizer", "Qwen2TokenizerFast")
GEMMA_TOKENIZERS = ("GemmaTokenizerFast", "GemmaTokenizer")
SamplingKind = Literal["unet", "flow", "trigflow"]
"""The sampling math of a family (`Family.kind`) and of the architectures it samples (`Architecture.schedulers`): the
DDPM-era schedulers' integer timesteps, flow matching's sigmas, or TrigFlow's angles (SANA-Sprint's `SCMScheduler`)."""


@dataclass(frozen=True)
class TextOut:
    """What the denoiser is conditioned on: token states (B, L, D), and pooled text embeds (B, P) where the
    architecture has them (SDXL, FLUX). `mask` (B, L), 1 for a real token, where the architecture keeps each
    prompt's own length (LLM encoders: Z-Image, Qwen-Image): the states are then padded to the longest row; or,
    with `padded`, where every prompt keeps the encoder's padded length and the mask only tells the denoiser's
    attention which tokens are real (SANA)."""

    states: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    padded: bool = False
    """Whether each row keeps its full padded length (the pipeline gives its denoiser every prompt at one length,
    with the mask), instead of being cut to its own tokens."""

    def take(self, rows: list[int]) -> TextOut:
        """These rows; a masked output's one row cut to its own tokens (how the prompt cache keeps it), unless
        the rows keep their padded length."""
        pooled = None if self.pooled is None else self.pooled[rows]
        if self.mask is None:
            return TextOut(self.states[rows], pooled)
        mask = self.mask[rows]
        if len(rows) == 1 and not self.padded:
            n = int(mask.sum())
            return TextOut(self.states[rows][:, :n], pooled, mask[:, :n])
        return TextOut(self.states[rows], pooled, mask, self.padded)


def stack(texts: list[TextOut]) -> TextOut:
    """Rows of several outputs as one batch: masked ones padded with zeros to the longest, their masks with 0."""
    pooled = None if texts[0].pooled is None else torch.cat([t.pooled for t in texts if t.pooled is not None])
    if all(t.mask is None for t in texts):
        return TextOut(torch.cat([t.states for t in texts]), pooled)
    length = max(t.states.shape[1] for t in texts)
    states, masks = [], []
    for t in texts:
        pad = length - t.states.shape[1]
        mask = t.mask if t.mask is not None else torch.ones(t.states.shape[:2], dtype=torch.int64)
        states.append(torch.nn.functional.pad(t.states, (0, 0, 0, pad)))
        masks.append(torch.nn.functional.pad(mask.to(torch.int64), (0, pad)))
    return TextOut(torch.cat(states), pooled, torch.cat(masks))


@dataclass(frozen=True)
class Conditioning:
    """One denoiser call's conditioning, row by row: token states, the guidance embedding (LCM's `timestep_cond`,
    a FLUX-dev-style guidance), pooled text embeds, SDXL's size time ids and the token mask (`TextOut.mask`), each
    where the architecture has it."""

    states: torch.Tensor
    timestep_cond: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class Geometry:
    """Sizes of an imported pipeline: its native side (pixels), latent channels (as the sampler keeps them,
    unpacked), pixels per latent cell, and the multiple every served side must be."""

    side: int
    channels: int
    vae_factor: int
    multiple: int


class Adapter:
    """What differs in code between architectures. `geometry`, `encode` and `denoise` are each adapter's own; the
    VAE's normalisation (`decode`, `encode_image`) is shared unless an architecture's VAE differs (a video VAE's
    frame axis, batch-norm statistics)."""

    size_ids: bool = False
    """Whether the denoiser takes SDXL's size time ids."""
    padding_side: Literal["left", "right"] | None = None
    """The side the pipeline pads its prompts on where it sets one (SANA's: right, whatever its tokenizer says);
    None: the tokenizer's own."""
    float_sample: bool = False
    """Whether `denoise` takes the latents in float32 and casts them for the network itself (SANA's pipeline
    rescales its latents in float32 before the cast); else they come in the network's dtype."""
    patch: int = 1
    """Latent cells per token side (FLUX's 2×2 packing: 2): an image's sequence length, which size-dependent
    schedules (`mu`) read, is (h / patch) × (w / patch)."""

    def geometry(self, network: dict[str, Any], vae: dict[str, Any]) -> Geometry:
        raise NotImplementedError

    def encode(self, encoders: list[Any], ids: list[torch.Tensor], masks: list[Any]) -> TextOut:
        """The text encoders' outputs as the pipeline conditions its denoiser on them."""
        raise NotImplementedError

    def denoise(self, network: Any, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoiser's prediction for latents `sample` (B, C, h, w) at per-row `timestep` (B,), as the family's
        scheduler takes it."""
        raise NotImplementedError

    def decode(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the sampler ends with them → images (B, 3, H, W) in [-1, 1]."""
        return decode_latents(vae, latents)

    def encode_image(self, vae: Any, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → latents as the sampler starts an edit from them (`encode_latents`)."""
        return encode_latents(vae, images, noise)

    def template(self, tokenizer: Any, index: int, prompt: str) -> str:
        """The text tokenizer `index` is given for `prompt`: the prompt itself, or the pipeline's chat template
        around it (LLM-encoded pipelines)."""
        return prompt

    def length(self, tokenizer: Any, index: int, sequence: int) -> int:
        """The padded length tokenizer `index` is given for a family's `max_sequence_length` `sequence`: the
        sequence itself, unless the pipeline pads to more (SANA: the instruction its template prepends, too).
        Called at import; the manifest keeps it."""
        return sequence

    def tokens(self, height: int, width: int) -> int:
        """The image's sequence length for latents of `height` × `width` cells."""
        return (height // self.patch) * (width // self.patch)


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents as the sampler ends with them → images in [-1, 1], undoing the VAE's scaling (and its shift, FLUX's
    and SD3's, or SDXL-style per-channel latent statistics, where the VAE has them)."""
    cfg = vae.config
    scaling = float(getattr(cfg, "scaling_factor", None) or 1.0)
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    shift = getattr(cfg, "shift_factor", None)
    if mean is not None and std is not None:
        c = latents.shape[1]
        m = torch.tensor(mean).view(1, c, 1, 1).to(latents)
        latents = latents * torch.tensor(std).view(1, c, 1, 1).to(latents) / scaling + m
    else:
        latents = latents / scaling + (float(shift) if shift is not None else 0.0)
    return vae.decode(latents, return_dict=False)[0]


def encode_latents(vae: Any, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] → scaled latents, as the img2img pipelines make their starting latents: the posterior
    sampled (mean + std × `noise`), then scaled (and normalised by the per-channel latent statistics where the
    VAE has them: SDXL-style)."""
    dist = vae.encode(images, return_dict=False)[0]
    x = dist.mean + dist.std * noise.to(dist.mean)
    cfg = vae.config
    scaling = float(getattr(cfg, "scaling_factor", None) or 1.0)
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        c = x.shape[1]
        m, s = torch.tensor(mean).view(1, c, 1, 1).to(x), torch.tensor(std).view(1, c, 1, 1).to(x)
        return (x - m) * scaling / s
    shift = getattr(cfg, "shift_factor", None)
    return (x - (float(shift) if shift is not None else 0.0)) * scaling


def config_int(config: dict[str, Any], key: str, where: str, default: int, high: int) -> int:
    """A config's integer field, within [1, `high`]: CheckpointError naming the file, the field and the value
    (configs are untrusted: a list or a huge number must be a clear refusal, not a TypeError)."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise CheckpointError(f"{where}: `{key}` must be an integer from 1 to {high}. Given: {str(value)[:40]}")
    return value


def config_ints(config: dict[str, Any], key: str, where: str, default: list[int]) -> list[int]:
    value = config.get(key, default)
    if not isinstance(value, list) or not 1 <= len(value) <= 16 or not all(isinstance(v, int) for v in value):
        raise CheckpointError(f"{where}: `{key}` must be a list of 1 to 16 integers. Given: {str(value)[:60]}")
    return value


def vae_scale(vae: dict[str, Any]) -> int:
    """Pixels per latent cell: 2 to the number of the VAE's downsamplings."""
    return int(2 ** (len(config_ints(vae, "block_out_channels", "vae/config.json", [0])) - 1))


class UNetSD(Adapter):
    """Stable Diffusion 1.x/2.x (`StableDiffusionPipeline`): one CLIP encoder's last hidden state (masked where the
    encoder says so), the UNet called as the pipeline calls it."""

    def geometry(self, network: dict[str, Any], vae: dict[str, Any]) -> Geometry:
        factor = vae_scale(vae)
        side = config_int(network, "sample_size", "unet/config.json", 64, MAX_SIDE) * factor
        if side > MAX_SIDE:
            raise CheckpointError(f"its native size {side}x{side} (unet `sample_size` × {factor}) is over {MAX_SIDE}")
        down = network.get("down_block_types", [0])
        if not isinstance(down, list) or not 1 <= len(down) <= 16:
            raise CheckpointError("unet/config.json: `down_block_types` must be a list of 1 to 16 block names")
        channels = config_int(network, "in_channels", "unet/config.json", 4, 1024)
        # Sides in whole UNet cells (every downsampling halves): what exported graphs can serve, and so what every
        # backend serves, for one spec per version.
        return Geometry(side, channels, factor, factor * 2 ** (len(down) - 1))

    def encode(self, encoders: list[Any], ids: list[torch.Tensor], masks: list[Any]) -> TextOut:
        enc = encoders[0]
        mask = masks[0] if getattr(enc.config, "use_attention_mask", False) else None
        return TextOut(enc(ids[0], attention_mask=mask)[0])

    def denoise(self, network: Any, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids} if cond.pooled is not None else None
        return network(
            sample,
            timestep,
            encoder_hidden_states=cond.states,
            timestep_cond=cond.timestep_cond,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]


class UNetSDXL(UNetSD):
    """SDXL (`StableDiffusionXLPipeline`): both CLIP encoders' penultimate hidden states side by side and the
    projection model's pooled embeds; the UNet takes them with the size time ids."""

    size_ids = True

    def encode(self, encoders: list[Any], ids: list[torch.Tensor], masks: list[Any]) -> TextOut:
        states, pooled = [], None
        for enc, x in zip(encoders, ids, strict=True):
            out = enc(x, output_hidden_states=True)
            if out[0].ndim == 2:  # the projection model's text embeds: the pooled conditioning
                pooled = out[0]
            states.append(out.hidden_states[-2])
        return TextOut(torch.cat(states, dim=-1), pooled)


class Flux(Adapter):
    """FLUX.1 (`FluxPipeline`): CLIP's pooled output and T5's last hidden state (no attention mask, as the pipeline
    encodes); the transformer takes the latents packed 2×2 into tokens, (0, row, column) position ids, zero text
    ids and the timestep divided by 1000; a guidance embedding only where the transformer has one."""

    patch = 2
    DEFAULT_SAMPLE_SIZE = 128
    """FluxPipeline's `default_sample_size`: its native side is this many latent cells (1024 pixels)."""

    def geometry(self, network: dict[str, Any], vae: dict[str, Any]) -> Geometry:
        factor = vae_scale(vae)
        channels = config_int(vae, "latent_channels", "vae/config.json", 16, 1024)
        packed = config_int(network, "in_channels", "transformer/config.json", 64, 4096)
        if packed != channels * self.patch**2:
            raise CheckpointError(
                f"transformer/config.json: `in_channels` must be the VAE's {channels} latent channels × 4 (2×2 "
                f"patches). Given: {packed}"
            )
        side = min(self.DEFAULT_SAMPLE_SIZE * factor, MAX_SIDE)
        return Geometry(side, channels, factor, factor * self.patch)

    def encode(self, encoders: list[Any], ids: list[torch.Tensor], masks: list[Any]) -> TextOut:
        clip, t5 = encoders
        pooled = clip(ids[0], output_hidden_states=False).pooler_output
        return TextOut(t5(ids[1], output_hidden_states=False)[0], pooled)

    def denoise(self, network: Any, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        h, w = sample.shape[2:]
        p = self.patch
        tokens = pack(sample, p)
        rows = torch.arange(h // p, device=sample.device, dtype=sample.dtype)
        cols = torch.arange(w // p, device=sample.device, dtype=sample.dtype)
        img_ids = torch.stack(
            [
                torch.zeros(h // p, w // p, device=sample.device, dtype=sample.dtype),
                *torch.meshgrid(rows, cols, indexing="ij"),
            ],
            dim=-1,
        ).reshape(-1, 3)
        txt_ids = torch.zeros(cond.states.shape[1], 3, device=sample.device, dtype=sample.dtype)
        guidance = cond.timestep_cond if getattr(network.config, "guidance_embeds", False) else None
        out = network(
            hidden_states=tokens,
            timestep=timestep.to(sample.dtype) / 1000,
            guidance=guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.states,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return unpack(out, sample.shape, p)


def pack(sample: torch.Tensor, p: int) -> torch.Tensor:
    """Latents (B, C, h, w) → tokens (B, (h / p)(w / p), C p²): p × p patches in row order, as FluxPipeline and
    QwenImagePipeline pack theirs."""
    b, c, h, w = sample.shape
    return sample.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def unpack(tokens: torch.Tensor, shape: torch.Size, p: int) -> torch.Tensor:
    """`pack` undone: tokens back to latents of `shape` (B, C, h, w)."""
    b, c, h, w = shape
    return tokens.view(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class QwenImage(Adapter):
    """Qwen-Image (`QwenImagePipeline`): the prompt inside the pipeline's fixed system template, encoded by
    Qwen2.5-VL (its last hidden state), the template's first 34 tokens dropped and each prompt kept at its own
    length (`TextOut.mask`); the transformer takes the latents packed 2×2 into tokens, the token mask (none when no
    row is padded, as the pipeline passes it), the image's (frames, rows, columns) of tokens and the timestep divided
    by 1000. Its VAE is a video VAE: latents gain a frame axis and are normalised by its `latents_mean` and
    `latents_std`."""

    patch = 2
    template_tokens = 34
    """The pipeline's `prompt_template_encode_start_idx`: the system turn and the user turn's opening."""
    TEMPLATE = (
        "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
        "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    DEFAULT_SAMPLE_SIZE = 128
    """QwenImagePipeline's `default_sample_size`: its native side is this many latent cells (1024 pixels)."""

    def length(self, tokenizer: Any, index: int, sequence: int) -> int:
        # The template's tokens are dropped from the states: the prompt itself keeps `sequence` tokens.
        return sequence + self.template_tokens

    def geometry(self, network: dict[str, Any], vae: dict[str, Any]) -> Geometry:
        where = "vae/config.json"
        downsample = vae.get("temperal_downsample", [False, True, True])
        if not isinstance(downsample, list) or not 1 <= len(downsample) <= 8:
            raise CheckpointError(f"{where}: `temperal_downsample` must be a list of 1 to 8 flags")
        factor = 2 ** len(downsample)  # the pipeline's `vae_scale_factor`: one spatial halving per level
        channels = config_int(vae, "z_dim", where, 16, 1024)
        packed = config_int(network, "in_channels", "transformer/config.json", 64, 4096)
        out = config_int(network, "out_channels", "transformer/config.json", 16, 4096)
        if packed != channels * self.patch**2 or out != channels:
            raise CheckpointError(
                f"transformer/config.json: `in_channels` and `out_channels` must be the VAE's {channels} latent "
                f"channels × 4 (2×2 patches) and {channels}. Given: {packed} and {out}"
            )
        side = min(self.DEFAULT_SAMPLE_SIZE * factor, MAX_SIDE)
        return Geometry(side, channels, factor, factor * self.patch)

    def template(self, tokenizer: Any, index: int, prompt: str) -> str:
        return self.TEMPLATE.format(prompt)

    def encode(self, encoders: list[Any], ids: list[torch.Tensor], masks: list[Any]) -> TextOut:
        # No logits are needed: only the last one is computed (a 152k-word head over every token otherwise).
        out = encoders[0](input_ids=ids[0], attention_mask=masks[0], output_hidden_states=True, logits_to_keep=1)
        kept = zip(out.hidden_states[-1], masks[0], strict=True)
        rows = [states[keep.bool()][self.template_tokens :] for states, keep in kept]
        return stack([TextOut(r[None], None, torch.ones(1, len(r), dtype=torch.int64, device=r.device)) for r in rows])

    def denoise(self, network: Any, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, _, h, w = sample.shape
        mask = cond.mask if cond.mask is not None and not bool(cond.mask.all()) else None
        out = network(
            hidden_states=pack(sample, self.patch),
            timestep=timestep.to(sample.dtype) / 1000,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=cond.states,
            img_shapes=[[(1, h // self.patch, w // self.patch)]] * b,
            return_dict=False,
        )[0]
        return unpack(out, sample.shape, self.patch)

    def decode(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        mean, inverse_std = self._statistics(vae, latents)
        return vae.decode(latents.unsqueeze(2) / inverse_std + mean, return_dict=False)[0][:, :, 0]

    def encode_image(self, vae: Any, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        dist = vae.encode(images.unsqueeze(2), return_dict=False)[0]
        x = dist.mean + dist.std * noise.unsqueeze(2).to(dist.mean)
        mean, inverse_std = self._statistics(vae, x)
        return ((x - mean) * inverse_std)[:, :, 0]

    @staticmethod
    def _statistics(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent mean and 1 / std, shaped (1, C, 1, 1, 1) (frames, rows, columns), as the pipelines hold
        them."""
        c = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1).to(like.device, like.dtype)
        return mean, 1.0 / torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1).to(like.device, like.dtype)


class SD3(Adapter):
    """Stable Diffusion 3 and 3.5 (`StableDiffusion3Pipeline`): both CLIP encoders' penultimate hidden states side
    by side, padded with zeros to T5's width, then T5's last hidden state (no attention masks) on the token axis;
    both CLIPs' projected pooled outputs side by side. The transformer patchifies the latents itself (its own
    `patch_size`) and takes the scheduler's timestep as it is (0–1000)."""

    def geometry(self, network: dict[str, Any], vae: dict[str, Any]) -> Geometry:
        factor = vae_scale(vae)
        where = "transformer/config.json"
        channels = config_int(network, "in_channels", where, 16, 1024)
        latent = config_int(vae, "latent_channels", "vae/config.json", 16, 1024)
        if channels != latent:
            raise CheckpointError(
                f"{where}: `in_channels` must be the VAE's {latent} latent channels. Given: {channels}"
            )
        patch = config_int(network, "patch_size", where, 2, 16)
        side = min(config_int(network, "sample_size", where, 128, MAX_SIDE) * factor, MAX_SIDE)
        return Geometry(side, channels, factor, factor * patch)

    def encode(self, encoders: list[Any], ids: list[torch.Tensor], masks: list[Any]) -> TextOut:
        clip_l, clip_g, t5 = encoders
        states, pooled = [], []
        for enc, x in ((clip_l, ids[0]), (clip_g, ids[1])):
            out = enc(x, output_hidden_states=True)
            pooled.append(out[0])  # the projection model's text embeds
            states.append(out.hidden_states[-2])
        clip = torch.cat(states, dim=-1)
        t5_states = t5(ids[2])[0]
        # The pipeline's pad: zeros up to T5's width (a wider CLIP pair would be cut to it, as there).
        clip = torch.nn.functional.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
        return TextOut(torch.cat([clip, t5_states], dim=-2), torch.cat(pooled, dim=-1))

    def denoise(self, network: Any, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return network(
            hidden_states=sample,
            timestep=timestep,
            encoder_hidden_states=cond.states,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0]


class ZImage(Adapter):
    """Z-Image (`ZImagePipeline`): the prompt in Qwen's chat template (the assistant's turn opened, thinking on),
    the Qwen3 encoder's second-to-last hidden state, each prompt kept to its own tokens; the transformer takes a
    list of per-image latents (C, 1, h, w) and a list of per-prompt captions, patchifies 2×2 itself, is given
    1 − t/1000 and predicts the negated velocity."""

    patch = 2
    NATIVE_SIDE = 1024
    """ZImagePipeline's default height and width (pixels, whatever the VAE)."""

    def geometry(self, network: dict[str, Any], vae: dict[str, Any]) -> Geometry:
        factor = vae_scale(vae)
        channels = config_int(vae, "latent_channels", "vae/config.json", 16, 1024)
        if config_int(network, "in_channels", "transformer/config.json", 16, 1024) != channels:
            raise CheckpointError(
                f"transformer/config.json: `in_channels` must be the VAE's {channels} latent channels. Given: "
                f"{network.get('in_channels')}"
            )
        where = "transformer/config.json"
        patches = config_ints(network, "all_patch_size", where, [2])
        frames = config_ints(network, "all_f_patch_size", where, [1])
        # The pipeline calls the transformer with its default 2×2 patches of one frame: it must have that embedder.
        if len(patches) != len(frames) or (self.patch, 1) not in zip(patches, frames, strict=True):
            raise CheckpointError(
                f"{where}: the transformer has no 2×2 patch embedder (`all_patch_size` 2, `all_f_patch_size` 1)"
            )
        return Geometry(min(self.NATIVE_SIDE, MAX_SIDE), channels, factor, factor * self.patch)

    def template(self, tokenizer: Any, index: int, prompt: str) -> str:
        return str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
        )

    def encode(self, encoders: list[Any], ids: list[torch.Tensor], masks: list[Any]) -> TextOut:
        mask = masks[0].bool()
        # `base_model`: a Qwen3ForCausalLM's inner Qwen3Model (the same hidden states, without the LM head's logits).
        hidden = (
            encoders[0].base_model(input_ids=ids[0], attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        )
        # Each prompt's own tokens first (whichever side the tokenizer pads): the prompt cache cuts a row to them.
        rows = [h[m] for h, m in zip(hidden, mask, strict=True)]
        states = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        own = [torch.ones(len(r), dtype=torch.int64, device=states.device) for r in rows]
        return TextOut(states, None, torch.nn.utils.rnn.pad_sequence(own, batch_first=True))

    def denoise(self, network: Any, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        lengths = [cond.states.shape[1]] * len(sample) if cond.mask is None else cond.mask.sum(dim=1).tolist()
        captions = [s[:n] for s, n in zip(cond.states, lengths, strict=True)]
        out = network(list(sample.unsqueeze(2).unbind(0)), (1000 - timestep) / 1000, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)


class Flux2Klein(Adapter):
    """FLUX.2 [klein] (`Flux2KleinPipeline`): the prompt in Qwen3's chat template (no thinking), padded to the
    family's length and encoded whole (the transformer attends to the padding too: no mask), hidden states of
    layers 9, 18 and 27 side by side per token. The sampler keeps the latents as the pipeline draws them: the
    VAE's latents patchified 2×2 into channels and normalised by the VAE's batch-norm statistics, one token per
    cell; the transformer takes them as tokens with (0, row, column, 0) ids, text ids (0, 0, 0, index), the
    timestep divided by 1000 and no guidance. Decoding undoes the normalisation and the patches."""

    DEFAULT_SAMPLE_SIZE = 128
    """Flux2KleinPipeline's `default_sample_size`: its native side is this many VAE cells (1024 pixels)."""
    LAYERS = (9, 18, 27)
    """The text encoder's hidden states the pipeline stacks (its `text_encoder_out_layers` default)."""

    def geometry(self, network: dict[str, Any], vae: dict[str, Any]) -> Geometry:
        factor = vae_scale(vae)
        channels = config_int(vae, "latent_channels", "vae/config.json", 32, 1024)
        if vae.get("patch_size", [2, 2]) != [2, 2]:
            raise CheckpointError(
                f"vae/config.json: `patch_size` must be [2, 2] (the pipeline patchifies 2×2). Given: "
                f"{str(vae.get('patch_size'))[:40]}"
            )
        if config_int(network, "patch_size", "transformer/config.json", 1, 16) != 1:
            raise CheckpointError("transformer/config.json: `patch_size` must be 1 (one token per patchified cell)")
        packed = config_int(network, "in_channels", "transformer/config.json", 128, 4096)
        if packed != channels * 4:
            raise CheckpointError(
                f"transformer/config.json: `in_channels` must be the VAE's {channels} latent channels × 4 (2×2 "
                f"patches). Given: {packed}"
            )
        side = min(self.DEFAULT_SAMPLE_SIZE * factor, MAX_SIDE)
        return Geometry(side, packed, 2 * factor, 2 * factor)

    def template(self, tokenizer: Any, index: int, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        return str(
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        )

    def encode(self, encoders: list[Any], ids: list[torch.Tensor], masks: list[Any]) -> TextOut:
        # The causal LM's body alone: the same hidden states without a vocabulary-wide logit per token.
        out = encoders[0].model(input_ids=ids[0], attention_mask=masks[0], output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states
        if len(hidden) <= max(self.LAYERS):
            raise CheckpointError(f"the text encoder has {len(hidden) - 1} layers; klein reads layers {self.LAYERS}")
        states = torch.stack([hidden[k] for k in self.LAYERS], dim=1)
        b, n, length, d = states.shape
        return TextOut(states.permute(0, 2, 1, 3).reshape(b, length, n * d))

    def denoise(self, network: Any, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, c, h, w = sample.shape
        tokens = sample.reshape(b, c, h * w).permute(0, 2, 1)
        rows, cols = torch.meshgrid(
            torch.arange(h, device=sample.device), torch.arange(w, device=sample.device), indexing="ij"
        )
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols, torch.zeros_like(rows)], dim=-1).reshape(-1, 4)
        length = cond.states.shape[1]
        txt_ids = torch.zeros(length, 4, dtype=torch.int64, device=sample.device)
        txt_ids[:, 3] = torch.arange(length, device=sample.device)
        out = network(
            hidden_states=tokens,
            timestep=timestep.to(sample.dtype) / 1000,
            guidance=None,
            encoder_hidden_states=cond.states,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w)

    def decode(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
        x = latents * std + mean
        b, c, h, w = x.shape
        x = x.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)
        return vae.decode(x, return_dict=False)[0]


@functools.cache
def sana_instruction() -> str:
    """SanaSprintPipeline's default `complex_human_instruction`, its lines joined as the pipeline joins them: what the
    pipeline puts before every prompt when called with its defaults (as the model card calls it). Read from the
    installed diffusers, so that the two never disagree."""
    call = lazy.attr("diffusers", "SanaSprintPipeline").__call__
    return "\n".join(inspect.signature(call).parameters["complex_human_instruction"].default)


class Sana(Adapter):
    """SANA-Sprint (`SanaSprintPipeline`): Gemma-2's last hidden state of the pipeline's instruction followed by the
    prompt (lower-cased and stripped, as the pipeline does without `clean_caption`), padded on the right; the
    transformer is given the first token and the last 299 with their mask (every prompt at 300 tokens), the TrigFlow
    time and latents turned into the flow convention it was trained in (SANA-Sprint's sCM transform), and the
    guidance scale times its `guidance_embeds_scale`. Latents reach `denoise` in the VAE's units: the sampler
    divides out the scheduler's `sigma_data` (`Recipe.latent_scale`)."""

    padding_side = "right"
    float_sample = True
    SEQUENCE = 300
    """Prompt tokens the transformer is given: the pipeline's `max_sequence_length` (the model card's), its first
    token and the last 299 of the encoding."""
    SIDE_MULTIPLE = 32
    """The pipeline refuses sides that are not a multiple of 32 (`check_inputs`)."""

    def geometry(self, network: dict[str, Any], vae: dict[str, Any]) -> Geometry:
        factor = 2 ** (len(config_ints(vae, "encoder_block_out_channels", "vae/config.json", [0])) - 1)
        channels = config_int(vae, "latent_channels", "vae/config.json", 32, 1024)
        if config_int(network, "in_channels", "transformer/config.json", 32, 1024) != channels:
            raise CheckpointError(
                f"transformer/config.json: `in_channels` must be the VAE's {channels} latent channels"
            )
        side = config_int(network, "sample_size", "transformer/config.json", 32, MAX_SIDE) * factor
        if side > MAX_SIDE:
            raise CheckpointError(
                f"its native size {side}x{side} (transformer `sample_size` × {factor}) is over {MAX_SIDE}"
            )
        patch = config_int(network, "patch_size", "transformer/config.json", 1, 64)
        return Geometry(side, channels, factor, math.lcm(self.SIDE_MULTIPLE, factor * patch))

    def template(self, tokenizer: Any, index: int, prompt: str) -> str:
        return sana_instruction() + prompt.lower().strip()

    def length(self, tokenizer: Any, index: int, sequence: int) -> int:
        if sequence != self.SEQUENCE:
            raise CheckpointError(f"SANA pipelines give the transformer {self.SEQUENCE} tokens. Given: {sequence}")
        # The pipeline pads the instruction and prompt to the instruction's tokens (its begin mark among them) and
        # the sequence, less the begin mark and one more.
        return len(tokenizer.encode(sana_instruction())) + sequence - 2

    def encode(self, encoders: list[Any], ids: list[torch.Tensor], masks: list[Any]) -> TextOut:
        states = encoders[0](ids[0], attention_mask=masks[0])[0]
        keep = [0, *range(1 - self.SEQUENCE, 0)]
        return TextOut(states[:, keep], mask=masks[0][:, keep], padded=True)

    def denoise(self, network: Any, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        # TrigFlow's angle t as the flow time s the transformer was trained on, and its input and output rescaled
        # to match (the sCM transform of SANA-Sprint).
        flow_t = torch.sin(timestep) / (torch.cos(timestep) + torch.sin(timestep))
        s = flow_t.view(-1, 1, 1, 1)
        norm = torch.sqrt(s**2 + (1 - s) ** 2)
        x = sample * norm
        guidance = None if cond.timestep_cond is None else cond.timestep_cond * network.config.guidance_embeds_scale
        out = network(
            x.to(network.dtype),
            encoder_hidden_states=cond.states,
            encoder_attention_mask=cond.mask,
            guidance=guidance,
            timestep=flow_t,
            return_dict=False,
        )[0]
        return ((1 - 2 * s) * x + (1 - 2 * s + 2 * s**2) * out) / norm


@dataclass(frozen=True)
class Architecture:
    """What a supported pipeline class is made of (see the module docstring)."""

    name: str
    pipelines: tuple[str, ...]
    network: Literal["unet", "transformer"]
    components: dict[str, tuple[str, ...]]
    encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    schedulers: SamplingKind
    """Which families sample it: the DDPM-era schedulers' (`unet`), flow matching's (`flow`) or TrigFlow's."""
    adapter: Adapter
    text_cost: int = 0
    """What encoding one prompt costs, in denoiser evaluations, counted in an item's cost (per-key limits): 0 where
    CLIP encoders are small beside the denoiser; 1 for T5 and LLM encoders (FLUX's T5-XXL is ~4.7B parameters
    beside a 12B transformer, Qwen-Image's 7B encoder beside a 20B one: at 1–4 steps the encoding is a
    step's worth)."""
    edits: bool = False
    """Whether its edits are served: only where a test shows them equal to the architecture's diffusers img2img
    pipeline (`tests/engines/test_latent.py`)."""

    @property
    def weighted(self) -> tuple[str, ...]:
        """The components with weights: the denoiser, the VAE and the text encoders."""
        return (self.network, "vae", *self.encoders)


_SD_PARTS = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": CLIP_TOKENIZERS,
}
ARCHITECTURES: dict[str, Architecture] = {
    "sd": Architecture(
        "sd",
        ("StableDiffusionPipeline", "LatentConsistencyModelPipeline"),
        "unet",
        _SD_PARTS,
        ("text_encoder",),
        ("tokenizer",),
        "unet",
        UNetSD(),
        edits=True,  # StableDiffusionImg2ImgPipeline
    ),
    "sdxl": Architecture(
        "sdxl",
        ("StableDiffusionXLPipeline",),
        "unet",
        {**_SD_PARTS, "text_encoder_2": ("CLIPTextModelWithProjection",), "tokenizer_2": CLIP_TOKENIZERS},
        ("text_encoder", "text_encoder_2"),
        ("tokenizer", "tokenizer_2"),
        "unet",
        UNetSDXL(),
        edits=True,  # StableDiffusionXLImg2ImgPipeline
    ),
    "flux": Architecture(
        "flux",
        ("FluxPipeline",),
        "transformer",
        {
            "transformer": ("FluxTransformer2DModel",),
            "vae": ("AutoencoderKL",),
            "text_encoder": ("CLIPTextModel",),
            "text_encoder_2": ("T5EncoderModel",),
            "tokenizer": CLIP_TOKENIZERS,
            "tokenizer_2": T5_TOKENIZERS,
        },
        ("text_encoder", "text_encoder_2"),
        ("tokenizer", "tokenizer_2"),
        "flow",
        Flux(),
        text_cost=1,
        edits=True,  # FluxImg2ImgPipeline
    ),
    "sd3": Architecture(
        "sd3",
        ("StableDiffusion3Pipeline",),
        "transformer",
        {
            "transformer": ("SD3Transformer2DModel",),
            "vae": ("AutoencoderKL",),
            "text_encoder": ("CLIPTextModelWithProjection",),
            "text_encoder_2": ("CLIPTextModelWithProjection",),
            "text_encoder_3": ("T5EncoderModel",),
            "tokenizer": CLIP_TOKENIZERS,
            "tokenizer_2": CLIP_TOKENIZERS,
            "tokenizer_3": T5_TOKENIZERS,
        },
        ("text_encoder", "text_encoder_2", "text_encoder_3"),
        ("tokenizer", "tokenizer_2", "tokenizer_3"),
        "flow",
        SD3(),
        text_cost=1,
    ),
    "zimage": Architecture(
        "zimage",
        ("ZImagePipeline",),
        "transformer",
        {
            "transformer": ("ZImageTransformer2DModel",),
            "vae": ("AutoencoderKL",),
            # The pipeline reads only the encoder's hidden states: a causal LM's are its inner model's.
            "text_encoder": ("Qwen3Model", "Qwen3ForCausalLM"),
            "tokenizer": QWEN_TOKENIZERS,
        },
        ("text_encoder",),
        ("tokenizer",),
        "flow",
        ZImage(),
        text_cost=1,
    ),
    "flux2": Architecture(
        "flux2",
        ("Flux2KleinPipeline",),
        "transformer",
        {
            "transformer": ("Flux2Transformer2DModel",),
            "vae": ("AutoencoderKLFlux2",),
            "text_encoder": ("Qwen3ForCausalLM",),
            "tokenizer": QWEN_TOKENIZERS,
        },
        ("text_encoder",),
        ("tokenizer",),
        "flow",
        Flux2Klein(),
        text_cost=1,
    ),
    "qwenimage": Architecture(
        "qwenimage",
        ("QwenImagePipeline",),
        "transformer",
        {
            "transformer": ("QwenImageTransformer2DModel",),
            "vae": ("AutoencoderKLQwenImage",),
            "text_encoder": ("Qwen2_5_VLForConditionalGeneration",),
            "tokenizer": QWEN_TOKENIZERS,
        },
        ("text_encoder",),
        ("tokenizer",),
        "flow",
        QwenImage(),
        text_cost=1,
    ),
    "sana": Architecture(
        "sana",
        ("SanaSprintPipeline",),
        "transformer",
        {
            "transformer": ("SanaTransformer2DModel",),
            "vae": ("AutoencoderDC",),
            "text_encoder": ("Gemma2Model",),
            "tokenizer": GEMMA_TOKENIZERS,
        },
        ("text_encoder",),
        ("tokenizer",),
        "trigflow",
        Sana(),
        text_cost=1,
    ),
}


def by_pipeline(cls: object) -> Architecture:
    """The architecture of a pipeline class name; CheckpointError listing the supported ones."""
    for arch in ARCHITECTURES.values():
        if cls in arch.pipelines:
            return arch
    supported = sorted(c for a in ARCHITECTURES.values() for c in a.pipelines)
    raise CheckpointError(f"pipeline class {str(cls)[:80]!r} is not supported; supported: {supported}")


def architecture(name: object) -> Architecture:
    """The architecture a manifest names; CheckpointError otherwise."""
    if not isinstance(name, str) or name not in ARCHITECTURES:
        raise CheckpointError(f"unknown pipeline architecture {str(name)[:40]!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]
