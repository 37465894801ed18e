"""`fewstep train video --quick`: a causal video teacher checkpoint that loads and streams through its cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fewstep.cli import main
from fewstep.models.checkpoint import load_checkpoint
from fewstep.models.video import VideoConfig, VideoDenoiser
from fewstep.trainer.video import TEACHER_DIR, sample_stream


def test_quick_teacher_run_writes_a_checkpoint_that_streams(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    assert main(["train", "video", "--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    manifest, state = load_checkpoint(tmp_path / TEACHER_DIR)
    assert manifest["kind"] == "video-teacher" and manifest["native_size"] == "16x16"
    assert np.isfinite(manifest["trainer"]["final_loss"])
    cfg = VideoConfig(**manifest["architecture"]["config"])
    net = VideoDenoiser(cfg)
    net.load_state_dict(state)  # strict: the manifest's architecture is the one trained
    text = net.text_kv(*encoder.encode(["a red circle moving left quickly"] * 2))
    null = net.text_kv(*encoder.encode([""] * 2))
    frames = cfg.sink + cfg.window + 3  # past the window
    video = sample_stream(net.eval(), text, null, frames, seeds=[1, 2], steps=2, guidance=3.0)
    assert video.shape == (2, frames, 3, 16, 16) and np.isfinite(video).all()
    again = sample_stream(net, text, null, frames, seeds=[1, 2], steps=2, guidance=3.0)
    assert np.array_equal(video, again)  # seeded: the same stream every time
    assert not torch.equal(torch.from_numpy(video[0]), torch.from_numpy(video[1]))
