"""A causal Wan student on a real `fewstep serve` (uvicorn), over the video WebSocket the toy student streams on: a
tiny student imported by `fewstep import` (Self-Forcing's family on the tiny WanPipeline, 32 × 32 frames,
streams of at most 12 latent frames, 45 pixel frames) is seeded into the registry, loaded, warmed and gated like
any version, listed by `/v1/models`, and streamed to a real WebSocket client (`websockets`): frames in order, PNGs of
the served size, the count asked for, the same frames as the engine makes in this process, a prompt change
mid-stream, requests past the model's bounds, and clients that leave mid-stream."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from fewstep.engines.base import StreamRequest, stream_alone
from fewstep.engines.mp4 import decode_mp4, encode_mp4
from fewstep.engines.wan_stream import WanStreamEngine
from fewstep.models.importing import import_causal_video
from fewstep.models.registry import Registry
from fewstep.service.settings import Settings
from tests.conftest import Server, start_server, stop_server

pytestmark = pytest.mark.slow  # a `fewstep serve` process with a causal Wan student

MODEL = "tiny-wan"
RED, BOAT = "a red fox in the snow", "a boat on a lake at night"
CAPACITY = 2


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's folder, its registry holding the tiny student as `fewstep import` writes it."""
    from tests import pipelines

    home = tmp_path_factory.mktemp("serve")
    src = pipelines.wan(tmp_path_factory.mktemp("wan") / "wan")
    import_causal_video(src, MODEL, Registry(home / "registry"), "self-forcing", size=(32, 32), max_frames=12,
                        max_tokens=32)  # fmt: skip
    return home


@pytest.fixture(scope="module")
def version(home: Path) -> Path:
    registry = Registry(home / "registry")
    return registry.version_dir(MODEL, registry.promoted(MODEL) or "1")


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[Server]:
    env = {
        "FEWSTEP_VIDEO_MAX_SESSIONS": str(CAPACITY),
        "FEWSTEP_VIDEO_BUFFER_FRAMES": "4",
        "FEWSTEP_VIDEO_GATE_STREAMS": "2",
        "FEWSTEP_VIDEO_GATE_FRAMES": "16",
    }
    s = start_server(home, env)
    yield s
    stop_server(s)


def _ws(server: Server) -> ClientConnection:
    # Frames are read as they come (no bound on the client's queue): on this tiny model a stream outruns its reader,
    # and a client that stops reading at a bound would wait out its close handshake.
    return connect(server.url.replace("http", "ws") + "/v1/video/stream", open_timeout=10, max_queue=None)


