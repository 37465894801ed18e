"""The model registry: a directory of immutable, verified checkpoint versions.

Layout (DESIGN.md §5)::

    <root>/<model>/<version>/manifest.json + weights     one folder per version, never rewritten
    <root>/<model>/PROMOTED                               {"version": ...}: the version that should serve
    <root>/<model>/.gate/<version>.json                   the serving gate's verdict on a version
    <root>/<model>/.gate/<version>.loading.<worker>       a load in progress (left behind by a crash)

Publishing copies into a hidden folder beside the target, fsyncs, then renames it into place,
so a reader sees a whole version or none. Names are validated and every path is resolved and
required to stay under the root; symlinks are refused (a pushed checkpoint is untrusted input).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from fewstep.errors import CheckpointError, NotFound, RegistryError
from fewstep.models.checkpoint import (
    FORMAT,
    MANIFEST,
    WEIGHTS,
    check_relative,
    copy_hashed,
    read_manifest,
    verify_files,
    write_json_atomic,
)

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
POINTER = "PROMOTED"
GATE_DIR = ".gate"
_LOADER = re.compile(r"[^A-Za-z0-9_-]")


def check_name(kind: str, name: str) -> str:
    """`name` if it is a valid model or version name, else RegistryError."""
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise RegistryError(f"invalid {kind} name {name!r}: use lowercase letters, digits, '.', '_' and '-'")
    return name


def _version_key(v: str) -> tuple[int, int | str]:
    return (0, int(v)) if v.isdigit() else (1, v)


class Registry:
    """Read and write access to one registry root."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def _contained(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise RegistryError(f"path {path} escapes the registry root")
        cur = self.root
        for p in parts:
            cur = cur / p
            if cur.is_symlink():
                raise RegistryError(f"{cur} is a symlink; the registry refuses links")
        return resolved

    def model_dir(self, model: str) -> Path:
        return self._contained(check_name("model", model))

    def version_dir(self, model: str, version: str) -> Path:
        return self._contained(check_name("model", model), check_name("version", version))

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME.match(p.name) and not p.is_symlink())

    def versions(self, model: str) -> list[str]:
        d = self.model_dir(model)
        if not d.is_dir():
            return []
        found = [p.name for p in d.iterdir() if p.is_dir() and NAME.match(p.name) and (p / MANIFEST).is_file()]
        return sorted(found, key=_version_key)

    def promoted(self, model: str) -> str | None:
        """The promoted version, or None when the model has no pointer."""
        ptr = self.model_dir(model) / POINTER
        if not ptr.is_file():
            return None
        try:
            version = json.loads(ptr.read_text())["version"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RegistryError(f"{ptr}: unreadable pointer ({e})") from e
        return check_name("version", version)

    def manifest(self, model: str, version: str) -> dict[str, Any]:
        d = self.version_dir(model, version)
        if not d.is_dir():
            raise NotFound(f"model {model!r} has no version {version!r}")
        return read_manifest(d)

    def validate(self, model: str, version: str) -> dict[str, Any]:
        """Manifest of a version whose files all match their hashes; CheckpointError otherwise."""
        d = self.version_dir(model, version)
        m = self.manifest(model, version)
        verify_files(d, m)
        return m

    def find(self, model: str, sha256: str, file: str = "model.safetensors") -> str | None:
        """The newest version of `model` whose `file` has this sha256 (manifest record), if any."""
        for version in reversed(self.versions(model)):
            meta = self.manifest(model, version)["files"].get(file, {})
            if meta.get("sha256") == sha256:
                return version
        return None

    def teacher_dir(self, manifest: dict[str, Any]) -> Path | None:
        """The folder of the exact teacher a student's manifest names (by sha256), validated; None when the
        manifest names none or the registry does not hold it. Raises when the one it holds is refused."""
        return self.named_dir(manifest, "teacher")

    def named_dir(self, manifest: dict[str, Any], key: str) -> Path | None:
        """The folder of the exact model a manifest names under `key` (`{"name", "sha256"}`, and `"file"` when the
        weights that identify it are not `model.safetensors`), as `teacher_dir`."""
        ref = manifest.get(key) or {}
        if not isinstance(ref, dict) or not isinstance(ref.get("name"), str) or not isinstance(ref.get("sha256"), str):
            return None
        version = self.find(ref["name"], ref["sha256"], str(ref.get("file") or WEIGHTS))
        if version is None:
            return None
        self.validate(ref["name"], version)
        return self.version_dir(ref["name"], version)

    def next_version(self, model: str) -> str:
        numeric = [int(v) for v in self.versions(model) if v.isdigit()]
        return str(max(numeric, default=0) + 1)

    def publish(
        self, src: Path, model: str | None = None, version: str | None = None, promote: bool = False
    ) -> tuple[str, str]:
        """Copy checkpoint folder `src` in as (model, version); returns them.

        Defaults come from `src/manifest.json`; an existing version is never overwritten (a
        taken default version moves to the next free number).
        """
        src = Path(src)
        manifest = read_manifest(src)
        verify_files(src, manifest)
        return self.publish_files({name: src / name for name in manifest["files"]}, manifest, model, version, promote)

    def publish_files(
        self,
        files: dict[str, Path],
        manifest: dict[str, Any],
        model: str | None = None,
        version: str | None = None,
        promote: bool = False,
    ) -> tuple[str, str]:
        """Publish `files` (a path in the version → the file to copy there) with `manifest`, whose `files` entries
        are written from the copy itself (hashed while copying). As `publish` for names and versions."""
        model = check_name("model", model or manifest["name"])
        explicit = version is not None
        version = check_name("version", version or str(manifest.get("version", "1")))
        for _ in range(100):  # another publisher may take the same default number at the same moment
            target = self.version_dir(model, version)
            if target.exists():
                if explicit:
                    raise RegistryError(f"{model}:{version} already exists; versions are immutable")
                version = self.next_version(model)
                continue
            if self._place(files, manifest, model, version):
                break
            if explicit:
                raise RegistryError(f"{model}:{version} already exists; versions are immutable")
        else:
            raise RegistryError(f"{model}: no free version number after 100 tries")
        if promote or self.promoted(model) is None:
            self.promote(model, version)
        return model, version

    def _place(self, files: dict[str, Path], manifest: dict[str, Any], model: str, version: str) -> bool:
        """Copy aside (hashing), fsync, verify, rename into place. False if the version appeared meanwhile."""
        target = self.version_dir(model, version)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".incoming-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            hashed = {}
            for name, source in files.items():
                dest = tmp / check_relative(name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                hashed[name] = copy_hashed(source, dest)
            placed = {**manifest, "format": FORMAT, "name": model, "version": version, "files": hashed}
            write_json_atomic(tmp / MANIFEST, placed)
            for f in tmp.rglob("*"):
                if f.is_file():
                    fd = os.open(f, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            verify_files(tmp, placed)
            os.rename(tmp, target)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # a concurrent publisher won the name
                return False
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return True

    def promote(self, model: str, version: str) -> None:
        """Point the model at `version` (which must validate)."""
        self.validate(model, version)
        write_json_atomic(self.model_dir(model) / POINTER, {"version": version})

    def rollback(self, model: str, to: str | None = None, runtime: str = "torch-fp32") -> str:
        """Promote `to`, or the newest version older than the promoted one that the gate did not refuse.

        An unreadable pointer counts as none (then the newest unrefused version): rollback repairs it.
        """
        try:
            current = self.promoted(model)
        except RegistryError:
            current = None
        versions = self.versions(model)
        if to is None:
            older = [
                v
                for v in versions
                if (current is None or _version_key(v) < _version_key(current)) and not self.refused(model, v, runtime)
            ]
            if not older:
                raise NotFound(f"model {model!r} has no unrefused version older than {current!r} to roll back to")
            to = older[-1]
        elif (why := self.refused(model, check_name("version", to), runtime)) is not None:
            raise RegistryError(f"{model}:{to} was refused by the serving gate ({why}); push a new version instead")
        self.promote(model, to)
        return to

    # -- the serving gate's records ----------------------------------------------------------
    # Verdicts are kept per runtime ("torch-fp32", "onnxruntime-int8", ...): a version may serve
    # on one backend and not yet on another (its ONNX artifacts are exported later).
    def _gate_dir(self, model: str) -> Path:
        return self.model_dir(model) / GATE_DIR

    def _verdict_path(self, model: str, version: str, runtime: str) -> Path:
        if not NAME.match(runtime):
            raise RegistryError(f"invalid runtime {runtime!r}")
        return self._gate_dir(model) / f"{check_name('version', version)}@{runtime}.json"

    def subject(self, model: str, version: str, runtime: str) -> str | None:
        """What a verdict on this version judged: the SHA-256 of its manifest, which lists every file's
        SHA-256 (checked as the files load), and for a runtime that serves exported graphs (not torch's) of
        every artifact manifest beside it (each names its graph's SHA-256, and its quality gate): graphs
        exported again, or swapped, are judged again. None when the version has no readable manifest."""
        folder = self.version_dir(model, version)
        digest = hashlib.sha256()
        try:
            digest.update((folder / "manifest.json").read_bytes())
            if "torch" not in runtime.split("-"):  # (any export re-gates: simpler than knowing whose graphs)
                found = [*folder.glob("*.onnx.json"), *folder.glob("onnx/*/manifest.json")]
                for art in sorted([*found, *folder.glob("openvino/*/manifest.json")]):
                    digest.update(str(art.relative_to(folder)).encode() + b"\0" + art.read_bytes())
        except OSError:
            return None
        return digest.hexdigest()

    def verdict(self, model: str, version: str, runtime: str) -> dict[str, Any] | None:
        """The gate's recorded verdict on a version ({"passed": bool, "reason", "metrics", ...}), if any.

        A verdict counts only for what it judged: one whose `subject` is not this version's manifest digest
        as it is now (the version was rewritten, or the file was written by hand) is no verdict, and the
        version is gated again."""
        path = self._verdict_path(model, version, runtime)
        if not path.is_file() or path.is_symlink():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # a torn or foreign file is no verdict: the version is gated again
        if not isinstance(data, dict) or not isinstance(data.get("passed"), bool):
            return None
        subject = self.subject(model, version, runtime)
        return data if subject is not None and data.get("subject") == subject else None

    def record_verdict(self, model: str, version: str, runtime: str, verdict: dict[str, Any]) -> None:
        """Keep the gate's verdict, bound to the digest of what it judged (`subject`), so that every process
        (and every restart) agrees without re-judging."""
        path = self._verdict_path(model, version, runtime)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {**verdict, "subject": self.subject(model, version, runtime)})

    def refused(self, model: str, version: str, runtime: str) -> str | None:
        """The reason the gate refused this version, or None."""
        v = self.verdict(model, version, runtime)
        return None if v is None or v["passed"] else str(v.get("reason") or "refused")

    def begin_load(self, model: str, version: str, loader: str) -> Path:
        """Mark that `loader` is loading a version; `end_load` removes the mark. A crash leaves it behind.

        The loader keeps the mark fresh (`touch_load`) while it loads, so that others can tell a
        load in progress from one whose process died (`load_marks`).
        """
        d = self._gate_dir(model)
        d.mkdir(parents=True, exist_ok=True)
        mark = d / f"{check_name('version', version)}.loading.{_LOADER.sub('_', loader)[:80]}"
        mark.write_text("")
        return mark

    @staticmethod
    def touch_load(mark: Path) -> None:
        mark.touch(exist_ok=True)

    @staticmethod
    def end_load(mark: Path) -> None:
        mark.unlink(missing_ok=True)

    def load_marks(self, model: str, version: str, stale_s: float) -> tuple[int, int]:
        """(dead, live): loads of a version whose mark is older than `stale_s` (their process died while
        loading), and loads in progress now."""
        d = self._gate_dir(model)
        if not d.is_dir():
            return 0, 0
        prefix = f"{check_name('version', version)}.loading."
        now = time.time()
        ages = []
        for p in d.iterdir():
            if p.name.startswith(prefix):
                try:
                    ages.append(now - p.stat().st_mtime)
                except FileNotFoundError:  # its load just ended
                    continue
        dead = sum(1 for a in ages if a > stale_s)
        return dead, len(ages) - dead

    def seed_from(self, checkpoints: Path) -> list[tuple[str, str]]:
        """Publish every checkpoint folder under `checkpoints` whose model the registry lacks."""
        added: list[tuple[str, str]] = []
        if not checkpoints.is_dir():
            return added
        for folder in sorted(p for p in checkpoints.iterdir() if (p / MANIFEST).is_file()):
            try:
                name = read_manifest(folder)["name"]
            except CheckpointError:
                continue
            if self.versions(name):
                continue
            # Gateway and workers may start together on an empty registry and seed it at once:
            # the same checkpoint already placed by another process counts as seeded.
            version = str(read_manifest(folder).get("version", "1"))
            try:
                added.append(self.publish(folder, version=version, promote=True))
            except RegistryError:
                weights = read_manifest(folder)["files"].get("model.safetensors", {}).get("sha256", "")
                if self.find(name, weights) is None:
                    raise
        return added
