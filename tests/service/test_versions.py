"""The version lifecycle in-process: how it shares a new version's load with other processes."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fewstep.models.registry import Registry
from fewstep.service.app import step_kinds
from fewstep.service.kinds import Context
from fewstep.service.loading import Loader
from fewstep.service.metrics import Metrics
from fewstep.service.settings import Settings
from fewstep.service.versions import Versions
from tests.service import versions as v

pytestmark = pytest.mark.slow
RUNTIME = "torch-fp32"


@pytest.fixture
def runtime(tmp_path: Path, checkpoints: Path) -> Iterator[Versions]:
    settings = Settings(
        registry=tmp_path / "registry", checkpoints=checkpoints, gate_probe_seeds=1, watch_interval_s=0.05, threads=1
    )
    ctx = Context(settings, Registry(settings.registry))
    ctx.registry.seed_from(checkpoints)
    rt = Versions(ctx, Metrics(), step_kinds(), loader="this-process")
    rt.load()
    assert rt.ready and version_of(rt, "shapes") == "1"
    yield rt
    rt.close()


def version_of(rt: Versions, model: str) -> str | None:
    serving = rt.models[model].serving
    return serving.version if serving is not None else None


def settle(rt: Versions, until: float = 30.0) -> None:
    """Call `maintain` as a serving thread would, until the background load (if any) has been adopted."""
    deadline = time.monotonic() + until
    while time.monotonic() < deadline:
        rt.maintain()
        if not rt.loading:
            rt.maintain()
            return
        time.sleep(0.05)
    raise AssertionError("the load never ended")


def test_a_version_another_process_is_loading_is_not_gated_twice(
    runtime: Versions, checkpoints: Path, tmp_path: Path
) -> None:
    reg: Registry = runtime.registry
    v.variant(checkpoints / "shapes", tmp_path / "v2", v.jitter(0.05, seed=4))
    reg.publish(tmp_path / "v2", version="2", promote=True)
    other = reg.begin_load("shapes", "2", "other-process")  # fresh: that process is loading it now
    time.sleep(0.1)
    settle(runtime)
    assert version_of(runtime, "shapes") == "1" and reg.verdict("shapes", "2", RUNTIME) is None
    # The other process ends its load with a verdict: this one adopts the version without gating it.
    reg.record_verdict("shapes", "2", RUNTIME, {"passed": True, "reason": None, "metrics": {"mark": 1}})
    reg.end_load(other)
    time.sleep(0.1)
    settle(runtime)
    assert version_of(runtime, "shapes") == "2"
    assert reg.verdict("shapes", "2", RUNTIME)["metrics"] == {"mark": 1}  # not judged again


def test_a_version_whose_loader_died_is_refused_after_max_load_attempts(
    runtime: Versions, checkpoints: Path, tmp_path: Path
) -> None:
    reg: Registry = runtime.registry
    v.variant(checkpoints / "shapes", tmp_path / "v2", v.jitter(0.05, seed=5))
    reg.publish(tmp_path / "v2", version="2", promote=True)
    old = time.time() - Loader.MARK_STALE_S - 60
    for i in range(runtime.settings.max_load_attempts):
        os.utime(reg.begin_load("shapes", "2", f"crashed-{i}"), (old, old))
    time.sleep(0.1)
    settle(runtime)
    served = runtime.models["shapes"]
    assert version_of(runtime, "shapes") == "1"
    status, why = served.statuses["2"]
    assert status == "refused" and why == f"{runtime.settings.max_load_attempts} loads of it never finished " \
        "(their process died while loading)"  # fmt: skip
