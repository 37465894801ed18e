"""Few-step bidirectional Wan students served as clips: a session makes its whole clip, a step per `advance`.

A `StreamEngine` over an imported bidirectional Wan student (`kind: "diffusers-video"`: the version's folder holds
WanPipeline's components and a manifest naming the student's family, `models.wan_clip`). Clips are served on the
stream engines' terms, so the video WebSocket and whatever else drives a `StreamEngine` serve them unchanged:

* `open(StreamRequest(prompt, frames, steps, seed))` admits a clip: `frames` pixel frames, a count the Wan VAE
  makes (1 + 4k: 1, 5, 9, …, up to the manifest's bound; any other is refused, naming the allowed counts), `steps`
  one the family serves;
* each `advance(sessions)` takes **one** denoising step for every session given, sessions at any step and of any
  step count, one network call per latent shape (clips of one frame count share a call);
* the step that finishes a clip decodes its latents with the Wan VAE (the finished clips of one call in batched
  decoder calls, `models.wan_vae.decode_streams`) and returns **all** its frames at once, one `Frame` per pixel
  frame, in order: a client sees the clip arrive in one burst;
* `steer` is refused (a clip has one prompt); `end` frees the session's place at any time.

Every noise draw is a function of (seed, step) (`ClipFamily.noise`), so a clip is the same whatever shares its
calls (`tests/engines/test_wan_clip.py`). A session whose clip is not finite fails alone: `advance` sets its
`error`, ends it and goes on with the others.

Prompts are encoded by the version's UMT5 encoder as WanPipeline encodes them (`engines.wan_stream.PromptEncoder`),
cached within a byte budget. Device and dtype: the transformer, the VAE and the text encoder run on `device` in
`dtype`; latents are kept in float32 between steps, as WanPipeline keeps them. Thread-safety: `open` and `end` from
any thread, `advance` from one driver thread; one lock orders the sessions' state, and prompts are encoded outside
it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fewstep.engines.base import Frame, Session, StreamRequest
from fewstep.engines.specs import VideoSpec
from fewstep.engines.wan_stream import (
    PromptEncoder,
    WanSessions,
    WanVideo,
    check_layout,
    load_component,
    video_fields,
)
from fewstep.errors import CheckpointError, GenerationFailed, InvalidRequest, limit_error
from fewstep.models.pipelines import postprocess
from fewstep.models.wan_clip import ClipFamily, ClipSampler, ClipState
from fewstep.models.wan_vae import StreamDecoder, decode_streams

log = logging.getLogger("fewstep.engines")

KIND = "diffusers-video"
"""The manifest kind of an imported bidirectional Wan student."""


@dataclass(frozen=True, kw_only=True)
class ClipVideo(WanVideo):
    """A bidirectional Wan student's manifest, read (`WanVideo`, and its family); `max_frames` bounds a clip."""

    family: ClipFamily

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> ClipVideo:
        """CheckpointError naming what is wrong when the manifest is not a bidirectional Wan student's."""
        where = cls.named(manifest, KIND)
        clip = manifest.get("clip")
        if not isinstance(clip, dict):
            raise CheckpointError(f"{where}: manifest has no clip family")
        return cls(name=where, family=ClipFamily.from_dict(clip), **video_fields(manifest, where))

    def latent_frames(self, frames: int) -> int | None:
        """Latent frames a clip of `frames` pixel frames takes; None for a count the VAE cannot make or past the
        bound."""
        if not 1 <= frames <= self.max_pixel_frames or (frames - 1) % self.temporal:
            return None
        return 1 + (frames - 1) // self.temporal

    def latent_shape(self, frames: int) -> tuple[int, int, int, int]:
        latent = self.latent_frames(frames)
        assert latent is not None
        return (self.channels, latent, *self.latent)

    @property
    def allowed(self) -> str:
        """The clip lengths served, in words."""
        t, most = self.temporal, self.max_pixel_frames
        listed = ", ".join(str(1 + t * k) for k in range(min(3, self.max_frames)))
        return f"1 + {t}·k pixel frames ({listed}{', …' if self.max_frames > 3 else ''}) up to {most}"


def clip_video_spec(manifest: dict[str, Any], version: str, capacity: int, dtype: str = "float32") -> VideoSpec:
    """The spec of a bidirectional Wan student from its manifest alone (a gateway that runs no engine builds the
    same): the family's step counts, `max_frames` in pixel frames, no sink, and a window of the whole clip (every
    frame attends to every other)."""
    video = ClipVideo.from_manifest(manifest)
    f = video.family
    return video.spec(
        version, capacity, dtype, f.served, f.default_steps, "a bidirectional Wan student", frame_step=video.temporal
    )


