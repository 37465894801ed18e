"""`WS /v1/video/stream` on a real `fewstep serve` (uvicorn) with the shipped video student, driven by a
real WebSocket client (`websockets`): exact frame counts, bad first messages, capacity, prompt changes,
disconnects, auth and metrics."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from fewstep.models.registry import Registry
from tests.conftest import Server, start_server, stop_server

pytestmark = pytest.mark.slow  # a `fewstep serve` process with the video student

MODEL = "shapes-video"
PROMPT = "a red circle moving left quickly"
CAPACITY = 2
SECOND_KEY = "second-video-key-0123456789"


@pytest.fixture(scope="module")
def video_server(tmp_path_factory: pytest.TempPathFactory, video_student: Path) -> Iterator[Server]:
    env = {
        "FEWSTEP_VIDEO_MAX_SESSIONS": str(CAPACITY),
        "FEWSTEP_VIDEO_MAX_FRAMES": "300",
        "FEWSTEP_VIDEO_BUFFER_FRAMES": "4",
        "FEWSTEP_API_KEYS": f"video-key-0123456789,{SECOND_KEY}",
        "FEWSTEP_KEY_MAX_VIDEO_SESSIONS": str(CAPACITY),
    }
    s = start_server(tmp_path_factory.mktemp("video"), env)
    yield s
    stop_server(s)


def _ws(server: Server, key: str | None = "video-key-0123456789") -> ClientConnection:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return connect(server.url.replace("http", "ws") + "/v1/video/stream", additional_headers=headers, open_timeout=10)


def _start(ws: ClientConnection, **fields: Any) -> None:
    ws.send(json.dumps({"model": MODEL, "prompt": PROMPT, "frames": 5, "steps": 2, "seed": 1, **fields}))


def _frames_then_done(ws: ClientConnection, start: int = 0) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The frames from index `start` on, in order, then the `done` message."""
    frames = []
    while True:
        msg = json.loads(ws.recv(timeout=30))
        if msg["type"] == "done":
            return frames, msg
        assert msg["type"] == "frame" and msg["index"] == start + len(frames), msg
        frames.append(_png(msg["image"]))


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _closed_with(ws: ClientConnection) -> tuple[dict[str, Any], int]:
    """The error message the server sent and the close code that followed it."""
    msg = json.loads(ws.recv(timeout=10))
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    assert closed.value.rcvd is not None
    return msg, closed.value.rcvd.code


def _metric(server: Server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_a_client_receives_exactly_n_frames_then_done(video_server: Server) -> None:
    with _ws(video_server) as ws:
        _start(ws, frames=12, steps=2, seed=3)
        frames, done = _frames_then_done(ws)
    assert len(frames) == 12 and frames[0].shape == (16, 16, 3)
    assert done["frames"] == 12 and done["model"] == MODEL and done["seed"] == 3 and done["steps"] == 2
    assert len({f.tobytes() for f in frames}) > 6  # it moves
    with _ws(video_server) as ws:  # seeded: the same stream again
        _start(ws, frames=12, steps=2, seed=3)
        again, _ = _frames_then_done(ws)
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 1 for a, b in zip(frames, again, strict=True))


@pytest.mark.parametrize(
    ("first", "names"),
    [
        ('{"model": "shapes-video", "frames": 4}', "`prompt`"),
        ('{"model": "shapes-video", "prompt": "a red circle", "frames": 301}', "`frames` must be between 1 and 300"),
        ('{"model": "shapes-video", "prompt": "a red circle", "frames": 4, "steps": 5}', "`steps` must be between"),
        ('{"model": "shapes-video", "prompt": "a red circle", "frames": 4, "steps": 0}', "Given: 0"),
        ("this is not json", "JSON object"),
        ('{"model": "no-such-model", "prompt": "a red circle", "frames": 4}', "not found"),
        ('{"model": "shapes-video", "prompt": "a red circle", "frames": "many"}', "`frames` must be an integer"),
        ('{"model": "shapes-video", "prompt": "a red circle", "frames": 4, "hybrid": "yes"}', "`hybrid` must be true"),
        ('{"model": "shapes-video", "prompt": "a red circle", "frames": 4, "hybrid": true, "steps": 1}', "at least 2"),
        ('{"model": "shapes-video", "prompt": "a red circle", "frames": 4, "fps": 30}', "unknown field 'fps'"),
        ("[" * 50_000, "must be a small JSON object (RecursionError)"),
        ('{"model": "shapes-video", "frames": 1' + "0" * 5000 + "}", "must be a small JSON object (ValueError)"),
    ],
)
def test_bad_first_messages_get_an_error_then_1008(video_server: Server, first: str, names: str) -> None:
    with _ws(video_server) as ws:
        ws.send(first)
        msg, code = _closed_with(ws)
    assert msg["type"] == "error" and names in msg["message"], msg
    assert code == 1008
    assert httpx.get(video_server.url + "/readyz").status_code == 200  # still healthy
    assert "Traceback" not in video_server.output()  # one log line, no stack


