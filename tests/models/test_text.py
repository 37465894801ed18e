import torch

from fewstep.models.text import ENCODER_DIM


def test_encodes_token_states_and_mask(encoder) -> None:  # type: ignore[no-untyped-def]
    states, mask = encoder.encode(["a red circle", "a blue square on a white background"])
    assert states.shape == (2, encoder.max_tokens, ENCODER_DIM)
    assert mask.shape == (2, encoder.max_tokens)
    assert mask[0].sum() < mask[1].sum()  # the longer prompt has more real tokens


def test_cached_encoding_equals_fresh_encoding(encoder) -> None:  # type: ignore[no-untyped-def]
    a, _ = encoder.encode(["a green cross"])
    b, _ = encoder.encode(["something else", "a green cross"])
    fresh, _ = encoder._encode_uncached(["a green cross"])
    assert torch.equal(a[0], b[1])
    assert torch.allclose(a[0], fresh[0], atol=1e-6)
