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
from fewstep.models.checkpoint import MAX_SIDE
from fewstep.models.sampling import Handoff, HybridTeacher
from fewstep.models.schedules import MAX_SEED, EditRule, FewStepSchedule, kept_steps

Api = Literal["image", "video"]
"""Which API serves a model: `POST /v1/images/generations` and jobs, or `WS /v1/video/stream`."""


@dataclass(frozen=True)
class ImageItem:
    """One image to make. `steps` counts student steps; `seed` fixes every noise draw. `width` and `height`
    (None: the model's native size), `guidance` (None: the model's default) and `negative_prompt` only for
    models that take them."""

    prompt: str
    seed: int
    steps: int
    hybrid: bool = False
    width: int | None = None
    height: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    image: str | None = None
    """An edit's starting image: a base64 PNG of exactly the item's size (the gateway decodes, bounds and
    resizes uploads; the engine decodes this trusted form). None: text to image."""
    strength: float | None = None
    """How much of an edit is made anew, in (0, 1]: the item runs the last steps of its `steps`-step list its model's
    rule keeps (`ImageSpec.run_steps`, diffusers' img2img rule), from the starting image noised to the first."""
    partials: int = 0
    """Partial images to send on the way (0–3, `partial_images`): the decoded x0 estimate after the steps
    `partial_steps` names."""


@dataclass(frozen=True)
class Sizes:
    """Sizes a model makes besides its native one: each side a multiple of `multiple` in [`low`, `high`]."""

    low: int
    high: int
    multiple: int


@dataclass(frozen=True)
class GuidanceRule:
    """How a model takes `guidance_scale`: `none` (distilled in: refused), `embedded` (an input of the network:
    [`low`, `high`]) or `cfg` (classic classifier-free guidance: [`low`, `high`], and `negative_prompt`)."""

    mode: Literal["none", "embedded", "cfg"] = "none"
    low: float = 0.0
    high: float = 0.0
    default: float = 0.0


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
    step_counts: tuple[int, ...]
    default_steps: int
    size: str
    backend: str
    precision: str
    hybrid: bool = False
    hybrid_reason: str | None = None

    def __post_init__(self) -> None:
        """CheckpointError for a native size that is not WxH within `MAX_SIDE` (manifests are untrusted: warm-up,
        the gate's probes and every request without `size` run at it)."""
        parts = self.size.split("x")
        if len(parts) != 2 or not all(p.isdigit() and len(p) <= 5 and 1 <= int(p) <= MAX_SIDE for p in parts):
            raise CheckpointError(f"native size {self.size[:40]!r} is not WxH with sides from 1 to {MAX_SIDE}")

    @property
    def steps(self) -> list[int]:
        """The step counts served, ascending."""
        return sorted(self.step_counts)

    @property
    def width(self) -> int:
        return int(self.size.split("x")[0])

    @property
    def height(self) -> int:
        return int(self.size.split("x")[1])

    def check_steps(self, steps: int, where: str = "") -> None:
        """InvalidRequest naming the step counts served when `steps` is not one of them (`where` prefixes the
        field's name, as in "requests[3].steps")."""
        if steps not in self.step_counts:
            ok = self.steps
            contiguous = len(ok) > 1 and ok == list(range(ok[0], ok[-1] + 1))
            rule = f"between {ok[0]} and {ok[-1]}" if contiguous else f"one of {ok}"
            raise limit_error(where + "steps", rule, steps)

    def _check_steps_and_seed(self, steps: int, seed: int) -> None:
        self.check_steps(steps)
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
        return {
            "model": manifest["name"],
            "step_counts": tuple(schedule.steps),
            "default_steps": schedule.default_steps,
            "size": size,
        }


