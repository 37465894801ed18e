"""Test support: tiny random diffusers pipelines (SD-, SDXL-, FLUX-, SD3-, Z-Image-, FLUX.2-klein-, Qwen-Image-,
SANA-Sprint- and Wan-style) saved as users save theirs.

The components follow diffusers' own pipeline tests (tiny UNets, transformers, VAEs, CLIP, T5, Qwen and Gemma text
encoders); the tokenizers are written here (nothing is downloaded): a character-level CLIP vocabulary, a T5
Unigram model and a Gemma BPE model built with the `tokenizers` package, and a byte-level Qwen BPE with a chat
template. `width` scales the UNet for the benchmark, where it must dominate the cost.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from fewstep.models.families import QWEN_IMAGE_LIGHTNING

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
SCHEDULER = {  # the base pipelines' own scheduler config (SD 1.5 / SDXL style)
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "timestep_spacing": "leading",
}


def tokenizer(folder: Path, max_length: int = 77) -> Any:
    """A CLIP tokenizer whose vocabulary is every letter and digit (as a word part and a word end), saved to
    `folder`. `<|endoftext|>` has the largest id: tiny CLIP configs pool at the largest id of each row."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, **{c: 1 + i for i, c in enumerate(CHARS)}}
    vocab |= {f"{c}</w>": len(vocab) + i for i, c in enumerate(CHARS)}
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    config = {"model_max_length": max_length, "unk_token": "<|endoftext|>", **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


def _text(hidden: int, layers: int, projection: bool = False) -> Any:
    import transformers

    config = transformers.CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=2,
        num_hidden_layers=layers,
        vocab_size=1000,
        hidden_act="gelu",
        projection_dim=hidden,
    )
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


def sd(folder: Path, seed: int = 0, time_cond_proj_dim: int | None = None, width: int = 8) -> Path:
    """A tiny StableDiffusionPipeline (64×64 images, 32×32 latents) saved to `folder`."""
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(width // 2, width),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
        time_cond_proj_dim=time_cond_proj_dim,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
    )
    text = _text(8, 2)
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer(folder / "_tok"),
        scheduler=diffusers.DDIMScheduler.from_config(SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    _drop(folder / "_tok")
    return folder


def sdxl(folder: Path, seed: int = 0, time_cond_proj_dim: int | None = None) -> Path:
    """A tiny StableDiffusionXLPipeline (64×64 images) saved to `folder`."""
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(2, 4),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids × 8 + the pooled text's 32
        cross_attention_dim=64,
        norm_num_groups=1,
        time_cond_proj_dim=time_cond_proj_dim,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
    )
    pipe = diffusers.StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=_text(32, 3),
        text_encoder_2=_text(32, 3, projection=True),
        tokenizer=tokenizer(folder / "_tok"),
        tokenizer_2=tokenizer(folder / "_tok2"),
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SCHEDULER),
        add_watermarker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    _drop(folder / "_tok")
    _drop(folder / "_tok2")
    return folder


