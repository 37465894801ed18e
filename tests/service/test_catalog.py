"""A process that only routes (`Routing`): specs from manifests, no weights, and new versions followed on the
workers' verdicts. The serving side (`Versions`) is tested in test_versions.py, test_kinds.py and test_hotswap.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from fewstep.errors import NotFound, NotReady
from fewstep.models.registry import Registry
from fewstep.service.app import step_kinds
from fewstep.service.catalog import Routing
from fewstep.service.kinds import Context
from fewstep.service.metrics import Metrics
from fewstep.service.settings import Settings

MODEL = "shapes"


@pytest.fixture
def routing(tmp_path: Path, checkpoints: Path) -> Routing:
    registry = Registry(tmp_path / "registry")
    registry.publish(checkpoints / MODEL, version="1", promote=True)
    registry.publish(checkpoints / "shapes-video", version="1", promote=True)  # a stream kind: not this catalog's
    ctx = Context(Settings(registry=registry.root, watch_interval_s=3600.0), registry)
    r = Routing(ctx, Metrics(), step_kinds(), loader="gateway")
    r.load()
    return r


def _look(r: Routing) -> None:
    r.nudged.set()  # as a push announcement would: look now, and re-read recorded verdicts
    r.maintain()


def _verdict(r: Routing, version: str, passed: bool, reason: str | None = None) -> None:
    runtime = r.loader.runtime("image")
    r.registry.record_verdict(MODEL, version, runtime, {"passed": passed, "reason": reason, "metrics": {}})


def _swaps(r: Routing) -> float:
    return r.metrics.registry.get_sample_value("fewstep_model_swaps_total", {"model": MODEL}) or 0.0


def test_routing_reads_specs_from_manifests_and_loads_nothing(routing: Routing, checkpoints: Path) -> None:
    assert routing.ready and set(routing.models) == {MODEL}  # the video model is another part's
    served = routing.model(MODEL).serving
    assert served is not None and served.version == "1" and served.engine is None
    assert routing.spec(MODEL).steps == served.spec.steps and served.spec.steps
    assert routing.ctx._encoder is None  # not even the text encoder
    with pytest.raises(NotFound, match="shapes-video"):
        routing.model("shapes-video")


def test_a_new_version_is_followed_once_the_workers_gate_passed_it(routing: Routing, checkpoints: Path) -> None:
    routing.registry.publish(checkpoints / MODEL, version="2", promote=True)
    _look(routing)
    before = routing.models[MODEL].serving
    assert before is not None and before.version == "1" and _swaps(routing) == 0.0  # not judged yet

    _verdict(routing, "2", passed=True)
    _look(routing)
    model = routing.models[MODEL]
    assert model.serving is not None and model.serving.version == "2"
    assert model.statuses["2"] == ("serving", None) and model.statuses["1"] == ("ready", None)
    assert _swaps(routing) == 1.0


def test_a_version_the_workers_refused_is_reported_and_the_serving_one_stays(
    routing: Routing, checkpoints: Path
) -> None:
    routing.registry.publish(checkpoints / MODEL, version="2", promote=True)
    _verdict(routing, "2", passed=False, reason="judge accuracy 0.10 is below 0.80")
    _look(routing)
    model = routing.models[MODEL]
    assert model.serving is not None and model.serving.version == "1"
    assert model.statuses["2"] == ("refused", "judge accuracy 0.10 is below 0.80")


def test_a_failed_start_leaves_the_process_unready_and_says_so(tmp_path: Path) -> None:
    ctx = Context(Settings(registry=tmp_path / "registry"), Registry(tmp_path / "registry"))
    r = Routing(ctx, Metrics(), step_kinds(), loader="gateway")
    r.fail("OSError: the checkpoints folder cannot be read")
    assert r.loaded.is_set() and not r.ready and r.load_error is not None
    with pytest.raises(NotFound):
        r.model(MODEL)


def test_before_start_up_ends_a_model_is_not_ready_rather_than_unknown(tmp_path: Path) -> None:
    ctx = Context(Settings(registry=tmp_path / "registry"), Registry(tmp_path / "registry"))
    with pytest.raises(NotReady, match="still loading"):
        Routing(ctx, Metrics(), step_kinds(), loader="gateway").model(MODEL)