def _start(ws: ClientConnection, **fields: Any) -> None:
    ws.send(json.dumps({"model": MODEL, "prompt": RED, "frames": 21, "seed": 1, **fields}))


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _frames_then_done(ws: ClientConnection, start: int = 0) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The frames from index `start` on, each checked to come in order, then the `done` message."""
    frames = []
    while True:
        msg = json.loads(ws.recv(timeout=60))
        if msg["type"] == "done":
            return frames, msg
        assert msg["type"] == "frame" and msg["index"] == start + len(frames), msg
        frames.append(_png(msg["image"]))


def _closed_with(ws: ClientConnection) -> tuple[dict[str, Any], int]:
    msg = json.loads(ws.recv(timeout=30))
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=30)
    assert closed.value.rcvd is not None
    return msg, closed.value.rcvd.code


def _active(server: Server) -> float:
    text = httpx.get(server.url + "/metrics").text
    name = f'fewstep_video_sessions_active{{model="{MODEL}"}}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_the_model_is_listed_with_what_it_takes(server: Server) -> None:
    card = next(m for m in httpx.get(server.url + "/v1/models").json()["data"] if m["id"] == MODEL)
    assert card["kind"] == "video" and card["version"] == "1"
    assert card["steps"] == [4] and card["default_steps"] == 4  # Self-Forcing's list: no other count is served
    assert card["size"] == "32x32" and card["hybrid"] is False
    assert card["versions"] == [{"version": "1", "status": "serving", "reason": None}]


def test_a_client_gets_the_engines_frames_in_order_then_done(server: Server, version: Path) -> None:
    with _ws(server) as ws:
        _start(ws, frames=21, seed=3)
        frames, done = _frames_then_done(ws)
    assert len(frames) == 21 and all(f.shape == (32, 32, 3) for f in frames)
    assert done["frames"] == 21 and done["model"] == MODEL and done["steps"] == 4 and done["seed"] == 3
    engine = WanStreamEngine(version, capacity=1)  # the same stream made in this process
    engine.load()
    made = [f.pixels for f in stream_alone(engine, StreamRequest(RED, 21, 4, 3))]
    assert np.abs(np.stack(frames).astype(int) - np.stack(made).astype(int)).max() <= 1
    assert len({f.tobytes() for f in frames}) > 10  # frames, not one frame again


def test_bad_requests_name_the_models_limits(server: Server) -> None:
    for fields, names in (
        ({"frames": 46}, "`frames` must be between 1 and 45"),  # 4 blocks of 3 latent frames
        ({"steps": 2}, "`steps` must be one of [4]. Given: 2"),
    ):
        with _ws(server) as ws:
            _start(ws, **fields)
            msg, code = _closed_with(ws)
        assert code == 1008 and names in msg["message"], msg


def test_a_prompt_change_mid_stream_is_taken(server: Server) -> None:
    """Sent right after the first message: on this tiny model a whole stream takes a fraction of a second, so a
    change sent later may find it already made (which block it steers from is the engine tests' business)."""
    with _ws(server) as ws:
        _start(ws, frames=45, seed=8)
        ws.send(json.dumps({"type": "prompt", "prompt": BOAT}))
        frames, done = _frames_then_done(ws)
    assert len(frames) == 45 and done["frames"] == 45 and done["prompt"] == BOAT


def test_a_client_that_leaves_mid_stream_frees_its_slot(server: Server) -> None:
    for _ in range(CAPACITY + 1):
        with _ws(server) as ws:
            _start(ws, frames=45)
            assert json.loads(ws.recv(timeout=60))["type"] == "frame"
    deadline = time.monotonic() + 10
    while _active(server) > 0:
        assert time.monotonic() < deadline, "a session whose client left still holds its slot"
        time.sleep(0.05)
    with _ws(server) as ws:
        _start(ws, frames=5)
        frames, done = _frames_then_done(ws)
    assert len(frames) == 5 and done["frames"] == 5
    assert "Traceback" not in server.output()


@pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")  # the SDK's notice on its own methods
def test_the_videos_api_makes_a_clip_of_the_causal_student_from_its_stream(server: Server) -> None:
    """`/v1/videos` on the causal student (the official SDK): a clip of `seconds` × its 16 fps, whose MP4 holds exactly
    the frames its WebSocket stream gives for the same seed (the same frames through the same encoder decode to the
    same pixels; both run alone on the engine, so their batches are the same)."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    video = client.videos.create_and_poll(  # type: ignore[call-arg]
        model=MODEL, prompt=RED, seconds="1", size="32x32", extra_body={"seed": 6}, poll_interval_ms=100
    )
    assert (video.status, video.progress, video.error) == ("completed", 100, None)
    frames = decode_mp4(client.videos.download_content(video.id).content)
    assert len(frames) == 16 and frames[0].shape == (32, 32, 3)
    with _ws(server) as ws:
        _start(ws, frames=16, seed=6)
        streamed, _ = _frames_then_done(ws)
    crf = Settings.model_fields["video_crf"].default
    again = decode_mp4(encode_mp4(streamed, 16, crf, Settings.model_fields["video_max_bytes"].default))
    assert all(np.array_equal(a, b) for a, b in zip(frames, again, strict=True))
