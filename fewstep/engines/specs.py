"""Model specs: what a request may ask of one served model version, built from its manifest alone.

A spec is the part of a model a gateway needs to validate requests and to describe the model in
`GET /v1/models`: step counts, default steps, size, whether `hybrid` is served, the backend and
precision it runs on. Engines carry the spec of the version they loaded (a teacher that fails to load
turns `hybrid` off); a gateway that runs no engine (Redis mode) builds the same spec from the manifest.
The request types the specs validate live here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from fewstep.errors import CheckpointError, InvalidRequest, limit_error
from fewstep.models.schedules import MAX_SEED, FewStepSchedule

Api = Literal["image", "video"]
"""Which API serves a model: `POST /v1/images/generations` and jobs, or `WS /v1/video/stream`."""


@dataclass(frozen=True)
class ImageItem:
    """One image to make. `steps` counts student steps; `seed` fixes every noise draw."""

    prompt: str
    seed: int
    steps: int
    hybrid: bool = False


@dataclass(frozen=True)
class StreamRequest:
    """One stream to make: `frames` frames of `prompt`, each in `steps` student steps, from `seed`."""

    prompt: str
    frames: int
    steps: int
    seed: int
    hybrid: bool = False


@dataclass(frozen=True, kw_only=True)
class Spec:
    """What every served model reports. `hybrid`: whether `hybrid: true` requests are served (and if not,
    `hybrid_reason` may say why)."""

    api: ClassVar[Api]
    model: str
    version: str
    schedule: FewStepSchedule
    size: str
    backend: str
    precision: str
    hybrid: bool = False
    hybrid_reason: str | None = None

    @property
    def steps(self) -> list[int]:
        return self.schedule.steps

    @property
    def default_steps(self) -> int:
        return self.schedule.default_steps

    @property
    def width(self) -> int:
        return int(self.size.split("x")[0])

    @property
    def height(self) -> int:
        return int(self.size.split("x")[1])

    def _check_steps_and_seed(self, steps: int, seed: int) -> None:
        self.schedule.timesteps_for(steps)
        if not 0 <= seed <= MAX_SEED:
            raise limit_error("seed", f"between 0 and {MAX_SEED}", seed)

    @staticmethod
    def _manifest_fields(manifest: dict[str, Any], folder_name: str) -> dict[str, Any]:
        try:
            schedule = FewStepSchedule.from_dict(manifest["schedule"])
            size = str(manifest["native_size"])
            if min(int(v) for v in size.split("x", 1)) < 1:
                raise ValueError(f"size {size!r} is not WxH")
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{folder_name}: manifest has no valid schedule or native_size ({e})") from e
        return {"model": manifest["name"], "schedule": schedule, "size": size}


@dataclass(frozen=True, kw_only=True)
class ImageSpec(Spec):
    """An image model: 1–4 step counts from its schedule, its native size, and the hybrid if its teacher is
    loaded (2 teacher evaluations for the first step, then the student's)."""

    api: ClassVar[Api] = "image"
    teacher_nfe: int = 2
    """Network evaluations of the teacher's first step in a hybrid item (classic CFG: 2)."""

    @classmethod
    def from_manifest(
        cls,
        manifest: dict[str, Any],
        version: str,
        backend: str,
        precision: str,
        hybrid: bool = False,
        hybrid_reason: str | None = None,
    ) -> ImageSpec:
        """CheckpointError when the manifest has no valid schedule or native size."""
        fields = cls._manifest_fields(manifest, f"{manifest.get('name')}:{version}")
        return cls(
            **fields, version=version, backend=backend, precision=precision, hybrid=hybrid, hybrid_reason=hybrid_reason
        )

    def validate(self, item: ImageItem) -> None:
        """InvalidRequest when this model cannot make `item`, naming the limit and the value."""
        self._check_steps_and_seed(item.steps, item.seed)
        if item.hybrid:
            if not self.hybrid:
                why = f" ({self.hybrid_reason})" if self.hybrid_reason else ""
                raise InvalidRequest(
                    "hybrid", f"`hybrid` needs the model's teacher, which is not loaded{why}. Given: true"
                )
            if item.steps < 2:
                raise limit_error("steps", f"between 2 and {max(self.steps)} when `hybrid` is true", item.steps)

    def nfe(self, item: ImageItem) -> int:
        """Network evaluations an item costs: its steps, plus the teacher's extra ones if hybrid."""
        return item.steps + (self.teacher_nfe - 1 if item.hybrid else 0)


@dataclass(frozen=True, kw_only=True)
class VideoSpec(Spec):
    """A streaming video model: per-frame step counts, its frame size, its cache (sink and window), the
    sessions one process admits, and the image model that draws frame 0 (whose hybrid is the stream's)."""

    api: ClassVar[Api] = "video"
    capacity: int
    sink: int
    window: int
    first_frame: str | None = None

    @classmethod
    def from_manifest(
        cls,
        manifest: dict[str, Any],
        version: str,
        backend: str,
        capacity: int,
        hybrid: bool = False,
        hybrid_reason: str | None = None,
    ) -> VideoSpec:
        """CheckpointError when the manifest has no valid schedule, size or architecture."""
        where = f"{manifest.get('name')}:{version}"
        fields = cls._manifest_fields(manifest, where)
        try:
            config = manifest["architecture"]["config"]
            sink, window = int(config["sink"]), int(config["window"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: manifest has no valid architecture ({e})") from e
        ref = manifest.get("first_frame")
        if ref is not None and not isinstance(ref, dict):
            raise CheckpointError(f"{where}: manifest's `first_frame` is not a model reference")
        return cls(
            **fields,
            version=version,
            backend=backend,
            precision="fp32",
            capacity=capacity,
            sink=sink,
            window=window,
            first_frame=ref.get("name") if ref else None,
            hybrid=hybrid,
            hybrid_reason=hybrid_reason,
        )

    def validate(self, request: StreamRequest, max_frames: int) -> None:
        """InvalidRequest when this model cannot stream `request` (at most `max_frames` frames)."""
        if not 1 <= request.frames <= max_frames:
            raise limit_error("frames", f"between 1 and {max_frames}", request.frames)
        self.check(request)

    def check(self, request: StreamRequest) -> None:
        """InvalidRequest when this model cannot make `request`'s frames (steps, seed, hybrid)."""
        self._check_steps_and_seed(request.steps, request.seed)
        if request.hybrid:
            if not self.hybrid:
                raise InvalidRequest(
                    "hybrid", f"`hybrid` needs the image teacher of {self.model!r}'s first frame, which is not loaded"
                )
            if request.steps < 2:
                raise limit_error("steps", "at least 2 with `hybrid` (the teacher takes the first)", request.steps)
