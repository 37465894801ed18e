"""Test support: a tiny random AnyFlowFARPipeline (NVIDIA's causal any-step student on Wan 2.1), saved as users
save theirs.

Built as diffusers' own `tests/pipelines/anyflow/test_anyflow_far.py` builds it (research notes, Appendix A): the
FAR transformer of 2 blocks × 2 heads × 12 (2×2 patches, 4×4 compressed patches, 3 full-resolution chunks, rotary
positions for 32 latent frames, gate 0.25, delta time `r`), the Wan VAE, `FlowMapEulerDiscreteScheduler(shift=5)`,
and the UMT5 encoder with the Unigram tokenizer of `tests.pipelines` (nothing is downloaded).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tests.pipelines import _drop, _umt5, t5_tokenizer


def anyflow_far(
    folder: Path,
    seed: int = 0,
    chunk_partition: Sequence[int] = (1, 1, 1),
    full_chunk_limit: int = 3,
    layers: int = 2,
    heads: int = 2,
) -> Path:
    """A tiny AnyFlowFARPipeline saved to `folder`: `chunk_partition` is the transformer's default partition (the
    pipeline's when the call gives none; its sum is the clip's latent frames), `full_chunk_limit` how many chunks
    a chunk sees at full resolution, itself included."""
    import diffusers

    torch.manual_seed(seed)
    transformer = diffusers.AnyFlowFARTransformer3DModel(
        patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4), full_chunk_limit=full_chunk_limit,
        num_attention_heads=heads, attention_head_dim=12, in_channels=16, out_channels=16, text_dim=32, freq_dim=256,
        ffn_dim=32, num_layers=layers, cross_attn_norm=True, rope_max_seq_len=32, gate_value=0.25,
        deltatime_type="r", chunk_partition=tuple(chunk_partition),
    )  # fmt: skip
    vae = diffusers.AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    tok = t5_tokenizer(folder / "_tok")
    pipe = diffusers.AnyFlowFARPipeline(
        tokenizer=tok,
        text_encoder=_umt5(len(tok)),
        transformer=transformer,
        vae=vae,
        scheduler=diffusers.FlowMapEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0),
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    _drop(folder / "_tok")
    return folder
