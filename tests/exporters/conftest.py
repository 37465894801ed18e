from __future__ import annotations

from pathlib import Path

import pytest

from fewstep.exporters.onnx import export_onnx
from fewstep.models.registry import Registry


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory, checkpoints: Path, encoder) -> Registry:  # type: ignore[no-untyped-def]
    reg = Registry(tmp_path_factory.mktemp("onnx") / "registry")
    reg.seed_from(checkpoints)
    export_onnx(reg.version_dir("shapes", "1"), encoder)
    export_onnx(reg.version_dir("shapes-teacher", "1"), encoder)
    return reg
