"""The judge report puts each sampler's probe scores, the controls and the detail sections in one markdown text."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fewstep.evaluation.classifier import load_classifier
from fewstep.trainer.judge_report import judge_report


def blank_gray(prompts: list[str], seeds: list[int]) -> np.ndarray:
    """A sampler that ignores its prompt: a flat gray frame."""
    return np.full((len(prompts), 3, 32, 32), -0.1, dtype=np.float32)


def test_report_scores_each_sampler_after_the_real_images(checkpoints: Path) -> None:
    judge = load_classifier(checkpoints / "shapes-classifier")
    text = judge_report(judge, 0, {"student, 4 steps": blank_gray}, per_cell=6, paraphrase_seeds=1, control_images=40)
    assert "| blank (background only) | — |" in text and "| blur (σ, px) | 16 |" in text
    real = next(line for line in text.splitlines() if line.startswith("| real images | 1"))
    assert all(float(v) >= 0.8 for v in real.strip("|").split("|")[1:]), real
    # A flat gray frame is right only where the probe asks for gray, small or center: 2 of 6, 3 of 6, 1 of 9.
    assert "| student, 4 steps | 0.333 | 0.333 | 0.500 | 0.500 | 0.111 | 0.111 |" in text
    assert text.count("| expected ↓ judged → |") == 3
    assert "| a crimson disc | red circle |" in text


def test_detail_sections_are_left_out_for_an_absent_sampler(checkpoints: Path) -> None:
    judge = load_classifier(checkpoints / "shapes-classifier")
    text = judge_report(judge, 0, {"other": blank_gray}, per_cell=6, control_images=20)
    assert "| other | 0.333 |" in text and "expected ↓ judged" not in text and "crimson" not in text
