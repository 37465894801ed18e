"""The model kinds this service serves, one entry each in `KINDS`, keyed by a manifest's `kind`.

A kind tells the version lifecycle (`service/versions.py`) everything it needs that differs between
models: how to read a version's spec from its manifest alone, how to build its engine (loaded by the
lifecycle), which engine protocol it speaks (`steps`: a `StepEngine`, served by the workers through
the queue; `streams`: a `StreamEngine`, served by the gateway's stream driver), which probe set the
serving gate runs and how the engine makes it, and the runtime its gate verdicts are kept under.
Adding a model kind is one engine and one line here; a manifest kind with no entry is not served
(judges, teachers, ablations: read by others, never served by themselves).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import numpy as np

from fewstep.engines.base import (
    ImageItem,
    ImageResult,
    Servable,
    StepEngine,
    StreamEngine,
    StreamRequest,
    run_to_completion,
)
from fewstep.engines.far_stream import FARStreamEngine, far_video_spec
from fewstep.engines.image import ImageEngine
from fewstep.engines.latent import LatentEngine, latent_spec
from fewstep.engines.specs import ImageSpec, Spec, VideoSpec
from fewstep.engines.video import VideoEngine
from fewstep.engines.wan_clip import ClipVideo, WanClipEngine, clip_video_spec
from fewstep.engines.wan_stream import WanStreamEngine, causal_video_spec
from fewstep.errors import CheckpointError, FewstepError
from fewstep.evaluation.probes import PROBE_SETS, ProbeSet
from fewstep.models.anyflow_far import FAR_FAMILY
from fewstep.models.checkpoint import read_manifest
from fewstep.models.registry import Registry
from fewstep.models.sampling import from_pixels
from fewstep.models.text import TextEncoder
from fewstep.service.settings import Settings

log = logging.getLogger("fewstep.runtime")
E = TypeVar("E", bound=Servable)


@dataclass
class Context:
    """What building an engine needs: the settings, the registry, and the process's one text encoder
    (made on first use: a process that only routes never loads it)."""

    settings: Settings
    registry: Registry
    _encoder: TextEncoder | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def encoder(self) -> TextEncoder:
        with self._lock:
            if self._encoder is None:
                self._encoder = TextEncoder()
            return self._encoder


@dataclass(frozen=True)
class Version:
    """A registry version, as a kind sees it."""

    name: str
    version: str
    folder: Path
    manifest: dict[str, Any]


@dataclass(frozen=True)
class Kind(Generic[E]):
    """How one kind of model is served. See the module docstring."""

    serves: Literal["steps", "streams"]
    runtime: Callable[[Settings], str]
    """What this process runs the kind's versions on (backend and precision, e.g. `torch-fp32`): gate verdicts
    are kept per runtime, since a version may pass on one and fail on another."""
    spec: Callable[[Context, Version], Spec]
    engine: Callable[[Context, Version], E]
    probes: Callable[[Settings, dict[str, Any]], ProbeSet | None]
    """The gate's probe set for a manifest (None: this kind's gate is off)."""
    render: Callable[[E, ProbeSet, Deadline], np.ndarray]
    """The engine's outputs for a probe set, in [-1, 1]: images (N, 3, H, W) or streams (N, F, 3, H, W).
    Raises FewstepError when a probe fails or the deadline passes (checked at every step boundary)."""


@dataclass(frozen=True)
class Deadline:
    """When the gate must have its answer (`time.monotonic()`), and the setting that put it there."""

    at: float
    setting: str = "gate_timeout_s"
    limit_s: float = 0.0

    @classmethod
    def after(cls, seconds: float, setting: str = "gate_timeout_s") -> Deadline:
        return cls(time.monotonic() + seconds, setting, seconds)

    @property
    def passed(self) -> bool:
        return time.monotonic() > self.at

    def check(self) -> None:
        """`CheckpointError` once the deadline has passed."""
        if self.passed:
            raise CheckpointError(f"the gate's probes took longer than `{self.setting}` = {self.limit_s:g} s")


NO_DEADLINE = Deadline(float("inf"))


def named_probes(manifest: dict[str, Any], default: str, count: int, frames: int) -> ProbeSet:
    """The probe set a manifest names under `evaluation.probes` (else `default`), of the given size."""
    name = (manifest.get("evaluation") or {}).get("probes") or default
    if name not in PROBE_SETS:
        raise CheckpointError(f"its manifest names probe set {name!r}, which this server lacks ({sorted(PROBE_SETS)})")
    return PROBE_SETS[name](count, frames)


def teacher_or_none(registry: Registry, name: str, manifest: dict[str, Any]) -> Path | None:
    """`Registry.teacher_dir`, logged: a missing or refused teacher disables the hybrid, nothing more."""
    try:
        folder = registry.teacher_dir(manifest)
    except FewstepError as e:
        log.warning("%s: teacher refused (%s); hybrid disabled", name, e)
        return None
    if folder is None and manifest.get("teacher"):
        log.warning("%s: its teacher is not in the registry; hybrid disabled", name)
    return folder


# -- image: the step-adaptive students -----------------------------------------------------------
def render_images(engine: StepEngine, probes: ProbeSet, deadline: Deadline = NO_DEADLINE) -> np.ndarray:
    """Every probe at the engine's default steps, in one run."""
    steps = engine.spec.default_steps
    items = [ImageItem(p, seed=s, steps=steps) for p, s in zip(probes.prompts, probes.seeds, strict=True)]
    outcomes = run_to_completion(engine, items, lambda _k, active: list(active) if deadline.passed else [])
    deadline.check()
    pixels = []
    for item, r in zip(items, outcomes, strict=True):
        if not isinstance(r, ImageResult):
            raise FewstepError(f"probe {item.prompt!r} seed {item.seed} failed: {r}")
        pixels.append(r.pixels)
    return from_pixels(np.stack(pixels)).numpy()


