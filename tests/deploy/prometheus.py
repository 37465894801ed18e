"""Test support: a real Prometheus (Debian's package) on loopback, scraping the targets it is given."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import ROOT, free_port, terminate

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"


class Prometheus:
    def __init__(self, url: str, log: Path) -> None:
        self.url, self.log = url, log

    def query(self, promql: str) -> list[dict[str, Any]]:
        body = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10).json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def rules(self) -> list[dict[str, Any]]:
        groups = httpx.get(f"{self.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        return [r for g in groups for r in g["rules"]]


@contextmanager
def prometheus(tmp: Path, targets: dict[str, str]) -> Iterator[Prometheus]:
    """`prometheus` scraping each job's `host:port` every second, with fewstep's alert rules loaded."""
    exe = shutil.which("prometheus")
    assert exe, "prometheus is missing: `make test` installs Debian's prometheus package"
    folder = tmp / "prometheus"
    folder.mkdir()
    shutil.copy(ALERTS, folder)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [ALERTS.name],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [t]}]} for job, t in targets.items()],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = folder / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [exe, "--config.file=prometheus.yml", "--storage.tsdb.path=tsdb", f"--web.listen-address=127.0.0.1:{port}"],
            cwd=folder,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{server.url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        yield server
    finally:
        terminate(proc)
