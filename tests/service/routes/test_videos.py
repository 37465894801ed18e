"""`/v1/videos` (OpenAI's Videos API) on a real `fewstep serve` (uvicorn) with the shipped video student, driven by
the official `openai` SDK unchanged: create and poll, download and decode the MP4 (its frames against the WebSocket
stream's for the same seed), list, retrieve, delete, another key's view, cancellation freeing the slot, the MP4 size
limit, byte ranges, and bad `seconds`/`size`."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from websockets.sync.client import connect

from fewstep.engines.mp4 import decode_mp4, encode_mp4
from fewstep.evaluation.metrics import psnr
from fewstep.service.settings import Settings
from tests.conftest import Server, start_server, stop_server

pytestmark = [
    pytest.mark.slow,  # a `fewstep serve` process with the video student
    pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning"),  # the SDK's notice on its own methods
]

MODEL = "shapes-video"
PROMPT = "a red circle moving left quickly"
KEY, OTHER_KEY = "videos-key-0123456789", "other-videos-key-0123456789"
FPS = 8
MAX_BYTES = 4096
MIN_PSNR_DB = 25.0
"""Frames through H.264 in yuv420p at crf 18 against the stream's lossless PNGs (the toy's 16×16 frames have sharp
coloured edges, where 4:2:0's half-resolution colour loses most)."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, video_student: Any) -> Iterator[Server]:
    env = {
        "FEWSTEP_API_KEYS": f"{KEY},{OTHER_KEY}",
        "FEWSTEP_VIDEO_MAX_SESSIONS": "2",
        "FEWSTEP_VIDEO_MAX_CLIPS": "1",
        "FEWSTEP_VIDEO_MAX_FRAMES": "4000",
        "FEWSTEP_VIDEO_FPS": str(FPS),
        "FEWSTEP_VIDEO_MAX_BYTES": str(MAX_BYTES),
        "FEWSTEP_VIDEO_GATE_STREAMS": "0",
        "FEWSTEP_EMBEDDED_WORKERS": "1",
    }
    s = start_server(tmp_path_factory.mktemp("videos"), env)
    yield s
    stop_server(s)


def sdk(server: Server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def make(client: openai.OpenAI, seconds: str, seed: int, steps: int = 2) -> Any:
    extra = {"steps": steps, "seed": seed}
    return client.videos.create(model=MODEL, prompt=PROMPT, seconds=seconds, size="16x16", extra_body=extra)  # type: ignore[arg-type]


def wait(client: openai.OpenAI, video_id: str, until: set[str], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = client.videos.retrieve(video_id)
        if v.status in until:
            return v
        time.sleep(0.05)
    raise AssertionError(f"video {video_id} still {v.status}")


def stream_frames(server: Server, frames: int, steps: int, seed: int) -> list[np.ndarray]:
    url = server.url.replace("http", "ws") + "/v1/video/stream"
    with connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}, open_timeout=10) as ws:
        ws.send(json.dumps({"model": MODEL, "prompt": PROMPT, "frames": frames, "steps": steps, "seed": seed}))
        out = []
        while (msg := json.loads(ws.recv(timeout=30)))["type"] == "frame":
            out.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(msg["image"]))).convert("RGB")))
    assert msg["type"] == "done", msg
    return out


def test_the_sdk_makes_a_video_whose_mp4_holds_the_frames_the_stream_gives_for_its_seed(server: Server) -> None:
    client = sdk(server)
    video = client.videos.create_and_poll(  # type: ignore[call-arg]
        model=MODEL, prompt=PROMPT, seconds="1", size="16x16", extra_body={"steps": 2, "seed": 5}, poll_interval_ms=50
    )
    assert (video.status, video.progress, video.error) == ("completed", 100, None)
    assert (video.seconds, video.size, video.model, video.prompt) == ("1", "16x16", MODEL, PROMPT)
    assert video.completed_at is not None and video.expires_at is not None and video.expires_at > time.time()
    mp4 = client.videos.download_content(video.id).content
    frames = decode_mp4(mp4)
    assert len(frames) == FPS and frames[0].shape == (16, 16, 3)
    streamed = stream_frames(server, FPS, 2, 5)
    quality = [psnr(a, b) for a, b in zip(frames, streamed, strict=True)]
    assert min(quality) >= MIN_PSNR_DB, quality
    # Exactly the stream's frames: the same frames through the same (deterministic) encoder decode to the same pixels.
    crf = Settings.model_fields["video_crf"].default
    again = decode_mp4(encode_mp4(streamed, FPS, crf, MAX_BYTES * 16))
    assert all(np.array_equal(a, b) for a, b in zip(frames, again, strict=True))
    assert client.videos.retrieve(video.id).id == video.id
    assert video.id in [v.id for v in client.videos.list()]