def _image_spec(ctx: Context, v: Version) -> ImageSpec:
    teacher = teacher_or_none(ctx.registry, v.name, v.manifest)
    return ImageSpec.from_manifest(
        v.manifest, v.version, ctx.settings.backend, ctx.settings.precision, hybrid=teacher is not None
    )


def _image_engine(ctx: Context, v: Version) -> ImageEngine:
    teacher = teacher_or_none(ctx.registry, v.name, v.manifest)
    s = ctx.settings
    return ImageEngine(
        v.folder,
        ctx.encoder(),
        s.backend,
        s.precision,
        version=v.version,
        teacher_folder=teacher,
        trt_cache=s.trt_cache,
    )


IMAGE: Kind[StepEngine] = Kind(
    serves="steps",
    runtime=lambda s: f"{s.backend}-{s.precision}",
    spec=_image_spec,
    engine=_image_engine,
    probes=lambda s, manifest: named_probes(manifest, "shapes-attributes", s.gate_probe_seeds, 1),
    render=render_images,
)


# -- video: the streaming students ---------------------------------------------------------------
def render_streams(engine: StreamEngine, probes: ProbeSet, deadline: Deadline = NO_DEADLINE) -> np.ndarray:
    """Every probe stream at the engine's default steps, `engine.capacity` at a time."""
    steps = engine.spec.default_steps
    out: list[np.ndarray] = []
    pairs = list(zip(probes.prompts, probes.seeds, strict=True))
    for start in range(0, len(pairs), engine.capacity):
        batch = pairs[start : start + engine.capacity]
        sessions = [engine.open(StreamRequest(p, probes.frames, steps, seed)) for p, seed in batch]
        try:
            got: dict[int, list[np.ndarray]] = {id(s): [] for s in sessions}
            while not all(s.finished for s in sessions):
                deadline.check()
                for f in engine.advance([s for s in sessions if not s.finished]):
                    got[id(f.session)].append(f.pixels)
                if failed := next((s.error for s in sessions if s.error is not None), None):
                    raise failed
        finally:
            for s in sessions:
                engine.end(s)
        out += [from_pixels(np.stack(got[id(s)])).numpy() for s in sessions]
    return np.stack(out)


