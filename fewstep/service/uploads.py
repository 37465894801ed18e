"""Uploaded images, bounded before they are parsed: what `POST /v1/images/edits` turns into an edit's start.

An upload is untrusted: its bytes are already bounded (`upload_max_bytes`, by the body limit); here its format
is told from its first bytes (PNG, JPEG or WebP only: no format PIL would guess from content), its declared
size is read from its header and refused past `upload_max_pixels` before a pixel is decoded (a decompression
bomb never inflates), and only then is it decoded, turned upright (EXIF orientation), flattened to RGB and
resized to the edit's size (Lanczos, as diffusers' image processor resizes). What leaves is a PNG of exactly
that size: the one trusted form an engine decodes (`engines.pixels`).
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

from fewstep.engines.pixels import encode_png
from fewstep.errors import InvalidRequest, limit_error

FORMATS = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"RIFF": "WEBP"}
"""Magic bytes → the only formats taken (WebP also has `WEBP` at offset 8)."""


def sniff(data: bytes) -> str | None:
    """The upload's format from its first bytes, or None."""
    for magic, name in FORMATS.items():
        if data.startswith(magic) and (name != "WEBP" or data[8:12] == b"WEBP"):
            return name
    return None


def open_upload(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """The upload as a PIL image whose header was read and checked, not yet decoded. InvalidRequest (naming
    `field`) for an unknown format, an unreadable header or more than `max_pixels` pixels."""
    fmt = sniff(data)
    if fmt is None:
        raise InvalidRequest(field, f"`{field}` must be a PNG, JPEG or WebP image. Given: {data[:8]!r}…")
    rule = f"an image of at most {max_pixels} pixels (`upload_max_pixels`)"
    try:
        im = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as e:  # PIL's own header check, far above any sane setting
        declared = re.search(r"\((\d+) pixels\)", str(e))
        raise limit_error(field, rule, f"{declared.group(1) if declared else 'too many'} pixels") from e
    except (OSError, ValueError) as e:
        raise InvalidRequest(field, f"`{field}` is not a readable {fmt} image ({type(e).__name__})") from e
    w, h = im.size
    if w < 1 or h < 1 or w * h > max_pixels:
        im.close()
        raise limit_error(field, rule, f"{w}x{h}")
    return im


def edit_start(
    data: bytes, field: str, max_pixels: int, target: Callable[[int, int], tuple[int, int]]
) -> tuple[str, int, int]:
    """An upload → (base64 PNG, width, height) of the edit's starting image, at the size `target(w, h)` names for
    an upload of w × h. InvalidRequest as `open_upload`, or when the pixels do not decode."""
    im = open_upload(data, field, max_pixels)
    try:
        with im, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
            upright = ImageOps.exif_transpose(im)
            rgb = upright.convert("RGBA") if upright.mode in ("P", "LA", "PA") else upright
            if rgb.mode == "RGBA":  # transparent pixels on white, not on whatever colour they hide
                white = Image.new("RGBA", rgb.size, (255, 255, 255, 255))
                rgb = Image.alpha_composite(white, rgb)
            rgb = rgb.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise InvalidRequest(field, f"`{field}` does not decode ({type(e).__name__}: {str(e)[:80]})") from e
    size = target(*rgb.size)  # of the upright picture
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    return encode_png(np.asarray(rgb, dtype=np.uint8)), rgb.size[0], rgb.size[1]


def snap(width: int, height: int, low: int, high: int, multiple: int) -> tuple[int, int]:
    """A size a model with free sizes makes of an upload of width × height: each side cut down to its multiple
    (diffusers' image processor's rule) and kept within [low, high]."""

    def side(n: int) -> int:
        return min(max(n - n % multiple, low), high - high % multiple)

    return side(width), side(height)
