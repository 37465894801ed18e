"""The TensorRT engine cache: built plans with a manifest each, verified as they are read.

A plan is a serialized engine that TensorRT deserializes and runs without further checks, and the
cache is shared (a volume every worker of a GPU kind mounts), so a plan is trusted only with its
manifest: `<key>.plan.json` records the plan's sha256 and size and what it was built from. A plan
is read once and hashed before it is handed on; one without a manifest, or whose bytes do not match
it, is never deserialized: the caller builds it again and the rebuild replaces it. Writes go through
temp names unique per writer, then `os.replace`, the plan before its manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

log = logging.getLogger("fewstep.engines")


def _paths(cache: Path, key: str) -> tuple[Path, Path]:
    return cache / f"{key}.plan", cache / f"{key}.plan.json"


def load_plan(cache: Path, key: str) -> bytes | None:
    """The cached plan for `key` if its manifest vouches for its bytes; None (rebuild it) otherwise."""
    plan, meta = _paths(cache, key)
    if not plan.is_file():
        return None
    try:
        record = json.loads(meta.read_text())
    except (OSError, ValueError):
        log.warning("TensorRT plan %s has no readable manifest: building it again", plan.name)
        return None
    data = plan.read_bytes()
    if len(data) != record.get("bytes") or hashlib.sha256(data).hexdigest() != record.get("sha256"):
        log.warning("TensorRT plan %s does not match the sha256 in its manifest: building it again", plan.name)
        return None
    return data


def store_plan(cache: Path, key: str, data: bytes, source: dict[str, Any]) -> None:
    """Write the plan for `key` and its manifest (`source` says what it was built from)."""
    cache.mkdir(parents=True, exist_ok=True)
    plan, meta = _paths(cache, key)
    record = {"key": key, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "source": source}
    for path, payload in ((plan, data), (meta, json.dumps(record, indent=1).encode())):
        tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")
        tmp.write_bytes(payload)
        os.replace(tmp, path)