def test_a_binary_first_message_gets_1008(video_server: Server) -> None:
    with _ws(video_server) as ws:
        ws.send(b"\x00\x01")
        msg, code = _closed_with(ws)
    assert code == 1008 and "JSON text" in msg["message"]


def test_a_message_over_ws_max_bytes_closes_1009_before_it_is_parsed(video_server: Server) -> None:
    with _ws(video_server) as ws:
        assert "permessage-deflate" not in (ws.response.headers.get("Sec-WebSocket-Extensions") or "")
        ws.send(json.dumps([{}] * 40_000))  # ~160 KiB of `[{}, {}, …]`: over the 64 KiB default
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def test_auth_by_header_or_first_message(video_server: Server) -> None:
    with _ws(video_server, key=None) as ws:
        _start(ws, frames=10**9)  # out of limits too: the key is checked first
        msg, code = _closed_with(ws)
    assert code == 1008 and "API key" in msg["message"]
    with _ws(video_server, key=None) as ws:
        _start(ws, frames=2, api_key="video-key-0123456789")
        frames, _ = _frames_then_done(ws)
    assert len(frames) == 2
    log = video_server.output()
    assert "video-key-0123456789" not in log  # the secret never reaches the log


def test_a_wrong_header_key_or_a_foreign_origin_is_refused_before_the_socket_is_accepted(video_server: Server) -> None:
    url = video_server.url.replace("http", "ws") + "/v1/video/stream"
    for headers, origin in (
        ({"Authorization": "Bearer wrong-key-0123456789"}, None),
        ({"Authorization": "Bearer video-key-0123456789"}, "http://elsewhere.example"),
    ):
        with pytest.raises(InvalidStatus) as refused:
            connect(url, additional_headers=headers, origin=origin, open_timeout=10)  # type: ignore[arg-type]
        assert refused.value.response.status_code == 403
    same = video_server.url  # the gateway's own page (the playground) may open streams
    with connect(url, additional_headers={"Authorization": "Bearer video-key-0123456789"}, origin=same) as ws:  # type: ignore[arg-type]
        _start(ws, frames=1)
        frames, _ = _frames_then_done(ws)
    assert len(frames) == 1


def test_an_unauthenticated_first_message_is_read_only_up_to_a_small_cap(video_server: Server) -> None:
    with _ws(video_server, key=None) as ws:
        ws.send(json.dumps({"model": MODEL, "prompt": "x" * 5000, "frames": 1, "api_key": "video-key-0123456789"}))
        msg, code = _closed_with(ws)
    assert code == 1008 and "`ws_first_message_bytes` = 4096" in msg["message"]


def test_prompt_changes_past_their_rate_close_the_session_1013(video_server: Server) -> None:
    with _ws(video_server, key=SECOND_KEY) as ws:
        _start(ws, frames=300)
        json.loads(ws.recv(timeout=30))
        for i in range(30):
            ws.send(json.dumps({"type": "prompt", "prompt": f"a blue square moving down {i}"}))
        while (msg := json.loads(ws.recv(timeout=30)))["type"] == "frame":
            pass
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert msg["type"] == "error" and "`video_prompt_changes_per_s`, `video_prompt_change_burst`" in msg["message"]
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013


def test_over_capacity_gets_an_error_then_1013_and_a_freed_row_is_reused(video_server: Server) -> None:
    rejected = _metric(video_server, "fewstep_video_sessions_rejected_total")
    with ExitStack() as stack:
        _hold_every_row_then_knock(video_server, stack, rejected)


def _hold_every_row_then_knock(video_server: Server, stack: ExitStack, rejected: float) -> None:
    holders = [stack.enter_context(_ws(video_server)) for _ in range(CAPACITY)]
    for ws in holders:
        _start(ws, frames=300)
        json.loads(ws.recv(timeout=30))  # admitted and streaming (it pauses once 4 frames are unread)
    with _ws(video_server) as ws:  # the same key: its own cap comes first
        _start(ws)
        msg, code = _closed_with(ws)
    assert code == 1013 and "already holds 2 video sessions, the limit (`key_max_video_sessions`)" in msg["message"]
    with _ws(video_server, key=SECOND_KEY) as ws:  # another key: the gateway's rows are all taken
        _start(ws)
        msg, code = _closed_with(ws)
    assert code == 1013 and "video_max_sessions" in msg["message"]
    assert _metric(video_server, "fewstep_video_sessions_rejected_total") == rejected + 2
    holders[0].close()  # a client that leaves frees its row at once
    deadline = time.monotonic() + 10
    while _metric(video_server, 'fewstep_video_sessions_active{model="shapes-video"}') > CAPACITY - 1:
        assert time.monotonic() < deadline, "the closed session still holds its row"
        time.sleep(0.05)
    with _ws(video_server) as ws:
        _start(ws, frames=3)
        frames, _ = _frames_then_done(ws)
    assert len(frames) == 3
    holders[1].close()


