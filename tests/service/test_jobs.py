"""The batch jobs API (DESIGN.md §4) on a real `fewstep serve` process with the embedded queue.

The Redis path of the same API, with real workers, is in test_worker.py.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import IMAGE_ONLY, Server, start_server, stop_server

pytestmark = pytest.mark.slow  # a `fewstep serve` process

ALICE = {"Authorization": "Bearer key-alice-0123456789"}
BOB = {"Authorization": "Bearer key-bob-0123456789"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, checkpoints: Path) -> Iterator[Server]:
    env = {**IMAGE_ONLY, "FEWSTEP_API_KEYS": "key-alice-0123456789,key-bob-0123456789", "FEWSTEP_MAX_JOB_ITEMS": "12"}
    s = start_server(tmp_path_factory.mktemp("jobs"), env)
    yield s
    stop_server(s)


def _submit(server: Server, requests: list[dict], headers: dict[str, str] = ALICE) -> httpx.Response:
    return httpx.post(server.url + "/v1/jobs", json={"model": "shapes", "requests": requests}, headers=headers)


def _wait(server: Server, job_id: str, headers: dict[str, str] = ALICE) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=headers).json()
        if st["finished"] is not None:  # every item has its result (a cancelled job says so at once)
            return st
        time.sleep(0.05)
    raise AssertionError(st)


def test_a_job_runs_to_completion_with_results_per_image(keyed: Server) -> None:
    r = _submit(keyed, [{"prompt": "a red circle", "n": 2, "seed": 3, "steps": 2}, {"prompt": "a blue square"}])
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["object"] == "job" and job["status"] == "queued" and job["total"] == 3
    st = _wait(keyed, job["id"])
    assert (st["status"], st["done"], st["failed"]) == ("succeeded", 3, 0)
    assert st["created"] <= st["started"] <= st["finished"]
    res = httpx.get(f"{keyed.url}/v1/jobs/{job['id']}/results", headers=ALICE).json()
    assert [(d["index"], d["request"]) for d in res["data"]] == [(0, 0), (1, 0), (2, 1)]
    assert [d["seed"] for d in res["data"][:2]] == [3, 4] and res["data"][0]["steps"] == 2
    assert res["data"][2]["steps"] == 4 and res["errors"] == []
    metrics = httpx.get(keyed.url + "/metrics").text
    waited = re.search(r'^fewstep_first_step_wait_seconds_count\{model="shapes"\} (\S+)', metrics, re.M)
    occupancy = re.search(r'^fewstep_batch_size_sum\{model="shapes"\} (\S+)', metrics, re.M)
    assert waited and float(waited.group(1)) >= 3  # every image's wait before its first step
    assert occupancy and float(occupancy.group(1)) >= 2 + 2 + 4  # item-steps run: 2 × 2 steps + 1 × 4 steps


def test_jobs_are_visible_only_to_the_key_that_made_them(keyed: Server) -> None:
    job = _submit(keyed, [{"prompt": "a green triangle", "steps": 1}]).json()
    for method, path in (("GET", ""), ("GET", "/results"), ("GET", "/events"), ("DELETE", "")):
        r = httpx.request(method, f"{keyed.url}/v1/jobs/{job['id']}{path}", headers=BOB)
        assert r.status_code == 404, (method, path, r.text)
    assert httpx.get(f"{keyed.url}/v1/jobs/{job['id']}").status_code == 401
    assert _submit(keyed, [{"prompt": "x"}], headers={}).status_code == 401


def test_bad_jobs_get_4xx_naming_the_limit_and_the_value(keyed: Server) -> None:
    r = _submit(keyed, [{"prompt": "ok"}, {"prompt": "a red circle", "steps": 9}])
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "`requests[1].steps` must be between 1 and 4. Given: 9"
    r = _submit(keyed, [])
    assert r.status_code == 400 and "`requests` must be a list of 1 to 12 requests. Given: 0" in r.text
    r = _submit(keyed, [{"prompt": "a", "n": 8}, {"prompt": "b", "n": 8}])
    assert r.status_code == 400 and "at most 12 images" in r.text
    r = httpx.post(keyed.url + "/v1/jobs", json={"model": "nope", "requests": [{"prompt": "x"}]}, headers=ALICE)
    assert r.status_code == 404
    r = httpx.post(
        keyed.url + "/v1/jobs",
        json={"model": "shapes", "requests": [{"prompt": "x"}]},
        headers={**ALICE, "Idempotency-Key": "k" * 300},
    )
    assert r.status_code == 400 and "`Idempotency-Key` must be 1 to 255 printable ASCII characters" in r.text
    assert httpx.get(f"{keyed.url}/v1/jobs/no-such-job-id", headers=ALICE).status_code == 404


def test_idempotency_key_replays_the_job_and_refuses_another_body(keyed: Server) -> None:
    body = [{"prompt": "a yellow circle", "seed": 1}]
    a = httpx.post(
        keyed.url + "/v1/jobs", json={"model": "shapes", "requests": body}, headers={**ALICE, "Idempotency-Key": "i-1"}
    )
    b = httpx.post(
        keyed.url + "/v1/jobs", json={"model": "shapes", "requests": body}, headers={**ALICE, "Idempotency-Key": "i-1"}
    )
    assert a.status_code == b.status_code == 202 and a.json()["id"] == b.json()["id"]
    c = httpx.post(
        keyed.url + "/v1/jobs", json={"model": "shapes", "requests": body}, headers={**BOB, "Idempotency-Key": "i-1"}
    )
    assert c.json()["id"] != a.json()["id"]  # another owner's key space
    d = httpx.post(
        keyed.url + "/v1/jobs",
        json={"model": "shapes", "requests": [{"prompt": "other"}]},
        headers={**ALICE, "Idempotency-Key": "i-1"},
    )
    assert d.status_code == 409


def test_events_stream_progress_as_server_sent_events(keyed: Server) -> None:
    job = _submit(keyed, [{"prompt": "a purple square", "n": 4, "steps": 3}]).json()
    seen: list[tuple[str, dict]] = []
    with httpx.stream("GET", f"{keyed.url}/v1/jobs/{job['id']}/events", headers=ALICE, timeout=60) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in s.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                seen.append((event or "", json.loads(line.removeprefix("data: "))))
                if event == "end":
                    break
    kinds = [k for k, _ in seen]
    assert kinds[0] == "status" and kinds.count("item") == 4 and kinds[-1] == "end"
    assert sorted(d["index"] for k, d in seen if k == "item") == [0, 1, 2, 3]
    assert seen[-1][1]["status"] == "succeeded" and seen[-1][1]["done"] == 4


def test_delete_cancels_a_queued_job(keyed: Server) -> None:
    big = _submit(keyed, [{"prompt": "a red square", "n": 8, "steps": 4}, {"prompt": "a red circle", "n": 4}]).json()
    r = httpx.delete(f"{keyed.url}/v1/jobs/{big['id']}", headers=ALICE)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    st = _wait(keyed, big["id"])
    assert st["status"] == "cancelled" and st["done"] + st["cancelled"] == 12 and st["cancelled"] >= 1
    res = httpx.get(f"{keyed.url}/v1/jobs/{big['id']}/results", headers=ALICE).json()
    assert all(e["outcome"] == "cancelled" for e in res["errors"])
    metrics = httpx.get(keyed.url + "/metrics").text
    assert 'fewstep_queue_depth{lane="batch"}' in metrics and "fewstep_queue_up 1.0" in metrics
    assert 'fewstep_worker_items_total{outcome="cancelled"}' in metrics


def test_a_client_that_disconnects_frees_its_slot_at_the_next_step(tmp_path: Path, checkpoints: Path) -> None:
    """About the gateway and the worker, not images: the no-op engine at 300 ms per step."""
    s = start_server(tmp_path, {**IMAGE_ONLY, "FEWSTEP_ENGINE": "noop", "FEWSTEP_NOOP_STEP_MS": "300"})
    try:
        body = {"model": "shapes", "prompt": "a red circle", "steps": 4, "n": 2}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/images/generations", json=body, timeout=0.5)  # gives up after ~1.5 steps
        gone = time.monotonic()
        deadline = gone + 10
        while 'fewstep_worker_items_total{outcome="cancelled"} 2.0' not in httpx.get(s.url + "/metrics").text:
            assert time.monotonic() < deadline, s.output()[-2000:]
            time.sleep(0.05)
        assert time.monotonic() - gone < 1.2  # detection (≤ 0.25 s) + the step in flight (0.3 s) + slack
        ok = httpx.post(s.url + "/v1/images/generations", json={**body, "steps": 1}, timeout=10)
        assert ok.status_code == 200
    finally:
        stop_server(s)