class WanClipEngine(WanSessions):
    """Serves one bidirectional Wan student version to up to `capacity` concurrent clips (a `StreamEngine`)."""

    def __init__(
        self,
        folder: Path,
        capacity: int,
        device: str = "cpu",
        dtype: str = "float32",
        version: str | None = None,
        prompt_cache_bytes: int = 256 << 20,
    ) -> None:
        super().__init__(folder, capacity, device, dtype, version, prompt_cache_bytes, clip_video_spec)
        self.video = ClipVideo.from_manifest(self.manifest)
        self.family = self.video.family
        self.sampler: ClipSampler | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the transformer, VAE, text encoder and tokenizer the manifest names (safetensors only, the classes
        checked) and check them against the manifest."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        parts = {key: load_component(self.folder, self.manifest, key, self.device, self.torch_dtype) for key in (
            "transformer", "vae", "text_encoder", "tokenizer")}  # fmt: skip
        transformer, vae = parts["transformer"], parts["vae"]
        check_layout(self.folder.name, transformer.config, vae.config, self.video)
        rope = int(transformer.config.rope_max_seq_len)
        h, w = self.video.latent
        longest = max(self.video.max_frames, h // self.video.patch[1], w // self.video.patch[2])
        if longest > rope:
            raise CheckpointError(
                f"{self.folder.name}: the transformer's RoPE table has {rope} positions; the manifest's clips need "
                f"{longest}"
            )
        self.sampler, self.vae = ClipSampler(transformer, self.family), vae
        encoder, tokenizer = parts["text_encoder"], parts["tokenizer"]
        self.prompts = PromptEncoder(tokenizer, encoder, self.video.text_length, self._cache_bytes)

    def warmup(self) -> None:
        """A one-frame clip at every step count served (the text encoder, the network at each, the VAE), so the
        first session pays no first-call costs; GenerationFailed when one is not finite."""
        for steps in self.family.served:
            session = self.open(StreamRequest("warm-up", 1, steps, 0))
            try:
                while not session.finished and session.error is None:
                    self.advance([session])
            finally:
                self.end(session)
            if session.error is not None:
                raise GenerationFailed(f"warm-up at {steps} steps: {session.error}")

    def _drop(self) -> None:
        self.sampler = None

    def _loaded(self) -> tuple[ClipSampler, PromptEncoder]:
        if self.sampler is None or self.prompts is None:
            raise RuntimeError("engine not loaded")
        return self.sampler, self.prompts

    # -- sessions ---------------------------------------------------------------------------------
    def open(self, request: StreamRequest) -> Session:
        """A new clip session; `Overloaded` when `capacity` are open. Its steps must be a count the family serves,
        its seed in range, its frames a count the Wan VAE makes within the bound (`InvalidRequest`)."""
        self._spec.check(request)
        if self.video.latent_frames(request.frames) is None:
            raise limit_error("frames", self.video.allowed, request.frames)
        sampler, prompts = self._loaded()
        self._room()
        prompt = prompts(request.prompt)[0]  # outside the lock: the text encoder is the slow part
        state = sampler.begin(prompt, request.seed, request.steps, self.video.latent_shape(request.frames))
        return self._admit(request, lambda _slot: state)

    def steer(self, session: Session, prompt: str) -> None:
        """Refused: a clip is made from one prompt."""
        raise InvalidRequest("prompt", "a clip has one prompt: it cannot be changed once the clip is opened")

    # -- one step ---------------------------------------------------------------------------------
    def advance(self, sessions: list[Session]) -> list[Frame]:
        """One denoising step for each open, unfinished session (one network call per latent shape), then the decode
        of the clips that took their last: all their pixel frames, each clip's in order. A clip that is not finite
        fails alone (its session's `error` set, the session ended)."""
        sampler, _ = self._loaded()
        with self._lock:
            live = [s for s in sessions if not s.closed and not s.finished]
        if not live:
            return []
        sampler.advance([s.state for s in live])
        done: list[Session] = []
        for s in live:
            state: ClipState = s.state
            if not state.finished:
                continue
            if bool(torch.isfinite(state.latents).all()):
                done.append(s)
            else:
                with self._lock:
                    self._fail(s, "its latents are not finite")
        if not done:
            return []
        streams = [StreamDecoder(self.vae) for _ in done]
        pixels = decode_streams(streams, [s.state.latents[None] for s in done])
        out: list[Frame] = []
        for s, frames in zip(done, pixels, strict=True):
            if not bool(torch.isfinite(frames).all()):
                with self._lock:
                    self._fail(s, "a decoded frame is not finite")
                continue
            for index, image in enumerate(postprocess(frames.float().cpu())):
                out.append(Frame(s, index, image))
            s.frame = s.request.frames
            s.state.latents = s.state.latents[:0]  # the clip has left; its latents need not stay
        return out
