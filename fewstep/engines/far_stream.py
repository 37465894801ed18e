"""AnyFlow FAR students streamed: many sessions, chunk by chunk, every session at its own chunk and step count.

A `StreamEngine` over an imported `AnyFlowFARPipeline` (`kind: "diffusers-causal-video"`, family `anyflow-far`:
the version's folder holds the pipeline's components and a manifest with the FAR family, `anyflow_far.FARFamily`).
It serves each session as the pipeline samples a clip (`models.anyflow_far`: chunks of the transformer's partition
made one after another, each in `steps` flow-map steps, the finished ones seen through the key/value cache), on the
other causal students' terms (`engines.wan_stream`): the same WebSocket, `open` / `steer` / `end` from any thread,
one `advance` per step boundary for every session at once.

What a session is here:

* a `FARSession` of the runner (its prompt, seed, step count, chunk, step, clean latents and cache rows) and a
  `StreamDecoder` of its own on the shared VAE. Nothing is preallocated per session: a session's cache is the
  rows of the buffer its last cache step wrote (the whole history is encoded again after every chunk, as the
  pipeline does), so `capacity` only bounds how many are open.
* its **step count**, any of the family's (`step_counts`: the flow map is one checkpoint for any count); sessions at
  different step counts, chunks and steps share the boundary's calls (`FARRunner.step` groups the sessions at one
  chunk into one transformer call, each row at its own timesteps).
* a **frame count** in pixel frames, at most the partition's worth (81 for the released 21 latent frames: a clip is
  as long as its partition; the model has no rolling window to stream past it). The session runs the partition's
  first chunks that cover the count (no cache step after its last), and its last chunk's frames past the count are
  dropped. A chunk's pixel frames leave at the boundary that finished it, all together and in order: 1 + 4 (F − 1)
  for the first chunk of F latent frames, 4 F for each later one (the VAE's temporal factor).

**Prompts.** Encoded by the version's UMT5 encoder as the pipeline encodes them (`PromptEncoder`, shared with the
Wan students: cleaned, padded to the manifest's length, the states past the prompt's tokens zeroed), cached within
a byte budget. The pipeline has no prompt switch (new `prompt_embeds` from its step-end callback reach its cache
steps only; its denoising calls keep the embeddings made before its loop), so a `steer` takes effect from the next
chunk: the chunk in progress (or, between chunks, the next one) keeps its prompt; the cache step after it, which
encodes the whole history again, and every later chunk take the new one, so a chunk always attends to a history
encoded under its own prompt (`FARRunner.switch`). `Session.prompt` changes when the switch is taken.

Every noise draw is a function of (seed, chunk) (`anyflow_far.chunk_noise`; the flow-map steps draw nothing), so a
session's frames are the same whatever other sessions share its calls, and equal `AnyFlowFARPipeline`'s video for
the same prompt, step count and starting noise (`tests/engines/test_far_stream.py`).

A session whose finished chunk or decoded frames are not finite fails alone (`Session.error`, ended): rows never mix
(attention, the cache and the decoder are per row), so the sessions beside it go on.

Device and dtype: the networks run on `device` in `dtype` (float32 on CPU is what the tests check; bfloat16 on CUDA
is the served configuration at Wan sizes, built the same way and awaiting a GPU check). The transformer's attention
is diffusers' flex-attention processor, eager (no `torch.compile`).

Thread-safety: `open`, `steer` and `end` may be called from any thread; `advance` from one driver thread. One lock
orders the sessions' state; prompts are encoded outside it (under the encoder's own lock).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fewstep.engines.base import Frame, Session, StreamRequest, stream_alone
from fewstep.engines.specs import VideoSpec
from fewstep.engines.wan_stream import (
    KIND,
    PromptEncoder,
    WanSessions,
    WanVideo,
    check_layout,
    load_component,
    video_fields,
)
from fewstep.errors import CheckpointError, limit_error
from fewstep.models import lazy
from fewstep.models.anyflow_far import FARFamily, FARRunner, FARSession
from fewstep.models.pipelines import postprocess
from fewstep.models.wan_vae import StreamDecoder, decode_streams

COMPONENTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "transformer": ("diffusers", "AnyFlowFARTransformer3DModel", ("AnyFlowFARTransformer3DModel",)),
    "vae": ("diffusers", "AutoencoderKLWan", ("AutoencoderKLWan",)),
    "text_encoder": ("transformers", "UMT5EncoderModel", ("UMT5EncoderModel",)),
    "tokenizer": ("transformers", "T5TokenizerFast", ("T5TokenizerFast", "T5Tokenizer")),
}
"""Each component: the library, its default class, and the classes a manifest may name (a manifest is untrusted)."""
SCHEDULER = "FlowMapEulerDiscreteScheduler"


@dataclass(frozen=True, kw_only=True)
class FARVideo(WanVideo):
    """A FAR student's manifest, read (`WanVideo`, and its family); `max_frames` is the partition's sum."""

    family: FARFamily

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> FARVideo:
        """CheckpointError naming what is wrong when the manifest is not a FAR student's."""
        where = cls.named(manifest, KIND)
        try:
            family = FARFamily.from_dict(manifest.get("causal"))
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from e
        spec = cls(name=where, family=family, **video_fields(manifest, where))
        if spec.max_frames != family.max_frames:
            raise CheckpointError(
                f"{where}: `video.max_frames` must be the chunk partition's {family.max_frames} latent frames. "
                f"Given: {spec.max_frames}"
            )
        return spec

    def partition_for(self, frames: int) -> tuple[int, ...]:
        """The partition's first chunks a stream of `frames` pixel frames runs."""
        return self.family.chunks_for(1 + math.ceil((frames - 1) / self.temporal))


