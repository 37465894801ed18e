"""Pictures as they cross the queue: (H, W, 3) uint8 arrays ↔ base64 PNG.

Only trusted PNGs are decoded here (an edit's starting image, which the gateway has already bounded,
decoded and re-encoded at the item's size: `service.uploads`); untrusted uploads never reach an engine.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def encode_png(pixels: np.ndarray) -> str:
    """(H, W, 3) uint8 → base64 PNG, as the API returns it."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_png(b64: str, width: int, height: int) -> np.ndarray:
    """A queued item's base64 PNG → (H, W, 3) uint8; ValueError unless it is exactly `width` × `height`."""
    with Image.open(io.BytesIO(base64.b64decode(b64, validate=True))) as im:
        if im.size != (width, height):
            raise ValueError(f"the starting image is {im.size[0]}x{im.size[1]}, the item {width}x{height}")
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