def t5_tokenizer(folder: Path, max_length: int = 512) -> Any:
    """A T5 tokenizer (fast, Unigram) whose pieces are every letter and digit, with and without the word-start
    mark, saved to `folder`: `</s>` ends every prompt, as T5's does."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(f"\u2581{c}", -3.0) for c in CHARS] + [(c, -4.0) for c in CHARS]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
        model_max_length=max_length,
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return transformers.T5TokenizerFast.from_pretrained(str(folder))


def _t5(vocab: int) -> Any:
    """A tiny T5 encoder (diffusers' own tests' shape, written in code: no hub config)."""
    import transformers

    config = transformers.T5Config(
        d_model=32, d_kv=4, d_ff=16, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, vocab_size=vocab, feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new", is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.T5EncoderModel(config).eval()


def _shifted_vae(latent_channels: int) -> Any:
    """A two-level VAE with a latent shift, as FLUX's and SD3's have (diffusers' tests' scaling and shift):
    latents at half the pixels."""
    import diffusers

    return diffusers.AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )  # fmt: skip


def flux(
    folder: Path, seed: int = 0, latent_channels: int = 4, heads: int = 2, layers: tuple[int, int] = (1, 1)
) -> Path:
    """A tiny FluxPipeline (FLUX.1-schnell-style: no guidance embedding) saved to `folder`: `layers` (double,
    single) transformer blocks of `heads` heads of 16, a two-level VAE (latents at half the pixels, packed 2×2
    into tokens), CLIP-L-style and T5 encoders. More heads and blocks make the transformer dominate (the
    benchmark's)."""
    import diffusers

    torch.manual_seed(seed)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=layers[0], num_single_layers=layers[1],
        attention_head_dim=16, num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )  # fmt: skip
    vae = _shifted_vae(latent_channels)
    t5_tok = t5_tokenizer(folder / "_tok2")
    pipe = diffusers.FluxPipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=_text(32, 2),
        text_encoder_2=_t5(len(t5_tok)),
        tokenizer=tokenizer(folder / "_tok"),
        tokenizer_2=t5_tok,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    _drop(folder / "_tok")
    _drop(folder / "_tok2")
    return folder


def sd3(folder: Path, seed: int = 0) -> Path:
    """A tiny StableDiffusion3Pipeline (SD3.5-style: QK-normed joint attention, three text encoders) saved to
    `folder`: diffusers' own test transformer with 2×2 patches, a two-level VAE (latents at half the pixels: 64×64
    images natively, sides a multiple of 4), CLIP-L- and CLIP-G-style encoders 8 and 16 wide (their states padded
    to T5's 32, their pooled outputs 24 together), T5, and a FlowMatchEuler scheduler shifted by 3 as SD3's ship."""
    import diffusers

    torch.manual_seed(seed)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=24, out_channels=4,
        qk_norm="rms_norm",
    )  # fmt: skip
    vae = _shifted_vae(4)
    t5_tok = t5_tokenizer(folder / "_tok3")
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=_text(8, 2, projection=True),
        text_encoder_2=_text(16, 2, projection=True),
        text_encoder_3=_t5(len(t5_tok)),
        tokenizer=tokenizer(folder / "_tok"),
        tokenizer_2=tokenizer(folder / "_tok2"),
        tokenizer_3=t5_tok,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for tok in ("_tok", "_tok2", "_tok3"):
        _drop(folder / tok)
    return folder


QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
"""Qwen3's chat template, cut to what text-to-image pipelines send: messages, the assistant's turn opened, and the
empty thinking block `enable_thinking=False` asks for."""


def qwen_tokenizer(folder: Path, max_length: int = 512) -> Any:
    """A Qwen2 tokenizer (fast, byte-level BPE) with one token per byte and no merges, Qwen's chat special tokens
    and a chat template, saved to `folder`: what the Qwen-encoded pipelines (Z-Image, Qwen-Image, FLUX.2 klein)
    load, built here instead of downloaded."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.Qwen2TokenizerFast(
        tokenizer_object=tok, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL[1:]), model_max_length=max_length,
    )  # fmt: skip
    fast.add_special_tokens({"pad_token": "<|endoftext|>"})
    fast.chat_template = QWEN_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return transformers.Qwen2TokenizerFast.from_pretrained(str(folder))


def zimage(folder: Path, seed: int = 0) -> Path:
    """A tiny ZImagePipeline (Z-Image-Turbo-style: FlowMatchEuler with shift 3, no dynamic shifting) saved to
    `folder`: diffusers' own test transformer and VAE (16 latent channels at half the pixels), a Qwen3 encoder
    whose vocabulary covers `qwen_tokenizer`'s."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    transformer = diffusers.ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    )  # fmt: skip
    with torch.no_grad():  # the pad tokens are left uninitialised by some diffusers versions: NaNs in a saved model
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1, latent_channels=16,
        norm_num_groups=32, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
    )  # fmt: skip
    tok = qwen_tokenizer(folder / "_tok")
    config = transformers.Qwen3Config(
        hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=512,
    )  # fmt: skip
    pipe = diffusers.ZImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False),
        vae=vae,
        text_encoder=transformers.Qwen3Model(config).eval(),
        tokenizer=tok,
        transformer=transformer,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    _drop(folder / "_tok")
    return folder


