"""What this process serves, per model: the state the version lifecycle keeps and the routes read.

`service/versions.py` changes it (between steps, replacing fields whole); `GET /v1/models` and the
request routes read it from other threads.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

from fewstep.engines.specs import Spec
from fewstep.service.gate import Reference

Status = Literal["serving", "canary", "ready", "refused"]
"""A version's status, as `GET /v1/models` reports it."""


@dataclass
class Loaded(Reference):
    """A version this process serves (or routes to, with no engine) and its spec."""

    spec: Spec = field(kw_only=True)


@dataclass
class Canary:
    """A gated version taking a share of new work until its live error rate has been seen."""

    loaded: Loaded
    ok: int = 0
    failed: int = 0


@dataclass
class Model:
    """One model as this process serves it."""

    name: str
    kind: str
    serving: Loaded | None = None
    canary: Canary | None = None
    statuses: dict[str, tuple[Status, str | None]] = field(default_factory=dict)
    pointer: str | None = None
    """The `PROMOTED` version this process last acted on."""
    created: int = 0


def share(key: str) -> float:
    """A stable number in [0, 1) for `key`."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64
