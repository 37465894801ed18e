"""The serving gate for video versions: fixed probe streams, judged by the registry's video judge.

A video version takes sessions only after it loads, warms up and passes this gate (`service/video.py`).
The probes are `video_gate_streams` held-out clips' captions (a template never used in training), each
streamed for `video_gate_frames` frames at the model's default steps through the engine's own session
path, frame 0 from the image model it names. With the video judge (`FEWSTEP_VIDEO_GATE_JUDGE`, which
`fewstep train video` ships), their joint shape-and-colour accuracy and their motion accuracy must each
be within `FEWSTEP_GATE_TOLERANCE` of the version serving now. Without the judge only the streams'
frames must be finite. A student that stopped moving its shapes, or draws the wrong ones, is refused
before it takes a session; one that merely differs is not.

The probes are fixed (prompts, seeds, steps), so a version gets the same verdict in every process;
verdicts are kept in the registry under the flavour `video-<backend>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fewstep.engines.video import VideoEngine
from fewstep.errors import FewstepError
from fewstep.models.registry import Registry
from fewstep.service.gate import RegistryJudge, Verdict
from fewstep.service.settings import Settings

PROBE_SEED = 9_200_000
"""Seed of the probe clips and first seed of their streams (far from the trainer's evaluation seeds)."""


def probe_clips(n: int) -> tuple[list[Any], list[str]]:
    """`n` fixed held-out clips (`trainer.clips.Clip`) and their captions."""
    from fewstep.trainer import clips

    rng = np.random.default_rng([PROBE_SEED])
    targets = clips.sample_clips(rng, n)
    return targets, [clips.caption(c, rng, clips.HELDOUT_TEMPLATES) for c in targets]


def _load_video_judge(folder: Path) -> Any:
    from fewstep.trainer.video_eval import load_judge

    return load_judge(folder)


class VideoGate:
    """Streams the probes on a loaded engine and judges them against the serving version's scores."""

    def __init__(self, registry: Registry, settings: Settings) -> None:
        self.registry, self.settings = registry, settings
        self._judge = RegistryJudge(registry, settings.video_gate_judge, _load_video_judge, "video accuracy")
        self._targets, self._prompts = probe_clips(settings.video_gate_streams)

    def streams(self, engine: VideoEngine) -> np.ndarray:
        """The probe streams (N, F, 3, H, W) in [-1, 1], `engine.capacity` at a time.

        Raises FewstepError when a stream cannot be made (a non-finite frame fails inside the engine)."""
        prompts = self._prompts
        frames, steps = self.settings.video_gate_frames, engine.info.default_steps
        out: list[np.ndarray] = []
        for start in range(0, len(prompts), engine.capacity):
            batch = prompts[start : start + engine.capacity]
            sessions = [engine.open(p, frames, steps, PROBE_SEED + start + i) for i, p in enumerate(batch)]
            try:
                got: dict[int, list[np.ndarray]] = {id(s): [] for s in sessions}
                while not all(s.finished for s in sessions):
                    for f in engine.advance([s for s in sessions if not s.finished]):
                        got[id(f.session)].append(f.pixels)
            finally:
                for s in sessions:
                    engine.close(s)
            for s in sessions:
                out.append(np.stack(got[id(s)]).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0)
        video = np.stack(out)
        if not np.isfinite(video).all():
            raise FewstepError("a probe stream has non-finite pixels")
        return video

    def scores(self, engine: VideoEngine) -> dict[str, float] | None:
        """Joint and motion accuracy over every probe frame (None without a judge)."""
        video = self.streams(engine)
        judge = self._judge.get()
        if judge is None:
            return None
        from fewstep.trainer import video_judge

        window = video_judge.score_streams(judge, video, self._targets).window(0, video.shape[1])
        return {"joint_accuracy": window["joint"], "motion_accuracy": window["motion"]}

    def check(self, engine: VideoEngine, reference: dict[str, float] | None, against: str | None) -> Verdict:
        """Judge a loaded, warmed engine; `reference` is the serving version's `scores`."""
        try:
            scores = self.scores(engine)
        except FewstepError as e:
            return Verdict(False, f"probe stream failed: {e}")
        n = self.settings.video_gate_streams
        metrics: dict[str, Any] = {
            **(scores or {}),
            "streams": n,
            "frames": self.settings.video_gate_frames,
            "steps": engine.info.default_steps,
        }
        if against is not None:
            metrics["against"] = {"version": against, **(reference or {})}
        tol = self.settings.gate_tolerance
        if scores is not None and reference is not None:
            for key in ("joint_accuracy", "motion_accuracy"):
                if scores[key] < reference[key] - tol:
                    return Verdict(
                        False,
                        f"quality regression: {key.replace('_', ' ')} {scores[key]:.3f} on {n} probe streams is "
                        f"more than `gate_tolerance` = {tol} below version {against}'s {reference[key]:.3f}",
                        metrics,
                    )
        return Verdict(True, None, metrics)