def test_an_owner_pages_through_its_videos_and_another_key_sees_none_of_them(server: Server) -> None:
    client, other = sdk(server), sdk(server, OTHER_KEY)
    made = [wait(client, make(client, "0.25", seed).id, {"completed"}) for seed in (11, 12, 13)]
    pages = client.videos.list(limit=2, order="asc")
    listed = [v.id for v in pages.iter_pages() for v in v.data]  # the SDK follows `after` = last_id
    assert [v.id for v in made] == [i for i in listed if i in {v.id for v in made}]
    assert other.videos.list().data == []
    for call in (other.videos.retrieve, other.videos.delete, other.videos.download_content):
        with pytest.raises(openai.NotFoundError):
            call(made[0].id)
    deleted = client.videos.delete(made[0].id)
    assert (deleted.id, deleted.deleted, deleted.object) == (made[0].id, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(made[0].id)


def test_a_video_deleted_while_running_ends_failed_and_frees_its_slot_for_the_next(server: Server) -> None:
    client = sdk(server)
    long = make(client, "100", seed=21, steps=4)  # 800 frames: still running when deleted
    short = make(client, "0.5", seed=22)  # one clip at a time here (`video_max_clips`): it waits for the slot
    running = wait(client, long.id, {"in_progress"})
    assert client.videos.retrieve(short.id).status == "queued"
    headers = {"Authorization": f"Bearer {KEY}"}
    unfinished = httpx.get(f"{server.url}/v1/videos/{long.id}", headers=headers)
    assert unfinished.headers["openai-poll-after-ms"] == "250"  # what the SDK's poll follows (`video_poll_after_ms`)
    time.sleep(0.5)
    assert client.videos.retrieve(long.id).progress >= 0
    assert client.videos.delete(long.id).deleted
    failed = wait(client, long.id, {"failed", "completed"})
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "cancelled", failed
    assert running.status == "in_progress"
    assert wait(client, short.id, {"completed", "failed"}, timeout=30).status == "completed"
    assert "openai-poll-after-ms" not in httpx.get(f"{server.url}/v1/videos/{short.id}", headers=headers).headers
    with pytest.raises(openai.ConflictError):
        client.videos.download_content(long.id)


def test_a_clip_whose_mp4_passes_video_max_bytes_fails_naming_the_limit(server: Server) -> None:
    client = sdk(server)
    video = wait(client, make(client, "12", seed=31).id, {"completed", "failed"})  # 96 frames: over 4 KB
    assert video.status == "failed" and video.error is not None
    assert "video_max_bytes" in video.error.message and str(MAX_BYTES) in video.error.message, video.error


def test_the_content_honours_byte_ranges(server: Server) -> None:
    client = sdk(server)
    video = wait(client, make(client, "0.5", seed=41).id, {"completed"})
    url, auth = f"{server.url}/v1/videos/{video.id}/content", {"Authorization": f"Bearer {KEY}"}
    whole = httpx.get(url, headers=auth)
    assert whole.status_code == 200 and whole.headers["content-type"] == "video/mp4"
    assert whole.headers["accept-ranges"] == "bytes"
    size = len(whole.content)
    for asked, first, last in (("bytes=0-9", 0, 9), ("bytes=-5", size - 5, size - 1), ("bytes=4-", 4, size - 1)):
        part = httpx.get(url, headers={**auth, "Range": asked})
        assert part.status_code == 206 and part.headers["content-range"] == f"bytes {first}-{last}/{size}"
        assert part.content == whole.content[first : last + 1]
    for bad in (f"bytes={size}-", "bytes=9-3", "pages=1-2", "bytes=0-1,4-5"):
        refused = httpx.get(url, headers={**auth, "Range": bad})
        assert refused.status_code == 416 and refused.headers["content-range"] == f"bytes */{size}", bad
        assert refused.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"seconds": "0"}, "video_max_frames"),
        ({"seconds": "9999"}, "video_max_frames"),
        ({"seconds": "soon"}, "seconds"),
        ({"size": "720x1280"}, "16x16"),
        ({"extra_body": {"steps": 9}}, "steps"),
        ({"extra_body": {"guidance_scale": 2}}, "guidance_scale"),
    ],
)
def test_a_video_the_model_cannot_make_is_refused_naming_the_limit(
    server: Server, fields: dict[str, Any], named: str
) -> None:
    request: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "seconds": "1", **fields}
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(server).videos.create(**request)
    assert named in refused.value.message


def test_the_model_list_says_what_videos_a_video_model_makes(server: Server) -> None:
    with sdk(server) as client:
        card = next(m for m in client.models.list().model_dump()["data"] if m["id"] == MODEL)
        assert (card["fps"], card["max_frames"], card["frame_step"], card["videos"]) == (FPS, 4000, 1, True)
        longest = card["max_frames"] / card["fps"]  # the bound the playground's form holds: the server's own
        with pytest.raises(openai.BadRequestError) as refused:
            client.videos.create(model=MODEL, prompt=PROMPT, seconds=f"{longest + 1:g}")  # type: ignore[arg-type]
    assert f"between {1 / FPS:g} and {longest:g}" in refused.value.message
