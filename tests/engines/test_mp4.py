"""`engines/mp4.py`: frames → H.264 yuv420p MP4 and back: the frame count, size and rate kept, odd sides refused,
the size limit named."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from fewstep.engines.mp4 import decode_mp4, encode_mp4
from fewstep.errors import InvalidRequest
from fewstep.evaluation.metrics import psnr


def frames(n: int, width: int = 16, height: int = 16) -> list[np.ndarray]:
    """A smooth moving gradient: what H.264 keeps well."""
    out = []
    for i in range(n):
        img = np.zeros((height, width, 3))
        img[..., 0] = np.linspace(0, 200, width)[None, :] + 4 * i
        img[..., 1] = np.linspace(0, 200, height)[:, None]
        img[..., 2] = 128
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def test_an_mp4_decodes_back_to_its_frames_size_and_rate() -> None:
    made = frames(12, 24, 16)
    data = encode_mp4(made, 12.0, crf=18, max_bytes=1 << 20)
    back = decode_mp4(data)
    assert len(back) == 12 and back[0].shape == (16, 24, 3)
    assert min(psnr(a, b) for a, b in zip(made, back, strict=True)) > 30
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert stream.average_rate == 12
    assert data.find(b"moov") < data.find(b"mdat")  # +faststart: the index first


def test_odd_sides_and_clips_over_the_size_limit_are_refused_naming_why() -> None:
    with pytest.raises(InvalidRequest, match=r"even sides\. Given: 15x16"):
        encode_mp4(frames(2, 15, 16), 8.0, 18, 1 << 20)
    with pytest.raises(InvalidRequest, match=r"over the limit of 1024 bytes \(`video_max_bytes`\)"):
        encode_mp4(frames(64, 64, 64), 8.0, 0, 1024)