KLEIN_SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True, "time_shift_type": "exponential"}
"""FLUX.2 [klein]'s shipped scheduler settings (black-forest-labs/FLUX.2-klein-4B `scheduler_config.json`): the
shift follows `mu`, which the pipeline computes per image (`compute_empirical_mu`)."""


def flux2_klein(folder: Path, seed: int = 0, latent_channels: int = 4, distilled: bool = True) -> Path:
    """A tiny Flux2KleinPipeline (`is_distilled` as given) saved to `folder`, as diffusers' own klein test builds
    it but for: a two-level VAE (latents at half the pixels, patchified 2×2 into channels) with batch-norm
    statistics that are not the identity, and a Qwen3 of 28 layers (hidden 16), so the pipeline's default
    layers (9, 18, 27) exist."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    tok = qwen_tokenizer(folder / "_tok")
    hidden = 16
    transformer = diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * hidden, timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False,
    )  # fmt: skip
    text = transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(
            hidden_size=hidden, intermediate_size=16, num_hidden_layers=28, num_attention_heads=2,
            num_key_value_heads=2, head_dim=8, vocab_size=len(tok), max_position_embeddings=512,
        )
    ).eval()  # fmt: skip
    vae = diffusers.AutoencoderKLFlux2(
        sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    with torch.no_grad():  # statistics as a trained VAE's: the normalisation is then visible in every image
        vae.bn.running_mean.copy_(0.5 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    pipe = diffusers.Flux2KleinPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER),
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        transformer=transformer,
        is_distilled=distilled,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    _drop(folder / "_tok")
    return folder


QWEN_IMAGE_SCHEDULER = {**QWEN_IMAGE_LIGHTNING, "base_shift": 0.5, "max_shift": 0.9, "shift_terminal": 0.02}
"""Qwen/Qwen-Image's own scheduler config (the base model's, before any Lightning LoRA): the keys of the Lightning
README's config, with the base model's shifts and terminal sigma."""


def qwen_image(folder: Path, seed: int = 0) -> Path:
    """A tiny QwenImagePipeline (the base model a Lightning LoRA goes over) saved to `folder`, shaped as diffusers'
    own test builds it: a two-block transformer of three heads of 16 taking 2×2-packed latents, a video-style VAE
    (4 latent channels, two downsamplings: 4 pixels a cell) with latent statistics that are not the identity, a
    two-layer Qwen2.5-VL text encoder whose vocabulary covers `qwen_tokenizer`'s, and Qwen-Image's own scheduler
    config."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )  # fmt: skip
    vae = diffusers.AutoencoderKLQwenImage(
        base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.05, 0.3], latents_std=[1.5, 0.8, 1.2, 2.0],
    )  # fmt: skip
    tok = qwen_tokenizer(folder / "_tok", max_length=32768)
    text = {
        "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default",
        "type": "default"}, "rope_theta": 1000000.0, "vocab_size": len(tok) + 3,
        "bos_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
    }  # fmt: skip
    config = transformers.Qwen2_5_VLConfig(
        text_config=text,
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tok) + 3, vision_end_token_id=151653, vision_start_token_id=151652,
        vision_token_id=151654,
    )  # fmt: skip
    pipe = diffusers.QwenImagePipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=transformers.Qwen2_5_VLForConditionalGeneration(config).eval(),
        tokenizer=tok,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER),
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    _drop(folder / "_tok")
    return folder


