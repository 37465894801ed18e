"""An AnyFlow FAR student on a real `fewstep serve` (uvicorn), over the video WebSocket: a tiny `AnyFlowFARPipeline`
imported by `fewstep import` (chunks 1, 2, 1, 2; 32 × 32 frames; streams of at most 21 pixel frames) is seeded into
the registry, loaded, warmed and gated like any version, listed by `/v1/models` with the step counts it serves, and
streamed to a real WebSocket client: frames in order, the count asked for, the same frames the engine makes in
this process at another step count than the default, a prompt change, and requests past the model's bounds."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from fewstep.engines.base import StreamRequest, stream_alone
from fewstep.engines.far_stream import FARStreamEngine
from fewstep.models.importing import import_far
from fewstep.models.registry import Registry
from tests.conftest import Server, start_server, stop_server

pytestmark = pytest.mark.slow  # a `fewstep serve` process with an AnyFlow FAR student

MODEL = "tiny-far"
RED, BOAT = "a red fox in the snow", "a boat on a lake at night"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's folder, its registry holding the tiny student as `fewstep import` writes it."""
    from tests.anyflow import anyflow_far

    home = tmp_path_factory.mktemp("serve")
    src = anyflow_far(tmp_path_factory.mktemp("anyflow") / "far", chunk_partition=(1, 2, 1, 2), full_chunk_limit=2)
    import_far(src, MODEL, Registry(home / "registry"), size=(32, 32), max_tokens=16)
    return home


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[Server]:
    env = {
        "FEWSTEP_VIDEO_MAX_SESSIONS": "2",
        "FEWSTEP_VIDEO_BUFFER_FRAMES": "4",
        "FEWSTEP_VIDEO_GATE_STREAMS": "1",
        "FEWSTEP_VIDEO_GATE_FRAMES": "9",
    }
    none = home / "no-checkpoints"  # no toy models seeded beside it: the server loads the student alone
    none.mkdir()
    s = start_server(home, env, checkpoints=none)
    yield s
    stop_server(s)


def _ws(server: Server) -> ClientConnection:
    return connect(server.url.replace("http", "ws") + "/v1/video/stream", open_timeout=10, max_queue=None)


def _start(ws: ClientConnection, **fields: Any) -> None:
    ws.send(json.dumps({"model": MODEL, "prompt": RED, "frames": 21, "seed": 1, **fields}))


def _frames_then_done(ws: ClientConnection) -> tuple[list[np.ndarray], dict[str, Any]]:
    frames = []
    while True:
        msg = json.loads(ws.recv(timeout=60))
        if msg["type"] == "done":
            return frames, msg
        assert msg["type"] == "frame" and msg["index"] == len(frames), msg
        frames.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(msg["image"]))).convert("RGB")))


def test_the_model_is_listed_with_the_steps_it_serves(server: Server) -> None:
    card = next(m for m in httpx.get(server.url + "/v1/models").json()["data"] if m["id"] == MODEL)
    assert card["kind"] == "video" and card["size"] == "32x32" and card["hybrid"] is False
    assert card["steps"] == list(range(1, 9)) and card["default_steps"] == 4
    assert card["versions"] == [{"version": "1", "status": "serving", "reason": None}]


def test_a_client_gets_the_engines_frames_in_order_then_done(server: Server, home: Path) -> None:
    with _ws(server) as ws:
        _start(ws, frames=21, seed=3, steps=2)
        frames, done = _frames_then_done(ws)
    assert len(frames) == 21 and all(f.shape == (32, 32, 3) for f in frames)
    assert done["frames"] == 21 and done["steps"] == 2 and done["seed"] == 3
    registry = Registry(home / "registry")
    engine = FARStreamEngine(registry.version_dir(MODEL, "1"), capacity=1)  # the same stream made in this process
    engine.load()
    made = [f.pixels for f in stream_alone(engine, StreamRequest(RED, 21, 2, 3))]
    assert np.abs(np.stack(frames).astype(int) - np.stack(made).astype(int)).max() <= 1
    assert len({f.tobytes() for f in frames}) > 10


def test_a_prompt_change_is_taken(server: Server) -> None:
    with _ws(server) as ws:
        _start(ws, frames=21, seed=8, steps=8)
        ws.send(json.dumps({"type": "prompt", "prompt": BOAT}))
        frames, done = _frames_then_done(ws)
    assert len(frames) == 21 and done["prompt"] == BOAT


def test_bad_requests_name_the_models_limits(server: Server) -> None:
    for fields, names in (
        ({"frames": 22}, "`frames` must be between 1 and 21"),
        ({"steps": 9}, "`steps` must be between 1 and 8. Given: 9"),
    ):
        with _ws(server) as ws:
            _start(ws, **fields)
            msg = json.loads(ws.recv(timeout=30))
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert names in msg["message"], msg
    assert "Traceback" not in server.output()
