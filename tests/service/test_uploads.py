"""Edits (`POST /v1/images/edits`) through the gateway in process, with the official `openai` SDK, and the bounds an
upload meets before it is decoded: size on the wire, format by its first bytes, pixels by its header (a
decompression bomb is refused without being inflated), orientation and transparency handled."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import httpx2
import numpy as np
import openai
import pytest
from PIL import Image

from fewstep.engines.base import ImageItem, ImageResult
from fewstep.engines.latent import LatentEngine
from fewstep.engines.pixels import encode_png
from fewstep.errors import InvalidRequest
from fewstep.models.importing import import_pipeline
from fewstep.models.registry import Registry
from fewstep.service.uploads import edit_start, snap
from tests.service.gateway import in_process, settings

EDITS = "/v1/images/edits"


def png(width: int, height: int, colour: tuple[int, ...] = (200, 40, 40), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def picture(width: int = 64, height: int = 64) -> bytes:
    """A PNG a VAE keeps something of: a gradient with a square."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 120)], axis=-1).astype(np.uint8)
    img[height // 4 : height // 2, width // 4 : width // 2] = (230, 30, 30)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def bomb(side: int = 40_000) -> bytes:
    """A real decompression bomb: a 1-bit PNG of side × side pixels (200 MB of rows at 40 000) in ~200 kB."""
    row = b"\x00" + bytes((side + 7) // 8)
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row * 1000) for _ in range(side // 1000)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def decoded(b64: str | None) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64 or ""))))


def native(w: int, h: int) -> tuple[int, int]:
    return 32, 32


def test_uploads_are_bounded_by_format_and_declared_pixels_before_they_are_decoded() -> None:
    data = bomb()
    assert len(data) < 400_000
    with pytest.raises(
        InvalidRequest, match=r"`image` must be an image of at most 4194304 pixels.*Given: '1600000000 pixels'"
    ):
        edit_start(data, "image", 2048 * 2048, native)  # PIL's own bound caught it: still our message
    with pytest.raises(InvalidRequest, match=r"at most 4194304 pixels \(`upload_max_pixels`\). Given: '4000x4000'"):
        edit_start(bomb(4000), "image", 2048 * 2048, native)  # under PIL's bound: ours
    cases = [
        (b"GIF89a" + bytes(40), "`image` must be a PNG, JPEG or WebP image"),
        (b"not an image at all", "must be a PNG, JPEG or WebP image"),
        (picture()[:200], "`image` does not decode"),
        (png(64, 64)[:8] + b"\x00" * 40, "is not a readable PNG image"),
    ]
    for data, needle in cases:
        with pytest.raises(InvalidRequest, match=needle.replace("(", r"\(")):
            edit_start(data, "image", 2048 * 2048, native)


def test_an_upload_is_made_upright_opaque_and_the_edits_size() -> None:
    """EXIF orientation applied, transparency laid on white, resized to the target size."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to show
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    b64, w, h = edit_start(buf.getvalue(), "image", 10_000, lambda w, h: (w, h))
    assert (w, h) == (20, 40)  # upright: taller than wide
    px = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
    assert px[5, 10, 2] > 200 and px[35, 10, 0] > 200  # blue on top once turned
    clear = png(8, 8, (0, 0, 0, 0), "RGBA")
    b64, w, h = edit_start(clear, "image", 10_000, lambda w, h: (16, 12))
    px = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
    assert (w, h) == (16, 12) and px.shape == (12, 16, 3) and px.min() == 255  # transparent → white
    assert snap(500, 375, 64, 256, 8) == (256, 256) and snap(100, 70, 64, 256, 8) == (96, 64)
    assert snap(30, 1000, 64, 250, 8) == (64, 248)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
@pytest.mark.slow  # a gateway with an imported pipeline, the SDK's multipart
async def test_edits_through_the_openai_sdk_are_the_engines_edits(
    tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    registry = Registry(tmp_path / "registry")
    name, version = import_pipeline(tiny_pipelines["sd"], "tiny", registry, family="turbo")
    config = settings(
        tmp_path, checkpoints=tmp_path / "none", engine="registry", image_min_side=16, image_max_side=128,
        upload_max_bytes=512 * 1024,
    )  # fmt: skip
    engine = LatentEngine(registry.version_dir(name, version), sides=(16, 128))
    engine.load()
    async with in_process(config) as c:
        app = c._transport.app  # type: ignore[attr-defined]
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            client = openai.AsyncOpenAI(base_url="http://127.0.0.1/v1", api_key="unused", http_client=http)
            result = await client.images.edit(
                model="tiny",
                image=("start.png", picture(96, 80), "image/png"),
                prompt="a red square on a gradient",
                size="64x48",  # type: ignore[arg-type]
                n=2,
                extra_body={"strength": 0.5, "steps": 4, "seed": 11},
            )
            assert result.data is not None and len(result.data) == 2
            got = [decoded(d.b64_json) for d in result.data]
            assert got[0].shape == (48, 64, 3) and not np.array_equal(got[0], got[1])  # seeds 11 and 12
            start = Image.open(io.BytesIO(picture(96, 80))).resize((64, 48), Image.Resampling.LANCZOS)
            item = ImageItem(
                "a red square on a gradient",
                11,
                4,
                width=64,
                height=48,
                image=encode_png(np.asarray(start)),
                strength=0.5,
            )
            (ours,) = engine.run([item])
            assert isinstance(ours, ImageResult) and np.abs(ours.pixels.astype(int) - got[0].astype(int)).max() <= 1

            two = await client.images.edit(
                model="tiny", image=[picture(64, 64), picture(48, 32)], prompt="x", extra_body={"seed": 3}
            )
            assert two.data is not None and [decoded(d.b64_json).shape for d in two.data] == [(64, 64, 3), (32, 48, 3)]

            with pytest.raises(openai.BadRequestError, match=r"`mask` \(inpainting\) is not served"):
                await client.images.edit(model="tiny", image=picture(), mask=png(64, 64), prompt="x")
            with pytest.raises(openai.BadRequestError, match=r"at most 4194304 pixels \(`upload_max_pixels`\)"):
                await client.images.edit(model="tiny", image=("bomb.png", bomb(), "image/png"), prompt="x")
            with pytest.raises(openai.BadRequestError, match=r"`strength` × `steps` must be at least 1"):
                await client.images.edit(
                    model="tiny", image=picture(), prompt="x", extra_body={"steps": 1, "strength": 0.5}
                )

        big = await c.post(EDITS, files={"image": ("a.png", bytes(600 * 1024))}, data={"model": "tiny", "prompt": "x"})
        assert big.status_code == 413 and "`upload_max_bytes` is 524288" in big.text
        as_json = await c.post(EDITS, json={"model": "tiny", "prompt": "x"})
        assert as_json.status_code == 400 and "multipart/form-data" in as_json.text
        none = await c.post(EDITS, data={"model": "tiny", "prompt": "x"}, files={"other": ("a", b"1")})
        assert none.status_code == 400 and "one or more image files" in none.text
        bad_number = await c.post(
            EDITS, data={"model": "tiny", "prompt": "x", "strength": "lots"}, files={"image": ("a.png", picture())}
        )
        assert bad_number.status_code == 400 and "strength" in bad_number.json()["error"]["message"]
        big_json = await c.post("/v1/images/generations", content=b"{" + b" " * 70_000 + b"}")
        assert big_json.status_code == 413 and "`max_body_bytes`" in big_json.text  # other routes keep their limit
