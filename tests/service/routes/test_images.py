"""OpenAI's streamed images through the official `openai` SDK, on a user's pipeline served in process: partial images
arrive as Server-Sent Events before the completed one, whose pixels are the unstreamed request's."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx2
import numpy as np
import openai
import pytest
from PIL import Image

from fewstep.models.importing import import_pipeline
from fewstep.models.registry import Registry
from fewstep.service.routes.images import stream_images
from tests.service.gateway import in_process, settings
from tests.service.test_uploads import picture

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def decoded(b64: str | None) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64 or ""))))


@pytest.mark.slow  # a gateway with an imported pipeline
async def test_streamed_generations_and_edits_send_partials_then_the_unstreamed_image(
    tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    assert stream_images.__doc__ and "partial_image" in stream_images.__doc__
    registry = Registry(tmp_path / "registry")
    import_pipeline(tiny_pipelines["sd"], "tiny", registry, family="turbo")
    config = settings(tmp_path, checkpoints=tmp_path / "none", engine="registry", image_min_side=16, image_max_side=128)
    async with in_process(config) as c:
        transport = httpx2.ASGITransport(app=c._transport.app)  # type: ignore[attr-defined]
        async with httpx2.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            client = openai.AsyncOpenAI(base_url="http://127.0.0.1/v1", api_key="unused", http_client=http)
            ask = {"model": "tiny", "prompt": "a red circle", "extra_body": {"steps": 4, "seed": 5}}
            stream = await client.images.generate(**ask, stream=True, partial_images=2)  # type: ignore[arg-type]
            events = [e async for e in stream]
            assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
            assert [getattr(e, "partial_image_index", None) for e in events] == [0, 1, None]
            whole = await client.images.generate(**ask)  # type: ignore[arg-type]
            assert whole.data is not None
            final = decoded(events[-1].b64_json)
            assert np.array_equal(final, decoded(whole.data[0].b64_json))  # the same pixels as unstreamed
            partials = [decoded(e.b64_json) for e in events[:2]]
            assert all(p.shape == final.shape for p in partials)
            assert not np.array_equal(partials[0], final) and not np.array_equal(partials[0], partials[1])

            edit = await client.images.edit(
                model="tiny", image=picture(), prompt="x", stream=True, partial_images=3,
                extra_body={"steps": 4, "strength": 0.75, "seed": 2},
            )  # fmt: skip
            kinds = [e.type async for e in edit]
            assert kinds == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]  # 3 steps run: 2 partials

            many = await client.images.generate(**ask, n=2, stream=True, partial_images=1)  # type: ignore[arg-type]
            got = [(e.type, e.model_extra.get("index")) async for e in many if e.model_extra]
            kinds_by_image = sorted(got)
            assert kinds_by_image == [
                (f"image_generation.{k}", i) for k in ("completed", "partial_image") for i in (0, 1)
            ]

            with pytest.raises(openai.BadRequestError, match=r"`partial_images` must be between 0 and 3. Given: 4"):
                await client.images.generate(**ask, stream=True, partial_images=4)  # type: ignore[arg-type]
