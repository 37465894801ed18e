"""`deploy/local.sh` starts redis-server, a gateway and two workers that serve, a real Prometheus (Debian's
package) scrapes them and answers queries about them, and the script stops them all."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import CHECKPOINTS, ROOT, free_port
from tests.deploy.prometheus import ALERTS, prometheus

pytestmark = pytest.mark.slow  # redis-server, a gateway and two workers as processes


def test_local_stack_serves_a_job_and_stops_cleanly(tmp_path: Path) -> None:
    port, redis_port, metrics_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "BIN": str(Path(shutil.which("fewstep") or ROOT / ".venv/bin/fewstep").parent),
        "PORT": str(port),
        "REDIS_PORT": str(redis_port),
        "METRICS_PORT": str(metrics_port),
        "STATE": str(tmp_path / "state"),
        "FEWSTEP_REGISTRY": str(tmp_path / "registry"),
        "FEWSTEP_CHECKPOINTS": str(CHECKPOINTS),
        "FEWSTEP_THREADS": "1",
    }
    proc = subprocess.Popen(["bash", str(ROOT / "deploy/local.sh")], env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline, "stack not ready"
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        job = httpx.post(url + "/v1/jobs", json={"model": "shapes", "requests": [{"prompt": "a red circle", "n": 4}]})
        assert job.status_code == 202
        deadline = time.monotonic() + 120
        while (st := httpx.get(f"{url}/v1/jobs/{job.json()['id']}").json())["finished"] is None:
            assert time.monotonic() < deadline, st
            time.sleep(0.1)
        assert st["status"] == "succeeded" and st["done"] == 4
        deadline = time.monotonic() + 60
        while "fewstep_queue_workers 2.0" not in httpx.get(url + "/metrics").text.splitlines():
            assert time.monotonic() < deadline, "two workers never reported in"  # each loads the models first
            time.sleep(0.2)
        workers = {f"fewstep-worker-{i}": f"127.0.0.1:{metrics_port + i}" for i in range(2)}
        with prometheus(tmp_path, {"fewstep-gateway": f"127.0.0.1:{port}", **workers}) as prom:
            deadline = time.monotonic() + 90
            while len(roles := {s["metric"]["job"]: s["metric"]["role"] for s in prom.query("fewstep_build_info")}) < 3:
                assert time.monotonic() < deadline, (roles, prom.query("up"))
                time.sleep(0.5)
            assert roles == {"fewstep-gateway": "gateway", **{job: "worker" for job in workers}}
            assert {s["metric"]["job"]: s["value"][1] for s in prom.query("up")} == {job: "1" for job in roles}
            (items,) = prom.query('sum(fewstep_worker_items_total{outcome="ok"})')  # the job's 4 images, by the workers
            assert float(items["value"][1]) == 4
            assert [s["value"][1] for s in prom.query("fewstep_queue_workers")] == ["2"]
            loaded = prom.rules()
            assert (
                loaded
                and all(r["health"] != "err" for r in loaded)
                and len(loaded) == len([a for a in ALERTS.read_text().splitlines() if a.strip().startswith("- alert:")])
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0  # SIGTERM is a clean stop
    time.sleep(0.5)
    for p in (port, redis_port):  # nothing left listening
        assert subprocess.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{p}"], capture_output=True).returncode != 0