@dataclass(frozen=True, kw_only=True)
class ImageSpec(Spec):
    """An image model: 1–4 step counts from its schedule, its native size (or `sizes`), how it takes guidance,
    and the hybrid if its teacher is loaded (`teacher_nfe` evaluations for the first step, then the student's)."""

    api: ClassVar[Api] = "image"
    teacher_nfe: int = 2
    """Network evaluations of the teacher's part of a hybrid item (classic CFG: 2 per teacher step)."""
    text_cost: int = 0
    """What encoding an item's prompt costs, in denoiser evaluations (`Architecture.text_cost`): counted in its
    cost, not in its `nfe`."""
    sizes: Sizes | None = None
    guidance: GuidanceRule = GuidanceRule()
    family: str | None = None
    edits: bool = True
    """Whether the model takes a starting image (`POST /v1/images/edits`) on this backend."""
    edits_reason: str | None = None
    edit_rule: EditRule = "floor"
    """How its img2img pipeline counts the steps a strength keeps (`schedules.EditRule`)."""

    def run_steps(self, item: ImageItem) -> int:
        """Steps an item really runs: all of them, or an edit's kept ones."""
        return item.steps if item.image is None else kept_steps(item.steps, item.strength or 1.0, self.edit_rule)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sizes is not None and max(self.width, self.height) > self.sizes.high:
            raise CheckpointError(f"its native size {self.size} is larger than `image_max_side` = {self.sizes.high}")

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
        """CheckpointError when the manifest has no valid schedule, native size or hybrid hand-off."""
        fields = cls._manifest_fields(manifest, f"{manifest.get('name')}:{version}")
        handoff = Handoff.from_manifest(manifest)
        return cls(
            **fields,
            version=version,
            backend=backend,
            precision=precision,
            hybrid=hybrid,
            hybrid_reason=hybrid_reason,
            teacher_nfe=HybridTeacher.NFE_PER_STEP * handoff.teacher_steps,
        )

    def validate(self, item: ImageItem) -> None:
        """InvalidRequest when this model cannot make `item`, naming the limit and the value."""
        self._check_steps_and_seed(item.steps, item.seed)
        self._check_size(item.width, item.height)
        self._check_guidance(item.guidance, item.negative_prompt)
        if item.image is not None:
            self._check_edit(item)
        if item.hybrid:
            if not self.hybrid:
                why = f" ({self.hybrid_reason})" if self.hybrid_reason else ""
                raise InvalidRequest(
                    "hybrid", f"`hybrid` needs the model's teacher, which is not loaded{why}. Given: true"
                )
            if item.steps < 2:
                raise limit_error("steps", f"between 2 and {max(self.steps)} when `hybrid` is true", item.steps)

    def _check_edit(self, item: ImageItem) -> None:
        if not self.edits:
            why = f" ({self.edits_reason})" if self.edits_reason else ""
            raise InvalidRequest("image", f"this model does not take a starting image on {self.backend}{why}")
        if item.hybrid:
            raise InvalidRequest("hybrid", "`hybrid` is for text to image; an edit starts from its image. Given: true")
        strength = item.strength
        if strength is None or not 0.0 < strength <= 1.0:
            raise limit_error("strength", "a number in (0, 1]", strength)
        if self.run_steps(item) < 1:
            raise InvalidRequest(
                "strength",
                f"`strength` × `steps` must be at least 1, or the edit keeps no step (diffusers' rule: "
                f"int(steps × strength) steps run). Given: strength {strength:g} × steps {item.steps}",
            )

    def edit_steps(self, strength: float) -> int:
        """The step count an edit at `strength` runs with when the request names none: the model's default, or
        the smallest served count that keeps a step at that strength (the default itself if none does: the
        item is then refused, naming the rule)."""
        if kept_steps(self.default_steps, strength, self.edit_rule) >= 1:
            return self.default_steps
        return next((n for n in self.steps if kept_steps(n, strength, self.edit_rule) >= 1), self.default_steps)

    def _check_size(self, width: int | None, height: int | None) -> None:
        if width is None and height is None:
            return
        given = f"{width}x{height}"
        if self.sizes is None:
            if (width, height) != (self.width, self.height):
                raise limit_error("size", f"{self.size!r} (the model's native size)", given)
            return
        r = self.sizes
        for side in (width, height):
            if side is None or not r.low <= side <= r.high or side % r.multiple:
                raise limit_error(
                    "size", f"WxH with each side a multiple of {r.multiple} in [{r.low}, {r.high}]", given
                )

    def _check_guidance(self, guidance: float | None, negative_prompt: str | None) -> None:
        g = self.guidance
        where = f" ({self.family} students have guidance distilled in)" if self.family else ""
        if guidance is not None:
            if g.mode == "none":
                raise InvalidRequest(
                    "guidance_scale", f"`guidance_scale` is not taken by this model{where}. Given: {guidance!r}"
                )
            if not g.low <= guidance <= g.high:
                raise limit_error("guidance_scale", f"between {g.low} and {g.high}", guidance)
        if negative_prompt is not None and g.mode != "cfg":
            raise InvalidRequest(
                "negative_prompt",
                f"`negative_prompt` needs classifier-free guidance, which this model does not run{where}. "
                f"Given: {negative_prompt[:40]!r}",
            )

    def nfe(self, item: ImageItem) -> int:
        """Network evaluations an item costs: its steps (twice with classic CFG), plus the teacher's extra ones
        if hybrid."""
        per_step = 2 if self.uses_cfg(item) else 1
        return self.run_steps(item) * per_step + (self.teacher_nfe - per_step if item.hybrid else 0)

    def cost(self, item: ImageItem) -> int:
        """What an item is charged against per-key limits: its evaluations and its prompt's encoding (charged even
        when the prompt cache will have it: the charge is made before the item runs)."""
        return self.nfe(item) + self.text_cost

    def uses_cfg(self, item: ImageItem) -> bool:
        """Whether the item runs classic CFG (two evaluations per step): a `cfg` model above guidance 1."""
        scale = self.guidance.default if item.guidance is None else item.guidance
        return self.guidance.mode == "cfg" and scale > 1.0


