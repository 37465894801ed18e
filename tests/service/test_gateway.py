"""The HTTP contract of the gateway, in process (`create_app` behind `httpx.ASGITransport`) on the no-op
engine: routes, validation messages, error shapes, auth, the jobs API and metrics. The same gateway as
`fewstep serve` runs, with its queue, workers and version lifecycle; only the network is a no-op."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service.gateway import in_process, settings, tiny_checkpoint

pytestmark = pytest.mark.anyio
GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def client(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    async with in_process(settings(tmp_path_factory.mktemp("gateway"), noop_step_ms=2.0)) as c:
        yield c


def _image(b64: str) -> np.ndarray:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    return np.asarray(img.convert("RGB"))


async def test_health_readiness_and_the_model_list(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == "shapes" and card["object"] == "model" and card["owned_by"] == "fewstep"
    assert card["kind"] == "image" and card["steps"] == [1, 2, 3, 4] and card["size"] == "32x32"
    assert card["version"] == "1" and card["versions"] == [{"version": "1", "status": "serving", "reason": None}]
    assert card["hybrid"] is False  # the manifest names no teacher


async def test_generation_echoes_seeds_steps_and_nfe(client: httpx.AsyncClient) -> None:
    r = await client.post(GEN, json={"model": "shapes", "prompt": "a red circle", "n": 3, "steps": 2, "seed": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "shapes" and body["model_version"] == "noop" and body["size"] == "32x32"
    assert body["steps"] == 2 and body["nfe"] == 2 and body["hybrid"] is False
    assert [d["seed"] for d in body["data"]] == [10, 11, 12]
    images = [_image(d["b64_json"]) for d in body["data"]]
    assert all(i.shape == (32, 32, 3) for i in images) and not np.array_equal(images[0], images[1])
    again = await client.post(GEN, json={"model": "shapes", "prompt": "a red circle", "steps": 2, "seed": 10})
    assert np.array_equal(_image(again.json()["data"][0]["b64_json"]), images[0])
    default = (await client.post(GEN, json={"model": "shapes", "prompt": "a blue cross"})).json()
    assert default["steps"] == 4 and isinstance(default["data"][0]["seed"], int)  # the manifest's default steps


@pytest.mark.parametrize(
    ("patch", "status", "needle"),
    [
        ({"steps": 0}, 400, "`steps` must be between 1 and 4. Given: 0"),
        ({"steps": 5}, 400, "`steps` must be between 1 and 4. Given: 5"),
        ({"n": 9}, 400, "`n` must be between 1 and 8. Given: 9"),
        ({"n": 0}, 400, "`n` must be between 1 and 8. Given: 0"),
        ({"prompt": "   "}, 400, "`prompt` must be a non-empty string"),
        ({"prompt": "x" * 501}, 400, "`prompt` must be at most 500 characters long. Given: '501 characters'"),
        ({"prompt": "a red\x00circle"}, 400, "Given: a control character ('\\x00') at position 5"),
        ({"prompt": "a box", "negative_prompt": "\x1b[2J"}, 400, "`negative_prompt` must be text without control"),
        ({"size": "1024x1024"}, 400, "`size` must be '32x32' (the model's native size). Given: '1024x1024'"),
        ({"response_format": "url"}, 400, "`response_format` must be 'b64_json'. Given: 'url'"),
        ({"seed": -1}, 400, "`seed` must be between 0 and"),
        ({"n": "three"}, 400, "`n`: Input should be a valid integer. Given: 'three'"),
        ({"hybrid": True, "steps": 2}, 400, "`hybrid` needs the model's teacher, which is not loaded"),
        ({"guidance_scale": 10**400}, 400, "`guidance_scale` must be a finite number. Given: 1000"),  # was a 500
        ({"n": 10**400}, 400, "… (401 characters)"),  # the value shown shortened, not 400 digits
        ({"model": "nope"}, 404, "model 'nope' not found"),
    ],
)
async def test_bad_input_gets_a_4xx_naming_the_limit_and_the_value(
    client: httpx.AsyncClient, patch: dict, status: int, needle: str
) -> None:
    r = await client.post(GEN, json={"model": "shapes", "prompt": "a red circle", **patch})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and set(error) == {"message", "type", "param", "code"}


async def test_a_prompt_that_is_not_text_is_refused_before_it_reaches_a_batch(client: httpx.AsyncClient) -> None:
    """A lone surrogate is a valid JSON escape but not text: the tokenizer would raise on the whole batch."""
    poison = json.dumps({"model": "shapes", "prompt": "a red\ud800 circle"}).encode()  # ASCII: `\ud800` escaped
    r = await client.post(GEN, content=poison, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "an unpaired surrogate ('\\ud800') at position 5" in r.json()["error"]["message"]
    jobs = json.dumps({"model": "shapes", "requests": [{"prompt": "a box"}, {"prompt": "\udfff"}]}).encode()
    r = await client.post("/v1/jobs", content=jobs, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "requests[1].prompt"
    ok = await client.post(GEN, json={"model": "shapes", "prompt": "a red circle\non two lines\twith a tab"})
    assert ok.status_code == 200  # tabs and newlines are text


async def test_unknown_routes_and_methods_answer_in_the_openai_error_shape(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["message"] == "no route GET /v1/nope"
    r = await client.put("/v1/models")
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert r.json()["error"] == {
        "message": "PUT is not allowed on /v1/models; allowed: GET",
        "type": "invalid_request_error",
        "param": None,
        "code": "MethodNotAllowed",
    }


async def test_malformed_and_oversized_bodies_are_refused(client: httpx.AsyncClient) -> None:
    r = await client.post(GEN, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = await client.post(GEN, content=b"x" * (65 * 1024), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "`max_body_bytes` is 65536" in r.json()["error"]["message"]
    assert (await client.get("/healthz")).status_code == 200

    async def chunks(n: int) -> AsyncIterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        for _ in range(n):
            yield b" " * 1024

    r = await client.post(GEN, content=chunks(70), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "`max_body_bytes` is 65536" in r.json()["error"]["message"]

    async def small() -> AsyncIterator[bytes]:
        yield b'{"model": "shapes", '
        yield b'"prompt": "a red circle"}'

    assert (await client.post(GEN, content=small(), headers={"content-type": "application/json"})).status_code == 200


async def test_a_job_runs_to_completion_with_results_and_events(client: httpx.AsyncClient) -> None:
    body = {"model": "shapes", "requests": [{"prompt": "a red circle", "n": 2, "steps": 1}, {"prompt": "a box"}]}
    r = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-1"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["total"] == 3
    same = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-1"})
    assert same.json()["id"] == job["id"]  # the same key and body: the same job
    other = await client.post(
        "/v1/jobs", json={**body, "requests": body["requests"][:1]}, headers={"Idempotency-Key": "order-1"}
    )
    assert other.status_code == 409  # the same key with another body
    # A Last-Event-ID this queue never sent (the embedded queue's ids are counters) is refused before streaming:
    # it must never reach the event hub's one shared read.
    for bad in ("abc", "1-2-3", "9" * 30, "1-2"):
        r = await client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "Last-Event-ID", r.text
    events = await client.get(f"/v1/jobs/{job['id']}/events")  # the stream ends with the job's end event
    kinds = [line.split(": ", 1)[1] for line in events.text.splitlines() if line.startswith("event: ")]
    assert kinds[0] == "status" and kinds[-1] == "end" and kinds.count("item") == 3
    end = json.loads(events.text.rstrip().splitlines()[-1].split("data: ", 1)[1])
    assert end["status"] == "succeeded" and end["done"] == 3
    results = (await client.get(f"/v1/jobs/{job['id']}/results")).json()
    assert sorted((d["index"], d["request"], d["steps"]) for d in results["data"]) == [(0, 0, 1), (1, 0, 1), (2, 1, 4)]
    assert results["errors"] == [] and results["status"] == "succeeded"
    # A client resuming past the last event of a finished job gets the end again, not a stream left open.
    late = await client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "99999999"})
    assert [ln for ln in late.text.splitlines() if ln.startswith("event: ")] == ["event: status", "event: end"]


async def test_job_validation_names_the_request_and_the_field(client: httpx.AsyncClient) -> None:
    body = {"model": "shapes", "requests": [{"prompt": "a red circle"}, {"prompt": "a box", "steps": 9}]}
    r = await client.post("/v1/jobs", json=body)
    assert r.status_code == 400 and "`requests[1].steps` must be between 1 and 4. Given: 9" in r.text
    r = await client.post("/v1/jobs", json={"model": "shapes", "requests": []})
    assert r.status_code == 400 and "`requests` must be a list of 1 to 1000 requests" in r.text
    r = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k" * 256})
    assert r.status_code == 400 and "`Idempotency-Key` must be 1 to 255 printable ASCII" in r.text
    r = await client.get("/v1/jobs/no-such-job-id")
    assert r.status_code == 404


async def test_a_cancelled_job_reports_it(client: httpx.AsyncClient) -> None:
    body = {"model": "shapes", "requests": [{"prompt": f"a red circle {i}", "steps": 4} for i in range(40)]}
    job = (await client.post("/v1/jobs", json=body)).json()
    cancelled = (await client.delete(f"/v1/jobs/{job['id']}")).json()
    assert cancelled["id"] == job["id"]
    status = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert status["status"] in ("cancelled", "succeeded")  # it may have finished first on a fast engine
    if status["status"] == "cancelled":
        assert status["cancelled"] + status["done"] + status["failed"] <= status["total"]


async def test_metrics_count_requests_latency_and_batches(client: httpx.AsyncClient) -> None:
    await client.post(GEN, json={"model": "shapes", "prompt": "a red circle", "steps": 3})
    text = (await client.get("/metrics")).text
    assert 'fewstep_image_request_seconds_bucket{le="0.5",model="shapes",steps="3"}' in text
    assert 'fewstep_requests_total{route="/v1/images/generations",status="200"}' in text
    assert "fewstep_batch_size_count" in text and "fewstep_queue_up 1.0" in text
    assert 'fewstep_models_ready{kind="image"} 1.0' in text


async def test_api_keys_guard_every_v1_route_and_jobs_belong_to_their_key(tmp_path: Path) -> None:
    async with in_process(settings(tmp_path, api_keys="key-one-0123456789, key-two-0123456789")) as c:
        assert (await c.get("/healthz")).status_code == 200
        r = await c.get("/v1/models")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error" and r.json()["error"]["code"] == "Unauthorized"
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer wrong"})).status_code == 401
        one, two = ({"Authorization": f"Bearer {k}"} for k in ("key-one-0123456789", "key-two-0123456789"))
        assert (await c.get("/v1/models", headers=two)).status_code == 200
        for scheme in ("bearer", "BEARER", "  Bearer "):  # RFC 7235: the scheme is case-insensitive
            assert (
                await c.get("/v1/models", headers={"Authorization": f"{scheme} key-two-0123456789"})
            ).status_code == 200
        assert (await c.get("/v1/models", headers={"Authorization": "Basic key-two-0123456789"})).status_code == 401
        r = await c.post(GEN, json={"model": "shapes", "prompt": "a red circle"}, headers=one)
        assert r.status_code == 200
        job = (await c.post("/v1/jobs", json={"model": "shapes", "requests": [{"prompt": "x"}]}, headers=one)).json()
        assert (await c.get(f"/v1/jobs/{job['id']}", headers=one)).status_code == 200
        assert (await c.get(f"/v1/jobs/{job['id']}", headers=two)).status_code == 404  # another key's job
        r = await c.post("/v1/admin/models/shapes/rollback", headers=one)
        assert r.status_code == 403 and "FEWSTEP_ADMIN_KEYS" in r.json()["error"]["message"]


async def test_per_key_limits_refuse_one_key_with_429_and_leave_the_other_served(tmp_path: Path) -> None:
    keys = ("key-one-0123456789", "key-two-0123456789")
    config = settings(tmp_path, api_keys=",".join(keys), key_requests_per_s=0.01, key_burst=3, key_max_job_cost=8)
    async with in_process(config) as c:
        one, two = ({"Authorization": f"Bearer {k}"} for k in keys)
        big = {"model": "shapes", "requests": [{"prompt": "a red circle", "steps": 4}] * 3}
        r = await c.post("/v1/jobs", json=big, headers=one)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "this job adds 12, over the per-key limit of 8 (`key_max_job_cost`)" in r.json()["error"]["message"]
        for _ in range(3):
            r = await c.post(GEN, json={"model": "shapes", "prompt": "a red circle", "steps": 1}, headers=one)
            assert r.status_code == 200
        r = await c.post(GEN, json={"model": "shapes", "prompt": "a red circle", "steps": 1}, headers=one)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "bursts of 3 (`key_requests_per_s`, `key_burst`)" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "Overloaded"
        r = await c.post(GEN, json={"model": "shapes", "prompt": "a red circle", "steps": 1}, headers=two)
        assert r.status_code == 200  # the other key's budget is untouched


async def test_without_keys_no_per_key_limit_caps_the_server(tmp_path: Path) -> None:
    """Per-key limits are for keys: without auth every client is the one "anonymous" owner, and a per-key rate
    or cap would hold the whole server below its capacity (16 closed-loop clients got 429 at 50 requests/s)."""
    config = settings(tmp_path, key_requests_per_s=0.01, key_burst=2, key_max_sync_cost=4, key_max_event_streams=1)
    async with in_process(config) as c:
        many = [c.post(GEN, json={"model": "shapes", "prompt": f"a red circle {i}", "n": 2}) for i in range(8)]
        assert [r.status_code for r in await asyncio.gather(*many)] == [200] * 8
        job = (await c.post("/v1/jobs", json={"model": "shapes", "requests": [{"prompt": "x"}]})).json()
        assert (await c.get(f"/v1/jobs/{job['id']}/events")).status_code == 200


async def test_a_hybrid_request_is_charged_its_teachers_evaluations_against_the_key_limit(tmp_path: Path) -> None:
    import hashlib

    seed = tmp_path / "checkpoints"
    teacher = tiny_checkpoint(seed / "shapes-teacher", "shapes-teacher", kind="image-teacher")
    digest = hashlib.sha256((teacher / "model.safetensors").read_bytes()).hexdigest()
    handoff = {"handoff": "trajectory", "teacher_steps": 6, "spacing": 3.0}  # 12 teacher evaluations
    tiny_checkpoint(seed / "shapes", "shapes", teacher={"name": "shapes-teacher", "sha256": digest}, hybrid=handoff)
    key = "key-one-0123456789"
    config = settings(tmp_path, checkpoints=seed, key_max_job_cost=12, api_keys=key)
    async with in_process(config) as c:
        auth = {"Authorization": f"Bearer {key}"}
        hybrid = {"prompt": "a red circle", "steps": 2, "hybrid": True}
        r = await c.post("/v1/jobs", json={"model": "shapes", "requests": [hybrid]}, headers=auth)
        assert r.status_code == 429  # 12 for the teacher's hand-off, then the student's last step
        assert "this job adds 13, over the per-key limit of 12 (`key_max_job_cost`)" in r.json()["error"]["message"]
        plain = {"model": "shapes", "requests": [{"prompt": "a red circle", "steps": 4}] * 3}
        r = await c.post("/v1/jobs", json=plain, headers=auth)
        assert r.status_code == 202, r.text  # 12 plain steps fit


async def test_failed_authentication_is_throttled_per_address_and_a_valid_key_never_is(tmp_path: Path) -> None:
    """Behind an ingress every client has the proxy's address: a valid key must never pay for the failures of
    others there. Only failures are charged, after the key was checked; admin keys alike."""
    key = "key-one-0123456789"
    config = settings(tmp_path, api_keys=key, admin_keys="admin-0123456789ab", auth_failures_per_s=0.01)
    async with in_process(config.model_copy(update={"auth_failure_burst": 5})) as c:
        for i in range(5):
            r = await c.get("/v1/models", headers={"Authorization": f"Bearer guess-{i:012d}"})
            assert r.status_code == 401
        r = await c.get("/v1/models", headers={"Authorization": "Bearer guess-000000000005"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "(`auth_failures_per_s`, `auth_failure_burst`)" in r.json()["error"]["message"]
        valid = {"Authorization": f"Bearer {key}"}
        assert (await c.get("/v1/models", headers=valid)).status_code == 200
        assert (await c.post(GEN, json={"model": "shapes", "prompt": "a red circle"}, headers=valid)).status_code == 200
        r = await c.post("/v1/admin/models/shapes/rollback", headers={"Authorization": "Bearer not-an-admin-key"})
        assert r.status_code == 429  # admin guesses share the address's budget


async def test_a_key_less_server_on_loopback_answers_only_loopback_host_names(tmp_path: Path) -> None:
    """A page whose DNS name is rebound to 127.0.0.1 sends its own name as Host (and as Origin)."""
    async with in_process(settings(tmp_path)) as c:
        r = await c.post(GEN, json={"model": "shapes", "prompt": "a red circle"}, headers={"Host": "evil.example"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "Host"
        assert "`allowed_hosts`" in r.json()["error"]["message"]
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
            assert (await c.get("/v1/models", headers={"Host": host})).status_code == 200
        assert (await c.get("/readyz", headers={"Host": "10.1.2.3:8000"})).status_code == 200  # probes name pods
    async with in_process(settings(tmp_path / "keyed", api_keys="key-one-0123456789")) as c:  # keys guard it
        r = await c.get("/v1/models", headers={"Host": "api.example", "Authorization": "Bearer key-one-0123456789"})
        assert r.status_code == 200


async def test_a_header_block_over_max_header_bytes_gets_431(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/models", headers={"X-Big": "a" * 8_000})).status_code == 200
    r = await client.get("/v1/models", headers={"X-Big": "a" * 20_000})
    assert r.status_code == 431 and "`max_header_bytes` is 16384" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"
