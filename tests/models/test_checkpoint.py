import json
from pathlib import Path

import pytest
import torch

from fewstep.errors import CheckpointError
from fewstep.models.checkpoint import load_checkpoint, read_manifest, save_checkpoint


def _save(folder: Path) -> dict:
    return save_checkpoint(folder, {"w": torch.arange(6.0).reshape(2, 3)}, {"name": "m", "kind": "image"})


def test_round_trip_hashes_every_file(tmp_path: Path) -> None:
    manifest = _save(tmp_path / "ck")
    assert len(manifest["files"]["model.safetensors"]["sha256"]) == 64
    loaded, state = load_checkpoint(tmp_path / "ck")
    assert loaded == manifest
    assert torch.equal(state["w"], torch.arange(6.0).reshape(2, 3))


def test_modified_weights_are_refused(tmp_path: Path) -> None:
    _save(tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path / "ck")


def test_weights_swapped_after_the_folder_check_are_refused_not_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights are hashed as they are read for loading: a file replaced between the folder's check and the
    load (same size, other values) is refused, where hashing and then reopening by path loaded it."""
    from fewstep.models import checkpoint

    _save(tmp_path / "ck")
    other = tmp_path / "other"
    save_checkpoint(other, {"w": -torch.arange(6.0).reshape(2, 3)}, {"name": "m", "kind": "image"})
    check = checkpoint.verify_files

    def check_then_swap(folder: Path, manifest: dict, hashed_on_load: tuple[str, ...] = ()) -> None:
        check(folder, manifest, hashed_on_load)
        (folder / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())

    monkeypatch.setattr(checkpoint, "verify_files", check_then_swap)
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        load_checkpoint(tmp_path / "ck")


def test_pickle_files_are_never_accepted(tmp_path: Path) -> None:
    manifest = _save(tmp_path / "ck")
    (tmp_path / "ck" / "model.pt").write_bytes(b"not a safetensors file")
    manifest["files"] = {"model.pt": {"sha256": "0" * 64, "bytes": 22}}
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="pickle-format files are refused unread"):
        load_checkpoint(tmp_path / "ck")


def test_a_pickle_beside_good_weights_refuses_the_folder_unread(tmp_path: Path) -> None:
    _save(tmp_path / "ck")
    # Not even a valid pickle: were it opened, the error would say so, not "refused unread".
    (tmp_path / "ck" / "extra.bin").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match=r"holds extra\.bin: pickle-format files are refused unread"):
        load_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize("name", ["../escape.safetensors", "/etc/passwd", "manifest.json", "a/b.safetensors"])
def test_unsafe_file_names_in_a_manifest_are_refused(tmp_path: Path, name: str) -> None:
    manifest = _save(tmp_path / "ck")
    manifest["files"] = {name: {"sha256": "0" * 64, "bytes": 1}}
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "ck")


def test_missing_or_malformed_manifest_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no manifest"):
        read_manifest(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        read_manifest(tmp_path / "empty")


def test_atomic_writes_use_a_temp_name_unique_per_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pods sharing the registry volume all run as PID 1: a PID-named temp file would be shared."""
    import os

    from fewstep.models.checkpoint import write_json_atomic

    temps: list[str] = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (temps.append(Path(src).name), real(src, dst))[1])
    for i in range(2):
        write_json_atomic(tmp_path / "verdict.json", {"n": i})
    assert len(set(temps)) == 2  # two writes, two names (a PID-named file would be the same one)
    assert (tmp_path / "verdict.json").read_text().strip().endswith("}") and not list(tmp_path.glob(".*tmp*"))
