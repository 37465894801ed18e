"""The held-out attribute probes: well formed, and a pixel judge that is right on real images of what each probe
asks for and wrong on images of something else, so that a model's low score is the model's."""

from __future__ import annotations

import string
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fewstep.evaluation import attributes, shapes
from fewstep.evaluation.classifier import load_classifier

JUDGE_FLOOR = 0.95
"""The pixel judge's least accuracy on real images, per attribute and phrasing."""


@pytest.fixture(scope="module")
def calibration() -> attributes.Calibration:
    return attributes.calibrate(seed=1)


@pytest.fixture(scope="module")
def probes() -> list[attributes.Probe]:
    return attributes.attribute_probes(per_cell=48)


def test_probes_cover_every_value_in_both_phrasings_with_distinct_seeds() -> None:
    probes = attributes.attribute_probes()
    assert len(probes) == 150 and len({p.seed for p in probes}) == len(probes)
    for a in attributes.ATTRIBUTES:
        for phrasing in attributes.PHRASINGS:
            assert {p.expected for p in probes if (p.attribute, p.phrasing) == (a, phrasing)} == set(
                attributes.VALUES[a]
            )
    for p in probes:
        assert p.expected in p.prompt and p.colour in p.prompt and p.shape in p.prompt
    assert attributes.attribute_probes()[0] == probes[0]  # data: the same set in every process


def test_train_phrasings_are_training_templates_and_heldout_words_never_occur_in_training() -> None:
    captions = "\n".join(shapes.all_train_captions())
    for template in attributes.HELDOUT_TEMPLATES:
        assert template not in shapes.TRAIN_TEMPLATES
        words = [text.strip() for text, _, _, _ in string.Formatter().parse(template) if len(text.strip()) > 2]
        assert words, template
        for w in words:
            assert w not in captions, (template, w)
    word = {"background": "{bg}", "size": "{size}", "position": "{pos}"}
    for a, phrasings in attributes.TEMPLATES.items():
        assert phrasings["train"].replace("{v}", word[a]) in shapes.TRAIN_TEMPLATES


def test_real_scenes_show_what_their_probe_asks_for(probes: list[attributes.Probe]) -> None:
    rng = np.random.default_rng(0)
    for p in probes:
        s = attributes.scene_for(p, rng)
        shown = {"background": s.background, "size": s.size_word, "position": s.position_word}[p.attribute]
        assert (shown, s.colour, s.shape) == (p.expected, p.colour, p.shape)
        assert s.radius + 1 <= s.cx <= shapes.SIZE - s.radius - 1 and s.radius + 1 <= s.cy <= shapes.SIZE - s.radius - 1


def test_pixel_judge_is_right_on_real_images(
    probes: list[attributes.Probe], calibration: attributes.Calibration
) -> None:
    scores = attributes.score(probes, attributes.real_images(probes, seed=2), calibration)
    assert min(scores.accuracy.values()) >= JUDGE_FLOOR, scores.accuracy
    for a in attributes.ATTRIBUTES:
        m = scores.confusion[a]
        assert m.sum() == sum(p.attribute == a for p in probes)
        assert scores.attribute_accuracy(a) >= JUDGE_FLOOR


def test_pixel_judge_is_wrong_on_images_of_another_value(
    probes: list[attributes.Probe], calibration: attributes.Calibration
) -> None:
    images = attributes.real_images(probes, seed=2)
    lying = []
    for p in probes:  # each image judged against a value it does not show: e.g. a white background against "black"
        values = attributes.VALUES[p.attribute]
        lying.append(replace(p, expected=values[(values.index(p.expected) + 1) % len(values)]))
    scores = attributes.score(lying, images, calibration)
    assert max(scores.accuracy.values()) <= 1 - JUDGE_FLOOR, scores.accuracy


def test_blank_images_are_small_and_central_on_their_background(calibration: attributes.Calibration) -> None:
    probes = attributes.attribute_probes(per_cell=6)
    images = np.broadcast_to(
        np.array([-0.1, -0.1, -0.1], dtype=np.float32)[None, :, None, None], (len(probes), 3, 32, 32)
    )
    judged = attributes.judge(probes, images, calibration)
    expect = {"background": "gray", "size": "small", "position": "center"}
    assert all(j == expect[p.attribute] for p, j in zip(probes, judged, strict=True))


def test_score_needs_one_image_per_probe(calibration: attributes.Calibration) -> None:
    probes = attributes.attribute_probes(per_cell=6)
    with pytest.raises(ValueError, match="one image per probe"):
        attributes.score(probes, np.zeros((3, 3, 32, 32), np.float32), calibration)


def test_markdown_tables(probes: list[attributes.Probe], calibration: attributes.Calibration) -> None:
    scores = attributes.score(probes, attributes.real_images(probes, seed=3), calibration)
    table = attributes.accuracy_markdown({"real images": scores}).splitlines()
    assert len(table) == 3 and table[2].startswith("| real images | ")
    for a in attributes.ATTRIBUTES:
        assert len(attributes.confusion_markdown(scores, a).splitlines()) == 2 + len(attributes.VALUES[a])


def test_paraphrase_confusion_names_what_the_classifier_saw(checkpoints: Path) -> None:
    judge = load_classifier(checkpoints / "shapes-classifier")
    prompts, _ = attributes.paraphrase_probes(seeds_per_prompt=2)
    asked = {p: (c, s) for p, c, s in shapes.PARAPHRASES}
    rng = np.random.default_rng(0)
    base = shapes.sample_scenes(rng, len(prompts))

    def draw(colour_of: dict[str, str]) -> np.ndarray:
        scenes = [replace(b, colour=colour_of[p], shape=asked[p][1]) for b, p in zip(base, prompts, strict=True)]
        return shapes.render(scenes, rng)

    right = attributes.paraphrase_confusion(judge, prompts, draw({p: c for p, (c, _) in asked.items()}))
    assert [r.prompt for r in right] == [p for p, _, _ in shapes.PARAPHRASES]
    assert all(r.joint_accuracy == 1.0 for r in right)
    recolour = {p: "green" if c != "green" else "blue" for p, (c, _) in asked.items()}
    wrong = attributes.paraphrase_confusion(judge, prompts, draw(recolour))
    for r in wrong:
        assert r.joint_accuracy == 0.0 and r.judged.most_common(1)[0][0] == (recolour[r.prompt], r.expected[1])
    table = attributes.paraphrase_markdown(wrong)
    assert "| a crimson disc | red circle | 0.00 | green circle ×2 |" in table