@dataclass(frozen=True, kw_only=True)
class VideoSpec(Spec):
    """A streaming video model: per-frame step counts, its frame size, its cache (sink and window), the
    sessions one process admits, and the image model that draws frame 0 (whose hybrid is the stream's)."""

    api: ClassVar[Api] = "video"
    capacity: int
    sink: int
    window: int
    first_frame: str | None = None
    max_frames: int | None = None
    """The most frames one stream of this model may ask for (a causal Wan student's stream bound); None: only the
    service's `video_max_frames` bounds it."""
    fps: float | None = None
    """The frame rate its frames are meant to play at (a clip's `seconds` → frames, its MP4's timing); None: the
    service's `video_fps`."""
    frame_step: int = 1
    """The frame counts it makes are 1 + k·`frame_step` (a bidirectional Wan clip's: 1 + 4k, its VAE's temporal
    factor); 1: any count."""

    def frames_near(self, frames: int, most: int) -> int:
        """The frame count it makes nearest to `frames` (ties: the longer one), at most `most` (when `most` allows
        one)."""
        k = max(0, round((frames - 1) / self.frame_step + 1e-9))
        while k and 1 + k * self.frame_step > most:
            k -= 1
        return 1 + k * self.frame_step

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
        """InvalidRequest when this model cannot stream `request` (at most `max_frames` frames, and at most the
        model's own bound)."""
        if self.max_frames is not None and self.max_frames < max_frames:
            max_frames = self.max_frames
        if not 1 <= request.frames <= max_frames:
            raise limit_error("frames", f"between 1 and {max_frames}", request.frames)
        if (request.frames - 1) % self.frame_step:
            rule = f"1 + {self.frame_step}·k frames (1, {1 + self.frame_step}, {1 + 2 * self.frame_step}, …)"
            raise limit_error("frames", rule, request.frames)
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
