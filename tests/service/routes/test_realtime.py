"""`WS /v1/images/stream` on a user's pipeline, in process: each frame comes back as the engine's edit of it,
the newest frame wins when the client sends faster than it is served (the skipped ones counted), a prompt
change applies to the next frames, a bad frame fails alone, and the limits close the socket as they say."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from starlette.websockets import WebSocketDisconnect

from fewstep.engines.base import ImageItem, ImageResult
from fewstep.engines.latent import LatentEngine
from fewstep.engines.pixels import encode_png
from fewstep.models.importing import import_pipeline
from fewstep.models.registry import Registry
from fewstep.service.app import create_app
from fewstep.service.routes.realtime import RealtimeStart
from tests.service.gateway import settings
from tests.service.test_uploads import picture

KEY = "realtime-key-0123456789"


def frame(shift: int) -> bytes:
    """A 64×64 PNG camera frame: the test picture moved `shift` pixels."""
    px = np.roll(np.asarray(Image.open(io.BytesIO(picture()))), shift, axis=1)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow  # a gateway with an imported pipeline
def test_frames_are_edited_newest_first_and_sessions_survive_a_bad_frame(
    tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    registry = Registry(tmp_path / "registry")
    name, version = import_pipeline(tiny_pipelines["sd"], "tiny", registry, family="turbo")
    engine = LatentEngine(registry.version_dir(name, version), sides=(16, 128))
    engine.load()
    config = settings(
        tmp_path, checkpoints=tmp_path / "none", engine="registry", image_min_side=16, image_max_side=128,
        api_keys=KEY, key_max_realtime_sessions=1, realtime_max_frame_bytes=200_000,
    )  # fmt: skip
    auth = {"Authorization": f"Bearer {KEY}"}
    start = {"model": "tiny", "prompt": "a red square", "strength": 0.5, "steps": 4, "seed": 3, "format": "png"}
    assert set(start) <= set(RealtimeStart.model_fields)
    with TestClient(create_app(config)) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with client.websocket_connect("/v1/images/stream", headers=auth) as ws:
            ws.send_json(start)
            ready = ws.receive_json()
            assert ready["type"] == "ready" and ready["steps"] == 4 and ready["seed"] == 3

            ws.send_bytes(frame(0))
            head, png = ws.receive_json(), ws.receive_bytes()
            assert head["type"] == "frame" and head["index"] == 0 and head["dropped"] == 0
            got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            item = ImageItem("a red square", 3, 4, width=64, height=64, image=encode_png(
                np.asarray(Image.open(io.BytesIO(frame(0))).convert("RGB"))), strength=0.5)  # fmt: skip
            (ours,) = engine.run([item])
            assert isinstance(ours, ImageResult) and np.abs(ours.pixels.astype(int) - got.astype(int)).max() <= 1

            for shift in range(1, 6):  # five frames at once: faster than they are served
                ws.send_bytes(frame(shift))
            served = []
            while not served or served[-1] != 5:
                head = ws.receive_json()
                assert head["type"] == "frame", head
                ws.receive_bytes()
                served.append(head["index"])
            assert served == sorted(served) and head["dropped"] >= 1 and len(served) + head["dropped"] == 5
            assert head["dropped"] == 5 - len(served)  # every frame was served or counted dropped, the newest served

            ws.send_json({"type": "prompt", "prompt": "a green cross", "strength": 0.75})
            ws.send_bytes(frame(0))
            head, changed = ws.receive_json(), ws.receive_bytes()
            assert head["index"] == 6 and changed != png  # the same frame, the new prompt

            ws.send_bytes(b"not an image")
            err = ws.receive_json()
            assert err["type"] == "error" and err["index"] == 7 and "PNG, JPEG or WebP" in err["message"]
            ws.send_bytes(frame(1))
            assert ws.receive_json()["index"] == 8  # the session went on
            ws.receive_bytes()

            with client.websocket_connect("/v1/images/stream", headers=auth) as second:
                second.send_json(start)
                refused = second.receive_json()
                assert refused["type"] == "error" and "key_max_realtime_sessions" in refused["message"]

            ws.send_bytes(bytes(200_001))
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 1009

        with client.websocket_connect("/v1/images/stream", headers=auth) as ws:
            ws.send_json({**start, "strength": 2})
            err = ws.receive_json()
            assert err["type"] == "error" and "`strength` must be a number in (0, 1]. Given: 2" in err["message"]
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 1008
        metrics = client.get("/metrics").text
        assert 'fewstep_realtime_frames_total{model="tiny",outcome="dropped"}' in metrics
        assert 'fewstep_realtime_frames_total{model="tiny",outcome="failed"} 1.0' in metrics
