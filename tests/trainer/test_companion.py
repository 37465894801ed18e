"""The companion training worker: rounds fine-tune the promoted student and push it as the next version."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewstep.cli import main
from fewstep.models.checkpoint import WEIGHTS
from fewstep.models.registry import Registry

pytestmark = pytest.mark.slow  # trains (quick rounds) through the CLI


def test_trainer_rounds_push_evaluated_versions_that_build_on_each_other(
    tmp_path: Path, checkpoints: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = Registry(tmp_path / "registry")
    registry.seed_from(checkpoints)
    args = ["--registry", str(registry.root), "--work", str(tmp_path / "work"), "--threads", "1"]
    small = ["--steps", "3", "--pairs", "8", "--pair-sampler-steps", "2", "--batch", "4"]
    assert main(["trainer", "--rounds", "2", *small, *args]) == 0
    assert registry.versions("shapes") == ["1", "2", "3"] and registry.promoted("shapes") == "3"
    out = capsys.readouterr().out
    assert "published shapes:2 (promoted: 2;" in out and "published shapes:3 (promoted: 3;" in out

    for version, base in (("2", "1"), ("3", "2")):
        manifest = registry.validate("shapes", version)
        companion = manifest["trainer"]["companion"]
        assert companion["base_version"] == base and companion["steps_run"] == 3
        accuracy = manifest["metrics"]["joint_accuracy"]
        # Three steps at lr 3e-5 barely move the shipped student: it still draws what it is asked for.
        assert set(accuracy) == {"1", "2", "3", "4"} and accuracy["4"] >= 0.8
        assert manifest["teacher"] == registry.manifest("shapes", "1")["teacher"]  # hybrid still finds it
    w = [load_file(str(registry.version_dir("shapes", v) / WEIGHTS)) for v in ("1", "2", "3")]
    changed = [max((a[k] - b[k]).abs().max().item() for k in a) for a, b in ((w[0], w[1]), (w[1], w[2]))]
    assert all(c > 0 for c in changed)  # each round trained: its weights moved
    assert all(torch.isfinite(t).all() for t in w[2].values())


def test_train_push_publishes_and_promotes_what_it_trained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, reg = tmp_path / "ck", tmp_path / "registry"
    where = ["--out", str(out), "--docs", str(tmp_path / "docs"), "--registry", str(reg), "--threads", "1"]
    assert main(["train", "image", "--stages", "classifier", "--quick", "--push", *where]) == 0
    assert "published shapes-classifier:1 (promoted: 1;" in capsys.readouterr().out
    assert Registry(reg).promoted("shapes-classifier") == "1"
