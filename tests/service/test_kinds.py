"""A new model kind costs one engine and one line in the kind table.

Here the no-op engine becomes a served model kind through the protocols alone: registered with one
line (`KINDS["noop"] = NOOP`), it is loaded, gated, served over HTTP and swapped by the same version
lifecycle as the shipped students. It has no judge, so the gate checks what it can check of any user's
model: the probes run, their outputs are finite, and a new version agrees with the serving one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path
from typing import ClassVar

import httpx
import numpy as np
import pytest

from fewstep.engines.base import ImageItem
from fewstep.engines.noop import NoopEngine
from fewstep.engines.specs import ImageSpec
from fewstep.models.registry import Registry
from fewstep.service.kinds import KINDS, Context, Kind, Version, named_probes, render_images
from tests.service.gateway import in_process, settings, tiny_checkpoint

pytestmark = pytest.mark.anyio
GEN = "/v1/images/generations"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Scrambled(NoopEngine):
    """A broken build of the no-op engine: noise where its images should be."""

    def _pixels(self, item: ImageItem) -> np.ndarray:
        rng = np.random.default_rng([item.seed, 99])
        return rng.integers(0, 256, (self.spec.height, self.spec.width, 3), dtype=np.uint8)


def _spec(ctx: Context, v: Version) -> ImageSpec:
    return ImageSpec.from_manifest(v.manifest, v.version, "noop", "none")


def _engine(ctx: Context, v: Version) -> NoopEngine:
    return (Scrambled if v.manifest.get("scrambled") else NoopEngine)(spec=_spec(ctx, v))


NOOP = Kind(
    serves="steps",
    runtime=lambda s: "noop",
    spec=_spec,
    engine=_engine,
    probes=lambda s, manifest: named_probes(manifest, "shapes-attributes", 1, 1),
    render=render_images,
)


async def _card(c: httpx.AsyncClient, model: str) -> dict:
    return next(m for m in (await c.get("/v1/models")).json()["data"] if m["id"] == model)


async def _wait_status(c: httpx.AsyncClient, model: str, version: str, status: str) -> str | None:
    deadline = time.monotonic() + 30
    while True:
        cards = [m for m in (await c.get("/v1/models")).json()["data"] if m["id"] == model]  # (pushed after start)
        versions = {v["version"]: v for card in cards for v in card["versions"]}
        if version in versions and versions[version]["status"] == status:
            return versions[version]["reason"]
        assert time.monotonic() < deadline, versions
        await asyncio.sleep(0.05)


@pytest.mark.slow  # a gateway lifecycle waited on for seconds: the fast layer is at its budget
async def test_a_kind_registered_with_one_line_is_served_gated_and_swapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(KINDS, "noop", NOOP)  # the one line
    seed = tmp_path / "checkpoints"
    tiny_checkpoint(seed / "flat", "flat", kind="noop")
    config = settings(tmp_path, checkpoints=seed, engine="registry")  # the registry's engines run in this process
    async with in_process(config) as c:
        card = await _card(c, "flat")
        assert card["kind"] == "image" and card["version"] == "1" and card["backend"] == "noop"
        assert card["versions"] == [{"version": "1", "status": "serving", "reason": None}]
        r = await c.post(GEN, json={"model": "flat", "prompt": "a red circle", "steps": 3, "seed": 5})
        assert r.status_code == 200 and r.json()["model_version"] == "1" and r.json()["nfe"] == 3
        first = r.json()["data"][0]["b64_json"]

        registry = Registry(config.registry)
        registry.publish(tiny_checkpoint(tmp_path / "v2", "flat", kind="noop"), version="2", promote=True)
        await _wait_status(c, "flat", "2", "serving")  # gated (it agrees with version 1), then swapped in
        r = await c.post(GEN, json={"model": "flat", "prompt": "a red circle", "steps": 3, "seed": 5})
        assert r.json()["model_version"] == "2" and r.json()["data"][0]["b64_json"] == first
        verdict = registry.verdict("flat", "2", "noop")
        assert verdict is not None and verdict["passed"] and verdict["metrics"]["against"]["version"] == "1"

        broken = tiny_checkpoint(tmp_path / "v3", "flat", kind="noop", scrambled=True)
        registry.publish(broken, version="3", promote=True)
        why = await _wait_status(c, "flat", "3", "refused")
        assert why is not None and why.startswith("outputs disagree with version 2's on 20 probes")
        assert "`gate_min_agreement_db` = 9.0" in why
        r = await c.post(GEN, json={"model": "flat", "prompt": "a red circle"})
        assert r.status_code == 200 and r.json()["model_version"] == "2"  # the serving version went on
        assert (await c.get("/readyz")).status_code == 200


class Faulty(NoopEngine):
    """A version whose own files make it misbehave as users' pipelines do: its warm-up raises an error that is
    not fewstep's (a tokenizer longer than its text encoder: `ValueError`), or its steps are slow."""

    loaded_by: ClassVar[list[str]] = []

    def load(self) -> None:
        Faulty.loaded_by.append(threading.current_thread().name)
        super().load()

    def warmup(self) -> None:
        if self.spec.model == "broken":
            raise ValueError("Sequence length must be less than max_position_embeddings (got 78 and 77)")


