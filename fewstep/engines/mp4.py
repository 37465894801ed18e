"""Frames → MP4: H.264 in yuv420p, the container every browser's `<video>` and every player reads.

4:2:0 chroma halves both sides, so H.264 in yuv420p takes even widths and heights only: a clip of odd sides is
refused (`InvalidRequest`), never padded, so that a decoded clip has exactly the size it was asked for. The
`moov` atom goes first (`+faststart`): a player can start from the first bytes, or from any range it asks for.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from fewstep.errors import InvalidRequest, limit_error

CODEC = "libx264"
PIXEL_FORMAT = "yuv420p"
MEDIA_TYPE = "video/mp4"


def check_even(width: int, height: int) -> None:
    """InvalidRequest unless both sides are even (yuv420p's 2×2 chroma blocks)."""
    if width % 2 or height % 2:
        raise InvalidRequest("size", f"an MP4 (H.264, {PIXEL_FORMAT}) needs even sides. Given: {width}x{height}")


def encode_mp4(frames: Sequence[np.ndarray], fps: float, crf: int, max_bytes: int) -> bytes:
    """The frames ((H, W, 3) uint8, all one size) as one MP4 playing at `fps`. `InvalidRequest` for odd sides or
    no frames; `InvalidRequest` naming `video_max_bytes` when the file would be bigger than `max_bytes`."""
    if not frames:
        raise limit_error("frames", "at least 1", 0)
    height, width = frames[0].shape[:2]
    check_even(width, height)
    with tempfile.TemporaryDirectory(prefix="fewstep-mp4-") as folder:  # +faststart rewrites the file at its end
        path = Path(folder) / "clip.mp4"
        with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream(CODEC, rate=Fraction(fps).limit_denominator(1001))
            assert isinstance(stream, av.VideoStream)  # what a video codec's stream is (PyAV types the union)
            stream.width, stream.height, stream.pix_fmt = width, height, PIXEL_FORMAT
            stream.options = {"crf": str(crf), "preset": "medium"}
            for pixels in frames:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels, dtype=np.uint8), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        data = path.read_bytes()
    if len(data) > max_bytes:
        raise InvalidRequest(
            "seconds", f"the clip's MP4 is {len(data)} bytes, over the limit of {max_bytes} bytes (`video_max_bytes`)"
        )
    return data


def decode_mp4(data: bytes) -> list[np.ndarray]:
    """An MP4's frames as (H, W, 3) uint8 RGB, in order."""
    with av.open(io.BytesIO(data), mode="r") as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
