"""The `Engine` protocol and the item/result types every engine shares.

A batch goes in, a same-length list of results-or-errors comes out: one bad item never
fails its neighbours (Triton python_backend's rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fewstep.errors import FewstepError
from fewstep.models.sampling import StopCheck


@dataclass(frozen=True)
class ImageItem:
    """One image to make. `steps` counts student steps; `seed` fixes every noise draw."""

    prompt: str
    seed: int
    steps: int
    hybrid: bool = False


@dataclass(frozen=True)
class ImageResult:
    """Pixels (H, W, 3) uint8 and what it cost."""

    pixels: np.ndarray
    seed: int
    steps: int
    nfe: int


@dataclass(frozen=True)
class EngineInfo:
    """What an engine serves, as `/v1/models` reports it."""

    model: str
    version: str
    kind: str
    steps: list[int]
    default_steps: int
    size: str
    backend: str
    precision: str
    extra: dict[str, Any] = field(default_factory=dict)


Outcome = ImageResult | FewstepError


@runtime_checkable
class Engine(Protocol):
    """The contract between the service and anything that generates.

    Lifecycle: `load` once (raises `CheckpointError` if the artifact is refused), `warmup`
    before the first request, `run` any number of times from one thread at a time,
    `close` at shutdown. `health` may be called from any thread at any time.
    """

    info: EngineInfo

    def load(self) -> None:
        """Read and verify the artifact; make the engine ready to run."""

    def warmup(self) -> None:
        """Run every step count once so that the first request pays no first-call costs."""

    def run(self, items: list[ImageItem], stop: StopCheck | None = None) -> list[Outcome]:
        """One result or one error per item, in order.

        `stop(k, active)` is asked at every step boundary which of the active items (indices
        into `items`) to drop; those come back as `Cancelled`.
        """

    def health(self) -> dict[str, Any]:
        """Liveness details: loaded, batches run, last error."""

    def close(self) -> None:
        """Release memory; the engine may not be used afterwards."""