def _first_frame(ctx: Context, v: Version) -> tuple[Path | None, Path | None]:
    """The folders of the image student a video manifest names for frame 0 and of that student's teacher
    (None, None when it names none). CheckpointError when the registry lacks the named one."""
    folder = ctx.registry.named_dir(v.manifest, "first_frame")
    if folder is None:
        ref = v.manifest.get("first_frame")
        if ref is None:
            return None, None
        raise CheckpointError(
            f"its first-frame image model {ref.get('name')!r} (sha256 {str(ref.get('sha256'))[:12]}…) "
            "is not in the registry"
        )
    image = read_manifest(folder)
    return folder, teacher_or_none(ctx.registry, image["name"], image)


def _video_spec(ctx: Context, v: Version) -> VideoSpec:
    _, teacher = _first_frame(ctx, v)
    s = ctx.settings
    return VideoSpec.from_manifest(v.manifest, v.version, s.video_backend, s.video_max_sessions, teacher is not None)


def _video_engine(ctx: Context, v: Version) -> VideoEngine:
    """Frame 0's image engine always runs on torch: one image per stream, whatever backend frames run on."""
    folder, teacher = _first_frame(ctx, v)
    encoder = ctx.encoder()
    image = None if folder is None else ImageEngine(folder, encoder, version=folder.name, teacher_folder=teacher)
    s = ctx.settings
    return VideoEngine(v.folder, encoder, s.video_max_sessions, s.video_backend, version=v.version, first_frame=image)


VIDEO: Kind[StreamEngine] = Kind(
    serves="streams",
    runtime=lambda s: f"video-{s.video_backend}",
    spec=_video_spec,
    engine=_video_engine,
    probes=lambda s, manifest: (
        named_probes(manifest, "shapes-motion", s.video_gate_streams, s.video_gate_frames)
        if s.video_gate_streams
        else None
    ),
    render=render_streams,
)


# -- diffusers: users' imported pipelines -------------------------------------------------------------
def _latent_spec(ctx: Context, v: Version) -> ImageSpec:
    s = ctx.settings
    teacher = teacher_or_none(ctx.registry, v.name, v.manifest)
    sides = (s.image_min_side, s.image_max_side)
    return latent_spec(v.manifest, v.version, s.backend, s.precision, sides, hybrid=teacher is not None)


def _latent_engine(ctx: Context, v: Version) -> LatentEngine:
    s = ctx.settings
    teacher = teacher_or_none(ctx.registry, v.name, v.manifest)
    sides = (s.image_min_side, s.image_max_side)
    args = (v.folder, s.backend, s.precision, v.version, teacher, sides, s.latent_device, s.latent_dtype)
    return LatentEngine(*args, prompt_cache_bytes=s.prompt_cache_bytes)


DIFFUSERS: Kind[StepEngine] = Kind(
    serves="steps",
    runtime=lambda s: f"{s.backend}-{s.precision}",
    spec=_latent_spec,
    engine=_latent_engine,
    probes=lambda s, manifest: named_probes(manifest, "shapes-attributes", s.gate_probe_seeds, 1),
    render=render_images,
)


# -- diffusers-causal-video: users' imported causal Wan students ----------------------------------------------
@dataclass(frozen=True)
class CausalStreams:
    """How one sampler of causal video students is served: its spec from a manifest alone, and its engine."""

    spec: Callable[[dict[str, Any], str, int, str], VideoSpec]
    """(manifest, version, capacity, dtype) → the spec."""
    engine: Callable[[Path, int, str, str, str, int], StreamEngine]
    """(folder, capacity, device, dtype, version, prompt cache bytes) → the engine, not loaded."""


SELF_FORCING_LOOP = CausalStreams(causal_video_spec, WanStreamEngine)
CAUSAL_STREAMS: dict[str, CausalStreams] = {FAR_FAMILY: CausalStreams(far_video_spec, FARStreamEngine)}
"""A causal manifest's family name (`causal.name`) → how it is served, for the samplers of their own; every other
family is data the Self-Forcing loop reads (`models.causal_families`: any name, its manifest says how it samples)."""