def test_a_prompt_change_mid_stream_steers_the_following_frames(video_server: Server) -> None:
    with _ws(video_server) as ws:
        _start(ws, frames=16, seed=8, prompt="a red circle moving left quickly")
        plain, _ = _frames_then_done(ws)
    with _ws(video_server) as ws:
        _start(ws, frames=16, seed=8, prompt="a red circle moving left quickly")
        first = [json.loads(ws.recv(timeout=30)) for _ in range(2)]
        ws.send(json.dumps({"type": "prompt", "prompt": "a blue square moving down slowly"}))
        rest, done = _frames_then_done(ws, start=2)
    assert [m["index"] for m in first] == [0, 1]
    assert len(rest) == 14 and done["frames"] == 16 and done["prompt"] == "a blue square moving down slowly"
    steered = np.stack([_png(m["image"]) for m in first] + rest).astype(int)
    # Up to the frame in progress when the message arrived, the stream is the plain one; the last
    # frames follow the new prompt (the same seed, so only the prompt can make them differ).
    assert np.abs(steered[:2] - np.stack(plain[:2]).astype(int)).max() <= 1
    assert np.abs(steered[-4:] - np.stack(plain[-4:]).astype(int)).max() > 8


def test_a_bad_message_mid_stream_closes_1008(video_server: Server) -> None:
    with _ws(video_server) as ws:
        _start(ws, frames=200)
        json.loads(ws.recv(timeout=30))
        ws.send(json.dumps({"type": "pause"}))
        while True:
            msg = json.loads(ws.recv(timeout=30))
            if msg["type"] != "frame":
                break
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert msg["type"] == "error" and "'type': 'prompt'" in msg["message"]
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


def test_a_hybrid_stream_starts_from_the_image_hybrids_first_frame(video_server: Server) -> None:
    with _ws(video_server) as ws:
        _start(ws, frames=4, seed=21)
        plain, _ = _frames_then_done(ws)
    with _ws(video_server) as ws:
        _start(ws, frames=4, seed=21, hybrid=True)
        hybrid, done = _frames_then_done(ws)
    assert done["hybrid"] is True and len(hybrid) == 4
    assert not np.array_equal(plain[0], hybrid[0])


def test_models_and_metrics_report_video(video_server: Server) -> None:
    with _ws(video_server) as ws:
        _start(ws, frames=6)
        _frames_then_done(ws)
    models = httpx.get(video_server.url + "/v1/models", headers={"Authorization": "Bearer video-key-0123456789"}).json()
    card = next(m for m in models["data"] if m["id"] == MODEL)
    assert card["kind"] == "video" and card["steps"] == [1, 2, 3, 4] and card["size"] == "16x16"
    assert card["hybrid"] is True  # its first-frame image model's teacher is in the registry
    text = httpx.get(video_server.url + "/metrics").text
    for name in (
        "fewstep_video_time_to_first_frame_seconds_count",
        "fewstep_video_frame_seconds_count",
        "fewstep_video_late_frames_total",
        "fewstep_video_sessions_active",
        "fewstep_video_frames_total",
    ):
        assert name in text, name
    assert _metric(video_server, "fewstep_video_frames_total") >= 6


def test_a_pushed_video_version_takes_new_streams_while_an_open_one_finishes_on_its_own(
    video_server: Server, video_student: Path
) -> None:
    """Last in the module: it changes the version served."""
    auth = {"Authorization": "Bearer video-key-0123456789"}
    before = next(
        m for m in httpx.get(video_server.url + "/v1/models", headers=auth).json()["data"] if m["id"] == MODEL
    )
    with _ws(video_server) as held:
        _start(held, frames=12)
        first = json.loads(held.recv(timeout=30))
        assert first["type"] == "frame" and first["index"] == 0
        _, pushed = Registry(video_server.registry).publish(video_student, model=MODEL, promote=True)
        assert pushed != before["version"]
        deadline = time.monotonic() + 60
        while True:  # the watch loads the new version beside the old, then new streams open on it
            with _ws(video_server) as probe:
                _start(probe, frames=1)
                frames, done = _frames_then_done(probe)
            assert len(frames) == 1
            if done["model_version"] == pushed:
                break
            assert time.monotonic() < deadline, "the pushed version never served"
            time.sleep(0.5)
        rest, done = _frames_then_done(held, start=1)
    assert len(rest) == 11 and done["model_version"] == before["version"]  # finished where it started
    card = next(m for m in httpx.get(video_server.url + "/v1/models", headers=auth).json()["data"] if m["id"] == MODEL)
    assert card["version"] == pushed
    assert {v["version"]: v["status"] for v in card["versions"]}[pushed] == "serving"
    assert httpx.get(video_server.url + "/readyz").status_code == 200
