"""The judge's own report card: can the classifier fail, and what do samplers get right that it cannot see?

Written into the model card by the evaluate stage. Three parts:

* the classifier's negative controls and graded corruptions (`evaluation.controls`): no sampler involved;
* held-out attribute probes (background, size, position; `evaluation.attributes`), judged from pixels, one row
  per sampler after the real images that validate the pixel judge;
* for one sampler (the student at 4 steps by default): the probes' confusion matrices and which colour and
  shape the classifier saw for each paraphrase prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from fewstep.evaluation import attributes, controls
from fewstep.evaluation.classifier import AttributeClassifier

Sampler = Callable[[list[str], list[int]], np.ndarray]
"""(prompts, seeds) → (N, 3, 32, 32) images in [-1, 1], as `trainer.evaluate.Sampler`."""

REAL = "real images"


def batched(fn: Sampler, prompts: list[str], seeds: list[int], chunk: int = 64) -> np.ndarray:
    """`fn` over `prompts` and `seeds` in chunks of `chunk`, bounding the memory one call takes."""
    return np.concatenate([fn(prompts[i : i + chunk], seeds[i : i + chunk]) for i in range(0, len(prompts), chunk)])


def judge_report(
    judge: AttributeClassifier,
    seed: int,
    samplers: Mapping[str, Sampler],
    detail: str = "student, 4 steps",
    per_cell: int = 24,
    paraphrase_seeds: int = 4,
    control_images: int = 300,
) -> str:
    """Markdown: the controls table, the attribute-probe table (real images first, then each of `samplers`), and
    for the sampler named `detail` (skipped when absent) confusion matrices and the paraphrase confusion.

    Each sampler makes `attributes.attribute_probes(per_cell)` images (150 at the default 24), plus
    `paraphrase_seeds` × 10 for `detail`; the probes' seeds are fixed, `seed` draws the real images and the
    calibration."""
    parts = [
        "### Can the judge fail? Negative controls and corruptions",
        f"Fresh real images ({control_images}), scored against their original labels. A control should score at "
        f"most {controls.LOW} joint accuracy (chance: 0.05); a corruption should fall with strength.",
        controls.controls_markdown(controls.control_rows(judge, seed, control_images)),
    ]
    calibration = attributes.calibrate(seed)
    probes = attributes.attribute_probes(per_cell)
    prompts, seeds = [p.prompt for p in probes], [p.seed for p in probes]
    scores = {REAL: attributes.score(probes, attributes.real_images(probes, seed), calibration)}
    scores |= {
        name: attributes.score(probes, batched(fn, prompts, seeds), calibration) for name, fn in samplers.items()
    }
    parts += [
        "### Held-out attribute probes (judged from pixels)",
        f"Background, size and position words in a training phrasing and in one never used in training "
        f"({', '.join(repr(t) for t in attributes.HELDOUT_TEMPLATES)}); {len(probes)} images per row. The first "
        "row is real images of the same probes: the pixel judge's own accuracy.",
        attributes.accuracy_markdown(scores),
    ]
    if detail in samplers:
        parts.append(f"Confusion matrices, {detail} (rows: asked for, columns: judged; both phrasings):")
        parts += [f"{a}:\n\n{attributes.confusion_markdown(scores[detail], a)}" for a in attributes.ATTRIBUTES]
        p_prompts, p_seeds = attributes.paraphrase_probes(paraphrase_seeds)
        images = batched(samplers[detail], p_prompts, p_seeds)
        parts += [
            f"Paraphrases, {detail}: what the classifier saw ({paraphrase_seeds} seeds per prompt):",
            attributes.paraphrase_markdown(attributes.paraphrase_confusion(judge, p_prompts, images)),
        ]
    return "\n\n".join(parts) + "\n"
