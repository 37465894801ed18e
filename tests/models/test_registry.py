import json
import os
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fewstep.errors import CheckpointError, NotFound, RegistryError
from fewstep.models.checkpoint import save_checkpoint
from fewstep.models.registry import Registry, check_name


def _checkpoint(folder: Path, name: str = "demo", value: float = 1.0) -> Path:
    save_checkpoint(folder, {"w": torch.full((2,), value)}, {"name": name, "version": "1", "kind": "image"})
    return folder


def test_publish_promotes_the_first_version_and_never_overwrites(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    assert reg.publish(_checkpoint(tmp_path / "a")) == ("demo", "1")
    assert reg.promoted("demo") == "1"
    # The manifest's default version is taken: the next free number is used instead.
    assert reg.publish(_checkpoint(tmp_path / "b", value=2.0)) == ("demo", "2")
    assert reg.promoted("demo") == "1"
    with pytest.raises(RegistryError, match="immutable"):
        reg.publish(tmp_path / "b", version="2")
    assert reg.versions("demo") == ["1", "2"]
    assert not [p for p in (tmp_path / "reg" / "demo").iterdir() if p.name.startswith(".incoming")]


def test_promote_and_rollback(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    reg.publish(_checkpoint(tmp_path / "a"))
    reg.publish(_checkpoint(tmp_path / "b", value=2.0), promote=True)
    assert reg.promoted("demo") == "2"
    assert reg.rollback("demo") == "1"
    assert reg.promoted("demo") == "1"
    with pytest.raises(NotFound):
        reg.rollback("demo")


@pytest.mark.parametrize("name", ["../etc", "a/b", "UPPER", "-lead", ".hidden", "x" * 65])
def test_invalid_names_are_refused(tmp_path: Path, name: str) -> None:
    reg = Registry(tmp_path / "reg")
    with pytest.raises(RegistryError):
        reg.publish(_checkpoint(tmp_path / "a"), model=name)


def test_symlinked_model_folder_is_refused(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    (tmp_path / "reg").mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "reg" / "demo")
    with pytest.raises(RegistryError, match="symlink"):
        reg.versions("demo")


def test_corrupt_version_cannot_be_promoted(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    reg.publish(_checkpoint(tmp_path / "a"))
    reg.publish(_checkpoint(tmp_path / "b", value=2.0))
    (reg.version_dir("demo", "2") / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        reg.promote("demo", "2")
    assert reg.promoted("demo") == "1"


def test_seed_from_publishes_only_missing_models(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    _checkpoint(ck / "one", name="one")
    _checkpoint(ck / "two", name="two")
    reg = Registry(tmp_path / "reg")
    assert sorted(reg.seed_from(ck)) == [("one", "1"), ("two", "1")]
    assert reg.seed_from(ck) == []


def test_concurrent_seeding_and_publishing_never_collide(tmp_path: Path) -> None:
    """Gateway and workers start together on an empty registry (deploy/local.sh, Kubernetes)."""
    import multiprocessing as mp

    seeds = tmp_path / "checkpoints"
    _checkpoint(seeds / "demo")
    root = tmp_path / "reg"
    ctx = mp.get_context("fork")
    with ctx.Pool(6) as pool:
        outcomes = pool.starmap(_seed, [(root, seeds)] * 6)
    assert Registry(root).versions("demo") == ["1"] and sum(len(o) for o in outcomes) == 1
    pushes = [_checkpoint(tmp_path / f"push-{i}", value=float(i)) for i in range(6)]  # torch stays in the parent
    with ctx.Pool(6) as pool:  # concurrent default-numbered pushes each get their own version
        placed = pool.starmap(_publish, [(root, src) for src in pushes])
    assert sorted(v for _, v in placed) == ["2", "3", "4", "5", "6", "7"]
    assert not [p for p in (root / "demo").iterdir() if p.name.startswith(".incoming")]


def _seed(root: Path, seeds: Path) -> list[tuple[str, str]]:
    return Registry(root).seed_from(seeds)


def _publish(root: Path, src: Path) -> tuple[str, str]:
    return Registry(root).publish(src)


def test_verdicts_are_kept_per_runtime_and_rollback_skips_refused_versions(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    for i in range(3):
        reg.publish(_checkpoint(tmp_path / f"c{i}", value=float(i)), promote=True)
    assert reg.promoted("demo") == "3" and reg.verdict("demo", "2", "torch-fp32") is None
    reg.record_verdict("demo", "2", "torch-fp32", {"passed": False, "reason": "quality regression"})
    assert reg.refused("demo", "2", "torch-fp32") == "quality regression"
    assert reg.refused("demo", "2", "onnxruntime-int8") is None  # judged on one backend only
    assert "2" in reg.versions("demo") and ".gate" not in reg.versions("demo")
    assert reg.rollback("demo") == "1"  # 2 was refused: skipped
    with pytest.raises(RegistryError, match="refused by the serving gate"):
        reg.rollback("demo", to="2")
    with pytest.raises(RegistryError, match="invalid runtime"):
        reg.verdict("demo", "1", "../x")


def test_a_verdict_counts_only_for_what_it_judged(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    reg.publish(_checkpoint(tmp_path / "c0", value=0.0), promote=True)
    reg.publish(_checkpoint(tmp_path / "c1", value=1.0))
    reg.record_verdict("demo", "2", "torch-fp32", {"passed": True, "reason": None})
    assert reg.verdict("demo", "2", "torch-fp32") is not None
    manifest = reg.version_dir("demo", "2") / "manifest.json"
    manifest.write_text(manifest.read_text().replace("{", '{"rewritten": true, ', 1))  # the version changed
    assert reg.verdict("demo", "2", "torch-fp32") is None  # judged again, not trusted
    forged = reg.model_dir("demo") / ".gate" / "1@torch-fp32.json"
    forged.write_text(json.dumps({"passed": True, "reason": None}))  # written by hand, bound to nothing
    assert reg.verdict("demo", "1", "torch-fp32") is None


def test_a_verdict_on_exported_graphs_counts_only_for_those_graphs(tmp_path: Path) -> None:
    """Graphs exported again (or swapped, with an artifact manifest claiming its quality gate passed) are judged
    again by the serving gate; torch's verdicts do not depend on them."""
    reg = Registry(tmp_path / "reg")
    reg.publish(_checkpoint(tmp_path / "c0", value=0.0), promote=True)
    folder = reg.version_dir("demo", "1")
    art = folder / "model.int8.onnx.json"
    art.write_text(json.dumps({"sha256": "a" * 64, "gate": {"passed": True}}))
    for runtime in ("onnxruntime-int8", "torch-fp32"):
        reg.record_verdict("demo", "1", runtime, {"passed": True, "reason": None})
    art.write_text(json.dumps({"sha256": "b" * 64, "gate": {"passed": True}}))  # another graph, self-declared good
    assert reg.verdict("demo", "1", "onnxruntime-int8") is None
    assert reg.verdict("demo", "1", "torch-fp32") is not None
    ir = folder / "openvino" / "int8" / "manifest.json"  # OpenVINO's artifacts, the same
    ir.parent.mkdir(parents=True)
    ir.write_text(json.dumps({"graphs": {"denoiser": {"xml": {"sha256": "c" * 64}}}, "gate": {"passed": True}}))
    reg.record_verdict("demo", "1", "openvino-int8", {"passed": True, "reason": None})
    ir.write_text(json.dumps({"graphs": {"denoiser": {"xml": {"sha256": "d" * 64}}}, "gate": {"passed": True}}))
    assert reg.verdict("demo", "1", "openvino-int8") is None


def test_load_marks_tell_dead_loads_from_live_ones(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    reg.publish(_checkpoint(tmp_path / "c"))
    dead = reg.begin_load("demo", "1", "host-1/../x")  # a loader name never escapes the folder
    assert dead.parent == reg.model_dir("demo") / ".gate"
    os.utime(dead, (time.time() - 60, time.time() - 60))  # its process died a minute ago
    live = reg.begin_load("demo", "1", "host-2")
    reg.end_load(reg.begin_load("demo", "1", "host-3"))  # a load that ended leaves nothing
    assert reg.load_marks("demo", "1", stale_s=5.0) == (1, 1)
    reg.touch_load(dead)  # a loader that is alive keeps its mark fresh
    assert reg.load_marks("demo", "1", stale_s=5.0) == (0, 2)
    reg.end_load(dead)
    reg.end_load(live)
    assert reg.load_marks("demo", "1", stale_s=5.0) == (0, 0)


def test_rollback_repairs_an_unreadable_pointer(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    reg.publish(_checkpoint(tmp_path / "a"))
    reg.publish(_checkpoint(tmp_path / "b", value=2.0), promote=True)
    (reg.model_dir("demo") / "PROMOTED").write_text('{"version": "../../etc"}')
    with pytest.raises(RegistryError):
        reg.promoted("demo")
    assert reg.rollback("demo") == "2" and reg.promoted("demo") == "2"


@settings(max_examples=150, deadline=None, database=None)
@given(st.text(max_size=80) | st.sampled_from(["..", ".", "a/../b", "a/b", "/etc", "..a", "a..", "ok-name"]))
def test_a_registry_name_is_accepted_only_if_it_stays_inside_the_root(name: str) -> None:
    root = Path("/nonexistent/registry-root")
    try:
        check_name("model", name)
    except RegistryError:
        return
    assert "/" not in name and "\\" not in name and ".." not in name and name not in (".", "")
    assert (root / name).resolve().parent == root.resolve()