def far_video_spec(manifest: dict[str, Any], version: str, capacity: int, dtype: str = "float32") -> VideoSpec:
    """The spec of a FAR student from its manifest alone (a gateway that runs no engine builds the same): the
    family's step counts and default; `max_frames` in pixel frames; every chunk sees the whole history (no sink,
    the window is the clip)."""
    video = FARVideo.from_manifest(manifest)
    f = video.family
    return video.spec(version, capacity, dtype, f.step_counts, f.default_steps, "an AnyFlow FAR student")


@dataclass(eq=False)
class _Stream:
    """The engine's state of one session."""

    far: FARSession
    decoder: StreamDecoder
    pending: tuple[str, torch.Tensor] | None = None
    """A steer not yet handed to the runner: its prompt and embeddings."""
    switching: str | None = None
    """The prompt the runner takes at the end of the chunk in progress."""


class FARStreamEngine(WanSessions):
    """Serves one AnyFlow FAR student version to up to `capacity` concurrent sessions (a `StreamEngine`)."""

    def __init__(
        self,
        folder: Path,
        capacity: int,
        device: str = "cpu",
        dtype: str = "float32",
        version: str | None = None,
        prompt_cache_bytes: int = 256 << 20,
    ) -> None:
        super().__init__(folder, capacity, device, dtype, version, prompt_cache_bytes, far_video_spec)
        self.video = FARVideo.from_manifest(self.manifest)
        self.family = self.video.family
        self.runner: FARRunner | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the transformer, VAE, text encoder, tokenizer and scheduler the manifest names (safetensors only, the
        classes checked) and check them against the manifest."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        parts = {key: load_component(self.folder, self.manifest, key, self.device, self.torch_dtype, COMPONENTS)
                 for key in COMPONENTS}  # fmt: skip
        self._check(parts["transformer"].config, parts["vae"].config)
        scheduler = self._scheduler()
        self.runner, self.vae = FARRunner(parts["transformer"], scheduler), parts["vae"]
        self.prompts = PromptEncoder(
            parts["tokenizer"], parts["text_encoder"], self.video.text_length, self._cache_bytes
        )

    def _scheduler(self) -> Any:
        path = self.folder / "scheduler"
        try:
            config = lazy.attr("diffusers", SCHEDULER).load_config(str(path), local_files_only=True)
            if config.get("_class_name") != SCHEDULER:
                raise ValueError(f"its class is {str(config.get('_class_name'))[:60]!r}")
            return lazy.attr("diffusers", SCHEDULER).from_config(config)
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"{self.folder.name}: the scheduler is not a {SCHEDULER} ({e})") from e

    def _check(self, transformer: Any, vae: Any) -> None:
        """CheckpointError when the components disagree with the manifest (latent layout, partition, frame size)."""
        v, f = self.video, self.family
        check_layout(self.folder.name, transformer, vae, v)
        partition = {
            "chunk partition": (tuple(transformer.chunk_partition), f.chunk_partition),
            "full chunk limit": (int(transformer.full_chunk_limit), f.full_chunk_limit),
        }
        for what, (net, manifest) in partition.items():
            if net != manifest:
                raise CheckpointError(
                    f"{self.folder.name}: the {what} of the transformer ({net}) and the manifest ({manifest}) differ"
                )
        compressed = int(transformer.compressed_patch_size[1])
        h, w = v.latent
        if h % compressed or w % compressed or max(h // v.patch[1], w // v.patch[2]) > transformer.rope_max_seq_len:
            raise CheckpointError(
                f"{self.folder.name}: the latent frame {h}×{w} must be a multiple of the compressed patch "
                f"{compressed} with at most {transformer.rope_max_seq_len} patches a side"
            )

    def warmup(self) -> None:
        """One session over the first two chunks at the default steps (the text encoder, a denoising step without
        and with the cache, a cache step, the VAE's first frames), so the first session pays no first-call costs;
        GenerationFailed when its frames are not finite."""
        frames = self.video.pixel_frames(sum(self.family.chunk_partition[:2]))
        stream_alone(self, StreamRequest("warm-up", frames, self.family.default_steps, 0))

    def _drop(self) -> None:
        self.runner = None

    def _loaded(self) -> tuple[FARRunner, PromptEncoder]:
        if self.runner is None or self.prompts is None:
            raise RuntimeError("engine not loaded")
        return self.runner, self.prompts

    # -- sessions ---------------------------------------------------------------------------------
    def open(self, request: StreamRequest) -> Session:
        """A new session; `Overloaded` when `capacity` are open. Its steps must be one of the family's counts, its
        seed in range, its frames from 1 to the partition's (`InvalidRequest`)."""
        self._spec.check(request)
        limit = self.video.max_pixel_frames
        if not 1 <= request.frames <= limit:
            raise limit_error("frames", f"between 1 and {limit} (the model's stream bound)", request.frames)
        runner, prompts = self._loaded()
        self._room()
        embeds = prompts(request.prompt)  # outside the lock: the text encoder is the slow part
        h, w = self.video.latent

        def state(_slot: int) -> _Stream:
            far = runner.start(embeds, request.seed, request.steps, h, w, self.video.partition_for(request.frames))
            return _Stream(far, StreamDecoder(self.vae))

        return self._admit(request, state)

    def steer(self, session: Session, prompt: str) -> None:
        """Change the prompt from the end of the session's chunk in progress on (see the module docstring); a later
        steer before then replaces it."""
        _, prompts = self._loaded()
        embeds = prompts(prompt)
        with self._lock:
            session.state.pending = (prompt, embeds)

    # -- one step boundary ------------------------------------------------------------------------
    def advance(self, sessions: list[Session]) -> list[Frame]:
        """One flow-map step for each open, unfinished session (the sessions at one chunk in one transformer call),
        the cache steps of the chunks that finished, and their decode: their pixel frames, each chunk's together and
        in order. A session whose finished chunk or frames are not finite fails alone (`Session.error`, ended)."""
        runner, _ = self._loaded()
        with self._lock:
            live = [s for s in sessions if not s.closed and not s.finished]
            if not live:
                return []
            for s in live:
                st: _Stream = s.state
                if st.pending is not None:
                    text, embeds = st.pending
                    runner.switch(st.far, embeds)
                    st.pending, st.switching = None, text
            chunks = runner.step([s.state.far for s in live])
            done = []
            for s, latents in zip(live, chunks, strict=True):
                if latents is None:
                    continue
                st = s.state
                if st.switching is not None:
                    s.prompt, st.switching = st.switching, None
                if bool(torch.isfinite(latents).all()):
                    done.append((s, latents))
                else:
                    self._fail(s, "a finished chunk is not finite")
            if not done:
                return []
            pixels = decode_streams([s.state.decoder for s, _ in done], [latents for _, latents in done])
            out: list[Frame] = []
            for (s, _), frames in zip(done, pixels, strict=True):
                if not bool(torch.isfinite(frames).all()):
                    self._fail(s, "a decoded frame is not finite")
                    continue
                for image in postprocess(frames[: s.request.frames - s.frame].float().cpu()):
                    out.append(Frame(s, s.frame, image))
                    s.frame += 1
            return out
