"""Prompt encodings for training: every caption the data set can produce, encoded once."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fewstep.evaluation import shapes
from fewstep.models.text import TextEncoder


class CaptionBank:
    """Token states and masks of all training captions plus the null ("") prompt for CFG."""

    def __init__(self, encoder: TextEncoder, captions: Sequence[str] | None = None, chunk: int = 256) -> None:
        self.encoder = encoder
        caps = list(captions) if captions is not None else shapes.all_train_captions()
        self.index = {c: i for i, c in enumerate(caps)}
        states, masks = [], []
        for i in range(0, len(caps), chunk):
            s, m = encoder._encode_uncached(caps[i : i + chunk])
            states.append(s)
            masks.append(m)
        self.states = torch.cat(states)
        self.masks = torch.cat(masks)
        self.null_states, self.null_mask = encoder._encode_uncached([""])

    def lookup(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encodings for `captions`; captions outside the bank go through the encoder (cached)."""
        if all(c in self.index for c in captions):
            idx = torch.tensor([self.index[c] for c in captions])
            return self.states[idx], self.masks[idx]
        return self.encoder.encode(captions)