def causal_streams(manifest: dict[str, Any]) -> CausalStreams:
    causal = manifest.get("causal")
    return CAUSAL_STREAMS.get(str(causal.get("name")) if isinstance(causal, dict) else "", SELF_FORCING_LOOP)


def _causal_spec(ctx: Context, v: Version) -> VideoSpec:
    s = ctx.settings
    return causal_streams(v.manifest).spec(v.manifest, v.version, s.video_max_sessions, s.latent_dtype)


def _causal_engine(ctx: Context, v: Version) -> StreamEngine:
    s = ctx.settings
    make = causal_streams(v.manifest).engine
    return make(v.folder, s.video_max_sessions, s.latent_device, s.latent_dtype, v.version, s.prompt_cache_bytes)


def _causal_probes(s: Settings, manifest: dict[str, Any]) -> ProbeSet | None:
    """The video gate's probe streams, each as long as `video_gate_frames` or the model's stream bound if shorter."""
    if not s.video_gate_streams:
        return None
    bound = causal_streams(manifest).spec(manifest, "gate", 1, s.latent_dtype).max_frames
    frames = s.video_gate_frames if bound is None else min(s.video_gate_frames, bound)
    return named_probes(manifest, "shapes-motion", s.video_gate_streams, frames)


CAUSAL_VIDEO: Kind[StreamEngine] = Kind(
    serves="streams",
    runtime=lambda s: f"causal-video-torch-{s.latent_dtype}",
    spec=_causal_spec,
    engine=_causal_engine,
    probes=_causal_probes,
    render=render_streams,
)


# -- diffusers-video: users' imported few-step bidirectional Wan students (a clip per session) -----------------
def _clip_spec(ctx: Context, v: Version) -> VideoSpec:
    s = ctx.settings
    return clip_video_spec(v.manifest, v.version, s.video_max_sessions, s.latent_dtype)


def _clip_engine(ctx: Context, v: Version) -> WanClipEngine:
    s = ctx.settings
    args = (v.folder, s.video_max_sessions, s.latent_device, s.latent_dtype, v.version)
    return WanClipEngine(*args, prompt_cache_bytes=s.prompt_cache_bytes)


def _clip_probes(s: Settings, manifest: dict[str, Any]) -> ProbeSet | None:
    """The video gate's probe clips: the longest clip the VAE makes within `video_gate_frames` and the model's bound
    (1 + 4k pixel frames)."""
    if not s.video_gate_streams:
        return None
    video = ClipVideo.from_manifest(manifest)
    most = max(1, min(s.video_gate_frames, video.max_pixel_frames))
    frames = most - (most - 1) % video.temporal
    return named_probes(manifest, "shapes-motion", s.video_gate_streams, frames)


CLIP_VIDEO: Kind[StreamEngine] = Kind(
    serves="streams",
    runtime=lambda s: f"clip-video-torch-{s.latent_dtype}",
    spec=_clip_spec,
    engine=_clip_engine,
    probes=_clip_probes,
    render=render_streams,
)


KINDS: dict[str, Kind[Any]] = {
    "image": IMAGE,
    "video": VIDEO,
    "diffusers": DIFFUSERS,
    "diffusers-causal-video": CAUSAL_VIDEO,
    "diffusers-video": CLIP_VIDEO,
}
"""Manifest kind → how it is served."""


def runtime_of(registry: Registry, settings: Settings, model: str) -> str:
    """The runtime of the gate verdicts that decide which of `model`'s versions were refused, from its kind (the
    manifest of its promoted, else newest, version): what a rollback must skip is what the serving processes
    of that kind refused. Image's runtime when no manifest reads."""
    try:
        versions = [v for v in (registry.promoted(model),) if v] + list(reversed(registry.versions(model)))
    except FewstepError:
        versions = list(reversed(registry.versions(model)))
    for version in versions:
        try:
            kind = KINDS.get(str(registry.manifest(model, version).get("kind")))
        except FewstepError:
            continue
        if kind is not None:
            return kind.runtime(settings)
    return IMAGE.runtime(settings)
