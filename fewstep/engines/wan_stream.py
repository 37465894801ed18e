"""Causal Wan students streamed: many sessions, one preallocated key/value cache, frames a block at a time.

A `StreamEngine` over an imported causal Wan student (`kind: "diffusers-causal-video"`: the version's folder holds
WanPipeline's components and a manifest naming the student's family, `models.causal_families`). It serves each
session the way the student was trained to sample (the Self-Forcing loop, `models.wan_causal`), and serves it on the
toy video engine's terms (`engines.video`): the same WebSocket, `open` / `steer` / `end` from any thread, one
`advance` per step boundary for every session at once.

What a session is here:

* a **slot** of the `CausalWan` runner's cache (`capacity` slots, allocated at load, never resized) and a
  **`StreamDecoder`** of its own on the shared VAE;
* a **block** of latent frames in progress (`BlockState`), `family.steps` denoising steps long. `advance` moves
  every session's block one step in one batched network call, whatever block and step each is at; the blocks that
  took their last step are written into their slots in one more call, decoded in batched VAE calls, and their
  pixel frames leave together, in order, in that same `advance`: 1 + 4 (F − 1) pixel frames for the stream's first
  block of F latent frames, 4 F for each later one (the VAE's temporal factor). A frame's index is its pixel
  frame's index in the stream.
* for a `rolling` family (Rolling Forcing, `models.wan_rolling`), the block in progress is the session's **window**
  of blocks, kept for the whole stream: each `advance` is one call of it (every block one step on), the first block
  finishes once the window has filled (`steps` boundaries), one block a boundary after that, and the stream ends
  by draining the window (its length in blocks is fixed at `open` by the frame count).
* a **frame count** asked for in pixel frames, at most the manifest's `video.max_frames` latent frames' worth (whole
  blocks: `CausalVideo.max_pixel_frames`); the last block's frames past the count are dropped.

Every session takes the family's step count: `steps` is the family's list's length, and no other count is served
(the students were distilled for their list; a shorter list would be another model). The step count is not a
per-session choice here, as it is for the toy student.

**Prompts.** A prompt is encoded by the version's UMT5 encoder as WanPipeline encodes it (`PromptEncoder`: cleaned,
padded to the manifest's length, the embeddings past the prompt's tokens zeroed), cached per prompt within a byte
budget, then turned into the cross-attention keys and values of every layer (`CausalWan.prompt`). A `steer` takes
effect from the session's next block (the block in progress keeps its prompt), by the family's policy: `swap` (the
new prompt's keys and values from then on) or `recache` (LongLive: the frames of the attention window encoded
again, clean, with the new prompt, from the session's last clean latents, which the engine keeps for it); a rolling
window takes the new prompt for all its blocks from the boundary after its next finished block.

Every noise draw is a function of (seed, block, step) (`CausalFamily.noise`), so a session's frames are the same
whatever other sessions share its batches, and they equal the whole-clip decode of the stream the runner's
reference computes with no cache (`tests/engines/test_wan_stream.py`).

Device and dtype: the networks and the cache run on `device` in `dtype` (float32 on CPU is what the tests check;
bfloat16 on CUDA is the served configuration at Wan sizes, built the same way and awaiting a GPU check). The VAE
decodes in the same dtype.

Thread-safety: `open`, `steer` and `end` may be called from any thread (the WebSocket handlers); `advance` from one
driver thread. One lock orders the sessions' state; prompts are encoded outside it (under the encoder's own lock),
so a new session's prompt does not wait for a step.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from fewstep.engines.base import Frame, Session, StreamRequest, stream_alone
from fewstep.engines.specs import VideoSpec
from fewstep.errors import CheckpointError, GenerationFailed, Overloaded, limit_error
from fewstep.models import lazy
from fewstep.models.causal_families import MAX_STREAM_FRAMES, CausalFamily, Sampling
from fewstep.models.checkpoint import MAX_SIDE, read_manifest
from fewstep.models.pipelines import dtype_of, postprocess
from fewstep.models.wan_causal import BlockState, CausalWan, PromptKV
from fewstep.models.wan_rolling import RollingWan
from fewstep.models.wan_vae import StreamDecoder, decode_streams

log = logging.getLogger("fewstep.engines")

KIND = "diffusers-causal-video"
"""The manifest kind of an imported causal Wan student."""
COMPONENTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "transformer": ("diffusers", "WanTransformer3DModel", ("WanTransformer3DModel",)),
    "vae": ("diffusers", "AutoencoderKLWan", ("AutoencoderKLWan",)),
    "text_encoder": ("transformers", "UMT5EncoderModel", ("UMT5EncoderModel",)),
    "tokenizer": ("transformers", "T5TokenizerFast", ("T5TokenizerFast", "T5Tokenizer")),
}
"""Each component: the library, its default class, and the classes a manifest may name (a manifest is untrusted)."""
MAX_TEXT_TOKENS = 4096
"""Longest padded prompt a manifest may ask for (Wan's is 512)."""
PRECISIONS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
RUNNERS: dict[Sampling, type[CausalWan]] = {"block": CausalWan, "rolling": RollingWan}
"""The runner of each way a family samples (`CausalFamily.sampling`)."""


@dataclass(frozen=True, kw_only=True)
class WanVideo:
    """What a Wan engine reads from a version's manifest besides its family (checked: a manifest is untrusted): the
    served frame size and rate, the bound `max_frames` in latent frames, the latent layout and the prompts' padded
    length (`video_fields`)."""

    name: str
    height: int
    width: int
    fps: float
    max_frames: int
    channels: int
    spatial: int
    temporal: int
    patch: tuple[int, int, int]
    text_length: int

    @staticmethod
    def named(manifest: dict[str, Any], kind: str) -> str:
        """The manifest's name as messages show it; CheckpointError when its kind is not `kind`."""
        where = str(manifest.get("name", "?"))[:64]
        if manifest.get("kind") != kind:
            raise CheckpointError(f"{where}: kind {str(manifest.get('kind'))[:40]!r} is not {kind!r}")
        return where

    @property
    def latent(self) -> tuple[int, int]:
        """A latent frame's (height, width)."""
        return self.height // self.spatial, self.width // self.spatial

    def pixel_frames(self, latent_frames: int) -> int:
        """Pixel frames `latent_frames` latent frames decode to, from the video's start."""
        return 0 if latent_frames < 1 else 1 + self.temporal * (latent_frames - 1)

    @property
    def max_pixel_frames(self) -> int:
        """The most pixel frames one video may ask for."""
        return self.pixel_frames(self.max_frames)

    def spec(
        self,
        version: str,
        capacity: int,
        dtype: str,
        steps: tuple[int, ...],
        default_steps: int,
        student: str,
        sink: int = 0,
        window: int | None = None,
        frame_step: int = 1,
    ) -> VideoSpec:
        """The `VideoSpec` of this model on torch in `dtype`: `steps` served, `max_frames` in pixel frames, `sink` and
        `window` in latent frames (the window: frames a frame attends to; None: the whole bound); `student` names it
        in the reason it has no hybrid."""
        return VideoSpec(
            model=self.name,
            version=version,
            step_counts=steps,
            default_steps=default_steps,
            size=f"{self.width}x{self.height}",
            backend="torch",
            precision=PRECISIONS.get(dtype, dtype),
            capacity=capacity,
            sink=sink,
            window=self.max_frames if window is None else window,
            max_frames=self.max_pixel_frames,
            fps=self.fps,
            frame_step=frame_step,
            hybrid=False,
            hybrid_reason=f"{student} draws every frame itself",
        )


@dataclass(frozen=True, kw_only=True)
class CausalVideo(WanVideo):
    """A causal Wan student's manifest, read (`WanVideo`, and its family)."""

    family: CausalFamily

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> CausalVideo:
        """CheckpointError naming what is wrong when the manifest is not a causal Wan student's."""
        where = cls.named(manifest, KIND)
        causal = manifest.get("causal")
        if not isinstance(causal, dict):
            raise CheckpointError(f"{where}: manifest has no causal family")
        family = CausalFamily.from_dict(causal)
        spec = cls(name=where, family=family, **video_fields(manifest, where))
        if spec.max_frames < family.block_frames:
            raise CheckpointError(f"{where}: `video.max_frames` is shorter than one block of {family.block_frames}")
        return spec

    @property
    def max_pixel_frames(self) -> int:
        """The most pixel frames a stream may ask for: the whole blocks within `max_frames`."""
        return self.pixel_frames(self.max_frames // self.family.block_frames * self.family.block_frames)

    def blocks_for(self, frames: int) -> int:
        """Blocks a stream of `frames` pixel frames takes."""
        latent = 1 + math.ceil((frames - 1) / self.temporal)
        return math.ceil(latent / self.family.block_frames)


def video_fields(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    """A Wan video manifest's `video` and `text` sections (a causal student's, a clip student's), checked (a
    manifest is untrusted; CheckpointError naming the field): the frame's `height` and `width` (multiples of the
    VAE's factor × the patch), `fps`, the bound `max_frames` in latent frames, the latent layout (`channels`,
    `spatial` and `temporal` factors, the transformer's `patch`) and the prompts' padded `text_length`."""
    try:
        video, text = manifest["video"], manifest["text"]
        latent = video["latent"]
        lengths = text["lengths"]
        if not isinstance(lengths, list) or len(lengths) != 1:
            raise ValueError("`text.lengths` must list one length (one tokenizer)")
        patch = tuple(latent["patch"])
        values = {
            "height": video["height"],
            "width": video["width"],
            "max_frames": video["max_frames"],
            "channels": latent["channels"],
            "spatial": latent["spatial"],
            "temporal": latent["temporal"],
            "text_length": lengths[0],
        }
        fps = video["fps"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: manifest has no valid `video` and `text` sections ({e})") from e
    bounds = {
        "height": MAX_SIDE,
        "width": MAX_SIDE,
        "max_frames": MAX_STREAM_FRAMES,
        "channels": 1024,
        "spatial": 64,
        "temporal": 16,
        "text_length": MAX_TEXT_TOKENS,
    }
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bounds[key]:
            raise CheckpointError(f"{where}: manifest's `{key}` must be an integer from 1 to {bounds[key]}")
    if len(patch) != 3 or not all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 8 for p in patch):
        raise CheckpointError(f"{where}: manifest's `video.latent.patch` must be 3 integers from 1 to 8")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 240:
        raise CheckpointError(f"{where}: manifest's `video.fps` must be a number in (0, 240]")
    for side, cells in (("height", patch[1]), ("width", patch[2])):
        multiple = values["spatial"] * cells
        if values[side] % multiple:
            raise CheckpointError(f"{where}: the frame's {side} must be a multiple of {multiple}")
    return {**values, "fps": float(fps), "patch": (patch[0], patch[1], patch[2])}


def causal_video_spec(manifest: dict[str, Any], version: str, capacity: int, dtype: str = "float32") -> VideoSpec:
    """The spec of a causal Wan student from its manifest alone (a gateway that runs no engine builds the same).
    One step count, the family's; `max_frames` in pixel frames; `sink` and `window` in latent frames (the window:
    frames a block attends to, itself and the sink included; a full-causal family's is the stream bound)."""
    video = CausalVideo.from_manifest(manifest)
    f = video.family
    return video.spec(
        version, capacity, dtype, (f.steps,), f.steps, "a causal Wan student", f.sink, f.span(video.max_frames)
    )


# -- components -------------------------------------------------------------------------------------
class Layout(Protocol):
    """A Wan version's latent layout, as its manifest gives it."""

    @property
    def channels(self) -> int: ...

    @property
    def spatial(self) -> int: ...

    @property
    def temporal(self) -> int: ...

    @property
    def patch(self) -> tuple[int, int, int]: ...


def load_component(
    folder: Path,
    manifest: dict[str, Any],
    key: str,
    device: str,
    torch_dtype: torch.dtype,
    components: dict[str, tuple[str, str, tuple[str, ...]]] = COMPONENTS,
) -> Any:
    """Component `key` of the Wan version in `folder`, of the class its manifest names (one of `components`' for
    it, default `COMPONENTS`: a manifest is untrusted), safetensors only, on `device` in `torch_dtype` (a tokenizer
    as it is). CheckpointError when it does not load."""
    library, default, allowed = components[key]
    pipe = manifest.get("pipeline") or {}
    name = (pipe.get("components") or {}).get(key, default)
    if name not in allowed:
        raise CheckpointError(f"{key} class {str(name)[:60]!r} is not one a Wan student takes ({allowed})")
    cls = lazy.attr(library, name)
    path = str(folder / key)
    try:
        if key == "tokenizer":
            return cls.from_pretrained(path, local_files_only=True)
        variant = (pipe.get("variants") or {}).get(key)
        kw = {"torch_dtype": torch_dtype, "use_safetensors": True, "local_files_only": True}
        module = cls.from_pretrained(path, variant=variant, **kw)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder.name}: {key} does not load ({type(e).__name__}: {e})") from e
    return module.to(device).eval().requires_grad_(False)


def check_layout(where: str, transformer: Any, vae: Any, layout: Layout) -> None:
    """CheckpointError when the transformer's and the VAE's configs disagree with the manifest's latent layout."""
    found = {
        "latent channels": (int(transformer.in_channels), int(vae.z_dim), layout.channels),
        "patch": (tuple(transformer.patch_size), tuple(transformer.patch_size), layout.patch),
        "spatial factor": (int(vae.scale_factor_spatial), int(vae.scale_factor_spatial), layout.spatial),
        "temporal factor": (int(vae.scale_factor_temporal), int(vae.scale_factor_temporal), layout.temporal),
    }
    for what, (net, decoder, manifest) in found.items():
        if not net == decoder == manifest:
            raise CheckpointError(
                f"{where}: the {what} of the transformer ({net}), the VAE ({decoder}) and the manifest ({manifest}) "
                "differ"
            )
    if vae.get("patch_size") is not None:
        raise CheckpointError(f"{where}: a patchified VAE (Wan 2.2's) is not a Wan 2.1 student's")


# -- prompts -----------------------------------------------------------------------------------------
def _clean(prompt: str) -> str:
    """The prompt as WanPipeline cleans it before tokenizing (`pipeline_wan.prompt_clean`)."""
    return str(lazy.attr("diffusers.pipelines.wan.pipeline_wan", "prompt_clean")(prompt))


class PromptEncoder:
    """Prompt embeddings (1, length, text_dim) as WanPipeline's `encode_prompt` makes them (cleaned, padded to
    `length`, truncated, the encoder's states past the prompt's tokens zeroed), in the encoder's dtype, on its
    device. Least recently used prompts leave once the cache holds more than `cache_bytes`. Thread-safe: one
    lock around the tokenizer (a fast tokenizer's padding state is not safe to share between threads) and the
    encoder."""

    def __init__(self, tokenizer: Any, encoder: Any, length: int, cache_bytes: int) -> None:
        self.tokenizer, self.encoder, self.length, self.budget = tokenizer, encoder, length, cache_bytes
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @torch.inference_mode()
    def __call__(self, prompt: str) -> torch.Tensor:
        with self._lock:
            if prompt in self._cache:
                self._cache.move_to_end(prompt)
                return self._cache[prompt]
            batch = self.tokenizer(
                [_clean(prompt)],
                padding="max_length",
                max_length=self.length,
                truncation=True,
                add_special_tokens=True,
                return_attention_mask=True,
                return_tensors="pt",
            )
            device = self.encoder.device
            mask = batch.attention_mask.to(device)
            states = self.encoder(batch.input_ids.to(device), mask).last_hidden_state
            states = states * mask.gt(0)[..., None].to(states.dtype)
            self._cache[prompt] = states
            self._bytes += states.numel() * states.element_size()
            while self._cache and self._bytes > self.budget:
                _, dropped = self._cache.popitem(last=False)
                self._bytes -= dropped.numel() * dropped.element_size()
            return states

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self._bytes = 0


# -- sessions ----------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Stream:
    """The engine's state of one session."""

    slot: int
    decoder: StreamDecoder
    prompt: PromptKV
    latent_frames: int = 0
    """Latent frames finished (and written into the slot)."""
    block: BlockState | None = None
    """The block in progress; None between blocks."""
    pending: tuple[str, PromptKV] | None = None
    """A new prompt, taken when the next block starts."""
    clean: list[torch.Tensor] = field(default_factory=list)
    """A `recache` family's last clean latent blocks (C, F, h, w), enough to cover its attention span."""


class WanSessions:
    """What the Wan engines share (`WanStreamEngine`, `WanClipEngine`, `FARStreamEngine`): the manifest and the spec
    made from it, up to `capacity` open sessions each holding one of `capacity` slots (the lowest free first), the
    prompt encoder and the VAE once loaded, and the `StreamEngine` calls that are the same for all of them (`spec`,
    `capacity`, `active`, `end`, `close`). A subclass loads its network, says how a session starts (`_admit`'s
    state) and steps them."""

    def __init__(
        self,
        folder: Path,
        capacity: int,
        device: str,
        dtype: str,
        version: str | None,
        prompt_cache_bytes: int,
        spec: Callable[[dict[str, Any], str, int, str], VideoSpec],
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1. Given: {capacity}")
        self.folder, self.manifest, self.device = folder, read_manifest(folder), device
        self.torch_dtype = dtype_of(dtype)
        self._spec = spec(self.manifest, version or str(self.manifest.get("version", "1")), capacity, dtype)
        self._cache_bytes = prompt_cache_bytes
        self.vae: Any = None
        self.prompts: PromptEncoder | None = None
        self._lock = threading.Lock()
        self._free = list(range(capacity))
        self._slots: dict[Session, int] = {}

    @property
    def spec(self) -> VideoSpec:
        return self._spec

    @property
    def capacity(self) -> int:
        return self._spec.capacity

    @property
    def active(self) -> int:
        return len(self._slots)

    def _room(self) -> None:
        """`Overloaded` when every slot is taken: asked before a session's slow set-up (its prompt's encoding); the
        check under the lock in `_admit` is the one that counts."""
        if not self._free:
            raise self._full()

    def _full(self) -> Overloaded:
        return Overloaded(f"all {self.capacity} video sessions are taken (`video_max_sessions`)", 2.0)

    def _admit(self, request: StreamRequest, state: Callable[[int], Any]) -> Session:
        """A new session of `request` in the lowest free slot, its state `state(slot)` (made under the lock);
        `Overloaded` when none is free."""
        with self._lock:
            if not self._free:
                raise self._full()
            slot = self._free.pop(0)
            try:
                session = Session(request, request.prompt, state=state(slot))
            except BaseException:
                self._free.insert(0, slot)
                raise
            self._slots[session] = slot
        return session

    def end(self, session: Session) -> None:
        """Free the session's slot now; a later `advance` skips it."""
        with self._lock:
            self._release(session)

    def _release(self, session: Session) -> None:
        """Close `session` and free its slot (under the lock; once)."""
        if session.closed:
            return
        session.closed = True
        if (slot := self._slots.pop(session, None)) is not None:
            self._free.append(slot)
            self._free.sort()

    def _fail(self, session: Session, why: str) -> None:
        """End `session` as failed alone (under the lock): its `error` says why; its neighbours go on."""
        session.error = GenerationFailed(f"generation failed: {why}")
        log.warning("%s: session (seed %d) failed: %s", self.folder.name, session.request.seed, why)
        self._release(session)

    def close(self) -> None:
        """End every session and drop the networks (and whatever `_drop` holds)."""
        with self._lock:
            for s in list(self._slots):
                s.closed = True
            self._slots.clear()
            self._free = list(range(self.capacity))
            if self.prompts is not None:
                self.prompts.clear()
            self.vae, self.prompts = None, None
            self._drop()

    def _drop(self) -> None:
        """Drop the subclass's network (under the lock, at `close`)."""


class WanStreamEngine(WanSessions):
    """Serves one causal Wan student version to up to `capacity` concurrent sessions (a `StreamEngine`)."""

    def __init__(
        self,
        folder: Path,
        capacity: int,
        device: str = "cpu",
        dtype: str = "float32",
        version: str | None = None,
        prompt_cache_bytes: int = 256 << 20,
    ) -> None:
        super().__init__(folder, capacity, device, dtype, version, prompt_cache_bytes, causal_video_spec)
        self.video = CausalVideo.from_manifest(self.manifest)
        self.family = self.video.family
        self.runner: CausalWan | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the transformer, VAE, text encoder and tokenizer the manifest names (safetensors only, the classes
        checked), check them against the manifest, and allocate the cache of `capacity` slots."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        transformer = self._component("transformer")
        vae = self._component("vae")
        encoder = self._component("text_encoder")
        tokenizer = self._component("tokenizer")
        self._check(transformer.config, vae.config)
        try:
            runner = RUNNERS[self.family.sampling](
                transformer, self.family, self.capacity, self.video.max_frames, self.video.latent
            )
        except ValueError as e:
            raise CheckpointError(f"{self.folder.name}: {e}") from e
        self.runner, self.vae = runner, vae
        self.prompts = PromptEncoder(tokenizer, encoder, self.video.text_length, self._cache_bytes)

    def _component(self, key: str) -> Any:
        return load_component(self.folder, self.manifest, key, self.device, self.torch_dtype)

    def _check(self, transformer: Any, vae: Any) -> None:
        check_layout(self.folder.name, transformer, vae, self.video)

    def warmup(self) -> None:
        """One block of one session (the text encoder, a denoising step, the cache write, the VAE's first frames),
        so the first session pays no first-call costs; GenerationFailed when its frames are not finite."""
        stream_alone(
            self, StreamRequest("warm-up", self.video.pixel_frames(self.family.block_frames), self.family.steps, 0)
        )

    def _drop(self) -> None:
        self.runner = None  # and its cache

    def _loaded(self) -> tuple[CausalWan, PromptEncoder]:
        if self.runner is None or self.prompts is None:
            raise RuntimeError("engine not loaded")
        return self.runner, self.prompts

    # -- sessions ---------------------------------------------------------------------------------
    def prompt_kv(self, prompt: str) -> PromptKV:
        """`prompt`'s cross-attention keys and values in every layer (its embeddings from the prompt cache). Any
        thread, beside a running `advance`: it reads the transformer's weights and nothing of the cache."""
        runner, prompts = self._loaded()
        return runner.prompt(prompts(prompt))

    def open(self, request: StreamRequest) -> Session:
        """A new session in a free slot; `Overloaded` when all `capacity` are taken. Its steps must be the family's
        count, its seed in range, its frames from 1 to the manifest's bound (`InvalidRequest`)."""
        self._spec.check(request)
        limit = self.video.max_pixel_frames
        if not 1 <= request.frames <= limit:
            raise limit_error("frames", f"between 1 and {limit} (the model's stream bound)", request.frames)
        runner, _ = self._loaded()
        self._room()
        prompt = self.prompt_kv(request.prompt)  # outside the lock: the text encoder is the slow part

        def state(slot: int) -> _Stream:
            runner.reset(slot)
            return _Stream(slot, StreamDecoder(self.vae), prompt)

        return self._admit(request, state)

    def steer(self, session: Session, prompt: str) -> None:
        """Change the prompt from the session's next block on (the block in progress keeps its own). Steering to
        the prompt in effect changes nothing."""
        text = self.prompt_kv(prompt)
        with self._lock:
            session.state.pending = (prompt, text)

    # -- one step boundary ------------------------------------------------------------------------
    def advance(self, sessions: list[Session]) -> list[Frame]:
        """One denoising step for each open, unfinished session (one batched network call), then the cache write of
        the blocks that finished and their decode: their pixel frames, each block's together and in order. A session
        whose finished block or decoded frames are not finite fails alone (`Session.error`, ended); the others'
        rows are their own (attention, the cache and the decoder never mix rows), so they go on."""
        runner, _ = self._loaded()
        with self._lock:
            live = [s for s in sessions if not s.closed and not s.finished]
            if not live:
                return []
            for s in live:
                if s.state.block is None:
                    self._start_block(runner, s)
            results = runner.advance([s.state.block for s in live])
            done = []
            for s, x0 in zip(live, results, strict=True):
                if x0 is None:
                    continue
                if bool(torch.isfinite(x0).all()):
                    done.append((s, x0))
                else:
                    self._fail(s, "a finished block is not finite")
            if not done:
                return []
            pixels = decode_streams([s.state.decoder for s, _ in done], [x0[None] for _, x0 in done])
            out: list[Frame] = []
            for (s, x0), frames in zip(done, pixels, strict=True):
                self._finish_block(s, x0)
                if not bool(torch.isfinite(frames).all()):
                    self._fail(s, "a decoded frame is not finite")
                    continue
                kept = postprocess(frames[: s.request.frames - s.frame].float().cpu())
                for image in kept:
                    out.append(Frame(s, s.frame, image))
                    s.frame += 1
            return out

    def _start_block(self, runner: CausalWan, s: Session) -> None:
        """The session's next block at its first step, after the prompt switch waiting for it (if any)."""
        st: _Stream = s.state
        if st.pending is not None:
            text, prompt = st.pending
            st.pending = None
            if text != s.prompt:
                if self.family.prompt_switch == "recache" and st.latent_frames:
                    runner.recache(st.slot, self._clean_span(st), prompt)
                st.prompt, s.prompt = prompt, text
        blocks = self.video.blocks_for(s.request.frames)
        st.block = runner.next_block(st.slot, s.request.seed, st.prompt, blocks)

    def _clean_span(self, st: _Stream) -> torch.Tensor:
        """The clean latent frames (C, n, h, w) a `recache` switch encodes again now (`recache_span`)."""
        first, end = self.family.recache_span(st.latent_frames, self.video.max_frames)
        kept = torch.cat(st.clean, dim=1)
        held_from = st.latent_frames - kept.shape[1]
        return kept[:, first - held_from : end - held_from]

    def _finish_block(self, s: Session, x0: torch.Tensor) -> None:
        st: _Stream = s.state
        st.block = None
        st.latent_frames += x0.shape[1]
        if self.family.prompt_switch == "recache":
            st.clean.append(x0)
            span = self.family.span(self.video.max_frames)
            while sum(c.shape[1] for c in st.clean[1:]) >= span:
                st.clean.pop(0)
