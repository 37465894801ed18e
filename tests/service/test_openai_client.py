"""The README's example, run: a diffusers pipeline folder imported into a running server's registry, then images
from it through the official `openai` client (sizes, step counts, seeds, errors)."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from fewstep.cli import main
from tests.conftest import Server

pytestmark = pytest.mark.slow  # a `fewstep serve` process


def test_an_imported_pipeline_serves_the_official_openai_client(
    server: Server, tiny_pipelines: dict[str, Path]
) -> None:
    folder = str(tiny_pipelines["sdxl-lcm"])  # a user's saved LCM student (`pipe.save_pretrained(folder)`)
    assert main(["import", folder, "--name", "my-lcm", "--family", "lcm", "--registry", str(server.registry)]) == 0
    deadline = time.monotonic() + 120
    while not any(m["id"] == "my-lcm" for m in httpx.get(server.url + "/v1/models").json()["data"]):
        assert time.monotonic() < deadline, server.output()[-3000:]
        time.sleep(0.2)

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused-without-auth")
    result = client.images.generate(
        model="my-lcm",
        prompt="a lighthouse at dusk",
        size="128x64",  # type: ignore[arg-type]
        n=2,
        extra_body={"steps": 2, "seed": 7, "guidance_scale": 6.0},
    )
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json or ""))) for d in result.data]
    assert [im.size for im in images] == [(128, 64), (128, 64)]
    assert images[0].tobytes() != images[1].tobytes()  # seeds 7 and 8

    again = client.images.generate(model="my-lcm", prompt="a lighthouse at dusk", size="128x64", n=1,  # type: ignore[arg-type]
                                   extra_body={"steps": 2, "seed": 7, "guidance_scale": 6.0})  # fmt: skip
    alone = np.asarray(Image.open(io.BytesIO(base64.b64decode(again.data[0].b64_json or ""))), dtype=int)
    assert np.abs(alone - np.asarray(images[0], dtype=int)).max() <= 1  # the determinism contract

    with pytest.raises(openai.BadRequestError, match=r"`guidance_scale` must be between 1.0 and 15.0"):
        client.images.generate(model="my-lcm", prompt="x", extra_body={"guidance_scale": 40})
    with pytest.raises(openai.BadRequestError, match=r"`size` must be WxH"):
        client.images.generate(model="my-lcm", prompt="x", size="98x64")  # type: ignore[arg-type]
