"""The gateway as clients see it: a real `fewstep serve` process on the shipped models, real HTTP clients.

The HTTP contract in detail (validation messages, error shapes, jobs) is tested in process on the no-op
engine (`test_gateway.py`); here the real students serve, and the process's own behaviour is checked.
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from fewstep.models.sampling import Handoff
from tests.conftest import IMAGE_ONLY, RedisServer, Server, start_server, start_worker, stop_server, stop_worker

pytestmark = pytest.mark.slow

GEN = "/v1/images/generations"


def _image(b64: str) -> np.ndarray:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    return np.asarray(img.convert("RGB"))


def test_health_and_readiness(server: Server) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").status_code == 200


def test_models_list_has_the_openai_shape_plus_fewstep_fields(server: Server) -> None:
    body = httpx.get(server.url + "/v1/models").json()
    assert body["object"] == "list"
    (card,) = [m for m in body["data"] if m["id"] == "shapes"]
    assert card["object"] == "model" and card["owned_by"] == "fewstep" and card["kind"] == "image"
    assert card["steps"] == [1, 2, 3, 4] and card["size"] == "32x32"
    assert card["version"] == "1" and card["versions"] == [{"version": "1", "status": "serving", "reason": None}]
    assert card["backend"] == "torch" and card["precision"] == "fp32"
    assert card["hybrid"] is True
    assert isinstance(card["created"], int)


def test_generation_returns_pngs_and_echoes_seeds(server: Server) -> None:
    r = httpx.post(
        server.url + GEN, json={"model": "shapes", "prompt": "a red circle", "n": 3, "steps": 2, "seed": 10}, timeout=60
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "shapes" and body["model_version"] == "1"
    assert body["steps"] == 2 and body["nfe"] == 2 and body["hybrid"] is False
    assert [d["seed"] for d in body["data"]] == [10, 11, 12]
    images = [_image(d["b64_json"]) for d in body["data"]]
    assert all(i.shape == (32, 32, 3) for i in images)
    assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 1


def test_same_seed_gives_the_same_image_across_requests(server: Server) -> None:
    req = {"model": "shapes", "prompt": "a purple square", "seed": 77, "steps": 4}
    a = httpx.post(server.url + GEN, json=req, timeout=60).json()["data"][0]
    b = httpx.post(server.url + GEN, json={**req, "n": 2}, timeout=60).json()["data"][0]
    assert np.abs(_image(a["b64_json"]).astype(int) - _image(b["b64_json"]).astype(int)).max() <= 1


def test_hybrid_requests_report_the_teachers_extra_nfe(server: Server, checkpoints: Path) -> None:
    req = {"model": "shapes", "prompt": "a yellow square", "seed": 5, "steps": 2}
    plain = httpx.post(server.url + GEN, json=req, timeout=60).json()
    hybrid = httpx.post(server.url + GEN, json={**req, "hybrid": True}, timeout=60).json()
    assert plain["nfe"] == 2 and plain["hybrid"] is False
    # The teacher's steps are the pair's hand-off (the student's manifest), 2 evaluations each with CFG.
    handoff = Handoff.from_manifest(json.loads((checkpoints / "shapes" / "manifest.json").read_text()))
    assert hybrid["nfe"] == 2 * handoff.teacher_steps + 1 and hybrid["hybrid"] is True
    a, b = (_image(r["data"][0]["b64_json"]).astype(int) for r in (plain, hybrid))
    assert np.abs(a - b).mean() > 1
    r = httpx.post(server.url + GEN, json={**req, "steps": 1, "hybrid": True}, timeout=60)
    assert r.status_code == 400 and "when `hybrid` is true. Given: 1" in r.json()["error"]["message"]


def test_random_seed_is_echoed_and_defaults_apply(server: Server) -> None:
    body = httpx.post(server.url + GEN, json={"model": "shapes", "prompt": "a blue cross"}, timeout=60).json()
    assert isinstance(body["data"][0]["seed"], int)
    assert body["steps"] == 4 and len(body["data"]) == 1


def test_metrics_count_requests_latency_and_batches(server: Server) -> None:
    httpx.post(server.url + GEN, json={"model": "shapes", "prompt": "a red circle", "steps": 3}, timeout=60)
    text = httpx.get(server.url + "/metrics").text
    assert 'fewstep_image_request_seconds_bucket{le="0.5",model="shapes",steps="3"}' in text
    assert 'fewstep_requests_total{route="/v1/images/generations",status="200"}' in text
    assert "fewstep_batch_size_count" in text
    assert 'fewstep_models_ready{kind="image"} 1.0' in text and 'fewstep_models_ready{kind="video"} 1.0' in text


def test_openai_client_library_talks_to_the_server(server: Server) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert "shapes" in [m.id for m in client.models.list()]
    result = client.images.generate(
        model="shapes",
        prompt="a green triangle",
        n=2,
        size="32x32",
        response_format="b64_json",
        extra_body={"steps": 1, "seed": 3},
    )
    assert len(result.data) == 2
    assert _image(result.data[0].b64_json).shape == (32, 32, 3)
    with pytest.raises(openai.BadRequestError, match="steps"):
        client.images.generate(model="shapes", prompt="a green triangle", extra_body={"steps": 9})


def test_api_keys_guard_every_v1_route(tmp_path: Path, checkpoints: Path) -> None:
    s = start_server(tmp_path, {"FEWSTEP_API_KEYS": "key-one-0123456789, key-two-0123456789"})
    try:
        assert httpx.get(s.url + "/healthz").status_code == 200
        r = httpx.get(s.url + "/v1/models")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert (
            httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer key-two-0123456789"}).status_code == 200
        )
        r = httpx.post(
            s.url + GEN,
            json={"model": "shapes", "prompt": "a red circle"},
            headers={"Authorization": "Bearer key-one-0123456789"},
            timeout=60,
        )
        assert r.status_code == 200
        assert "key-one-0123456789" not in s.output() and "key-two-0123456789" not in s.output()
    finally:
        stop_server(s)


def test_a_refused_promoted_version_falls_back_to_the_previous_one(tmp_path: Path, checkpoints: Path) -> None:
    from fewstep.models.registry import Registry

    reg = Registry(tmp_path / "registry")
    reg.seed_from(checkpoints)
    _, v2 = reg.publish(checkpoints / "shapes", promote=True)
    (reg.version_dir("shapes", v2) / "model.safetensors").write_bytes(b"corrupted after publishing")
    s = start_server(tmp_path, IMAGE_ONLY)
    try:
        (card,) = [m for m in httpx.get(s.url + "/v1/models").json()["data"] if m["id"] == "shapes"]
        assert card["version"] == "1"
        statuses = {v["version"]: v for v in card["versions"]}
        assert statuses["2"]["status"] == "refused"
        assert statuses["2"]["reason"].startswith("shapes/2: model.safetensors has 26 bytes")
        r = httpx.post(s.url + GEN, json={"model": "shapes", "prompt": "a red circle"}, timeout=60)
        assert r.status_code == 200 and r.json()["model_version"] == "1"
    finally:
        stop_server(s)


def test_a_model_with_no_loadable_version_is_reported_and_refused_and_serving_goes_on(
    tmp_path: Path, checkpoints: Path, redis_server: RedisServer
) -> None:
    """Ready means able to serve: the queue answers and the models that have a version serve. One bad push
    takes no gateway out of rotation and sends no worker into a crash loop."""
    from fewstep.models.registry import Registry

    reg = Registry(tmp_path / "registry")
    reg.seed_from(checkpoints)
    (reg.version_dir("shapes", "1") / "model.safetensors").write_bytes(b"corrupted")
    s = start_server(tmp_path, IMAGE_ONLY)  # waits for /readyz 200
    env = {"FEWSTEP_REDIS_URL": redis_server.url, "FEWSTEP_REGISTRY": str(tmp_path / "registry"), **IMAGE_ONLY}
    worker = start_worker(tmp_path, env, "alone", engine="registry")
    try:
        assert httpx.get(s.url + "/healthz").status_code == 200
        (card,) = [m for m in httpx.get(s.url + "/v1/models").json()["data"] if m["id"] == "shapes"]
        assert card["version"] is None and card["versions"][0]["status"] == "refused"
        assert str(tmp_path) not in card["versions"][0]["reason"]  # why, without the server's paths
        r = httpx.post(s.url + GEN, json={"model": "shapes", "prompt": "a red circle"})
        assert r.status_code == 503 and "Retry-After" in r.headers
        assert "has no version that loads" in r.json()["error"]["message"]
        assert 'fewstep_models_unavailable{kind="image"} 1.0' in httpx.get(s.url + "/metrics").text
        deadline = time.monotonic() + 90  # the worker gives up on nothing: it consumes, and follows the registry
        while "consuming" not in worker.output():
            assert worker.proc.poll() is None and time.monotonic() < deadline, worker.output()[-3000:]
            time.sleep(0.2)
        assert worker.proc.poll() is None
    finally:
        stop_worker(worker)
        stop_server(s)


def test_onnxruntime_backend_serves_exported_versions_and_refuses_unexported_ones(
    tmp_path: Path,
    checkpoints: Path,
    encoder,  # type: ignore[no-untyped-def]
) -> None:
    from fewstep.exporters.onnx import export_onnx
    from fewstep.models.registry import Registry

    reg = Registry(tmp_path / "registry")
    reg.seed_from(checkpoints)
    _, v2 = reg.publish(checkpoints / "shapes", promote=True)  # version 2 is never exported
    export_onnx(reg.version_dir("shapes", "1"), encoder)
    export_onnx(reg.version_dir("shapes-teacher", "1"), encoder)
    s = start_server(tmp_path, {**IMAGE_ONLY, "FEWSTEP_BACKEND": "onnxruntime"})
    try:
        (card,) = [m for m in httpx.get(s.url + "/v1/models").json()["data"] if m["id"] == "shapes"]
        assert card["backend"] == "onnxruntime" and card["version"] == "1" and card["hybrid"] is True
        statuses = {v["version"]: v for v in card["versions"]}
        assert statuses[v2]["status"] == "refused" and "fewstep export" in statuses[v2]["reason"]
        r = httpx.post(
            s.url + GEN, json={"model": "shapes", "prompt": "a red circle", "steps": 2, "hybrid": True}, timeout=60
        )
        handoff = Handoff.from_manifest(json.loads((checkpoints / "shapes" / "manifest.json").read_text()))
        assert r.status_code == 200 and r.json()["nfe"] == 2 * handoff.teacher_steps + 1
    finally:
        stop_server(s)