def _faulty(ctx: Context, v: Version) -> NoopEngine:
    return Faulty(spec=_spec(ctx, v), step_s=float(v.manifest.get("step_s", 0.0)))


FAULTY = dataclasses.replace(NOOP, engine=_faulty)


@pytest.mark.slow  # a gateway lifecycle waited on for seconds: the fast layer is at its budget
async def test_a_version_that_raises_anything_is_refused_recorded_and_the_other_models_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readiness means the models that have a version serve: a model none of whose versions loads is listed
    with why and refused per request, and takes no replica out of rotation."""
    monkeypatch.setitem(KINDS, "noop", FAULTY)
    seed = tmp_path / "checkpoints"
    tiny_checkpoint(seed / "broken", "broken", kind="noop")  # sorted before the good models
    tiny_checkpoint(seed / "good", "good", kind="noop")
    tiny_checkpoint(seed / "slow", "slow", kind="noop", step_s=0.5)  # 4 steps: 2 s of probes
    config = settings(tmp_path, checkpoints=seed, engine="registry", gate_timeout_s=1.0)
    async with in_process(config) as c:  # (ready: the old rule waited here for ever)
        r = await c.post(GEN, json={"model": "good", "prompt": "a red circle", "steps": 2})
        assert r.status_code == 200 and r.json()["model_version"] == "1"
        card = await _card(c, "broken")
        assert card["version"] is None and card["versions"][0]["status"] == "refused"
        why = card["versions"][0]["reason"]
        assert "ValueError" in why and "max_position_embeddings" in why
        r = await c.post(GEN, json={"model": "broken", "prompt": "a red circle"})
        assert r.status_code == 503 and "max_position_embeddings" in r.json()["error"]["message"]
        slow = await _card(c, "slow")
        assert slow["version"] is None and "`gate_timeout_s` = 1 s" in slow["versions"][0]["reason"]
        metrics = (await c.get("/metrics")).text
        assert 'fewstep_models_unavailable{kind="noop"} 2.0' in metrics
        assert 'fewstep_models_ready{kind="noop"} 1.0' in metrics
    # Recorded: a restart (or another process) does not load them again to find out.
    registry = Registry(config.registry)
    assert registry.refused("broken", "1", "noop") is not None and registry.refused("slow", "1", "noop") is not None


@pytest.mark.slow  # a gateway lifecycle waited on for seconds: the fast layer is at its budget
async def test_a_model_pushed_after_start_loads_in_the_loader_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not between the serving thread's steps, where its load and gate would stall every request."""
    monkeypatch.setitem(KINDS, "noop", FAULTY)
    Faulty.loaded_by.clear()
    seed = tmp_path / "checkpoints"
    tiny_checkpoint(seed / "good", "good", kind="noop")
    config = settings(tmp_path, checkpoints=seed, engine="registry")
    async with in_process(config) as c:
        Registry(config.registry).publish(tiny_checkpoint(tmp_path / "new", "later", kind="noop"), promote=True)
        await _wait_status(c, "later", "1", "serving")
        r = await c.post(GEN, json={"model": "later", "prompt": "a red circle"})
        assert r.status_code == 200
    assert len(Faulty.loaded_by) == 2 and Faulty.loaded_by[1].startswith("model-loader"), Faulty.loaded_by