GEMMA_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")


def gemma_tokenizer(folder: Path, words: list[str], max_length: int = 512) -> Any:
    """A Gemma tokenizer (fast, BPE with byte fallback, as Gemma's), saved to `folder`: every ASCII letter, digit and
    mark, and merges that make each of `words` (alone, and after a space) one token, so that a long instruction
    stays a few hundred tokens. Begins each prompt with `<bos>`; pads with `<pad>`."""
    import string

    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {s: i for i, s in enumerate(GEMMA_SPECIAL)}
    for c in "\u2581\n" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(c, len(vocab))
    merges = []
    for word in dict.fromkeys(words):
        for piece in ("\u2581" + word, word):
            left = piece[0]
            for c in piece[1:]:
                if left + c not in vocab:
                    vocab[left + c] = len(vocab)
                    merges.append((left, c))
                left += c
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    fast = transformers.GemmaTokenizerFast(
        tokenizer_object=tok, add_bos_token=True, add_eos_token=False, model_max_length=max_length
    )
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return transformers.GemmaTokenizerFast.from_pretrained(str(folder))


def sana(folder: Path, seed: int = 0) -> Path:
    """A tiny SanaSprintPipeline saved to `folder`, as diffusers' own SANA-Sprint test builds it (a one-block
    transformer with the guidance embedding, a two-level DC-AE: 64×64 images of 32×32 latents, a one-layer
    Gemma-2), with `SCMScheduler`. Its Gemma tokenizer knows the words of the pipeline's default instruction and
    of the tests' prompts."""
    import diffusers
    import transformers

    from fewstep.models.architectures import sana_instruction

    torch.manual_seed(seed)
    transformer = diffusers.SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=32, qk_norm="rms_norm_across_heads", guidance_embeds=True,
    )  # fmt: skip
    vae = diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1], downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407,
    )  # fmt: skip
    words = [*sana_instruction().split(), "a", "red", "circle", "on", "white", "table", "blue", "square", "cross"]
    tok = gemma_tokenizer(folder / "_tok", words)
    config = transformers.Gemma2Config(
        head_dim=16, hidden_size=8, initializer_range=0.02, intermediate_size=64, max_position_embeddings=8192,
        num_attention_heads=2, num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(tok),
        attn_implementation="eager",
    )  # fmt: skip
    pipe = diffusers.SanaSprintPipeline(
        tokenizer=tok,
        text_encoder=transformers.Gemma2Model(config).eval(),
        vae=vae,
        transformer=transformer,
        scheduler=diffusers.SCMScheduler(),
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    _drop(folder / "_tok")
    return folder


def _umt5(vocab: int) -> Any:
    """A tiny UMT5 encoder (Wan's text encoder class), of the tiny T5's shape."""
    import transformers

    config = transformers.UMT5Config(
        d_model=32, d_kv=4, d_ff=16, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, vocab_size=vocab, feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new", is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.UMT5EncoderModel(config).eval()


def wan(folder: Path, seed: int = 0, layers: int = 2, heads: int = 2) -> Path:
    """A tiny WanPipeline saved to `folder`, as diffusers' own Wan test builds it: a transformer of `layers` blocks
    of `heads` heads of 12 (2×2 patches of 16 latent channels; rotary positions for 32 latent frames), the Wan VAE
    (4× in time after the first frame, 8× in space) and a UMT5 encoder with the Unigram tokenizer built here. The
    base a causal student's checkpoint goes over (`tests/models/test_wan_causal.py`)."""
    import diffusers

    torch.manual_seed(seed)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )  # fmt: skip
    vae = diffusers.AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    tok = t5_tokenizer(folder / "_tok")
    pipe = diffusers.WanPipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=_umt5(len(tok)),
        tokenizer=tok,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0),
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    _drop(folder / "_tok")
    return folder


def _drop(folder: Path) -> None:
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
