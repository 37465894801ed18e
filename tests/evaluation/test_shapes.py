import numpy as np

from fewstep.evaluation import shapes


def test_batches_are_deterministic_by_seed_and_index() -> None:
    a, sa, ca = shapes.batch(3, 5, 16)
    b, sb, cb = shapes.batch(3, 5, 16)
    c, _, _ = shapes.batch(3, 6, 16)
    assert np.array_equal(a, b) and sa == sb and ca == cb
    assert not np.array_equal(a, c)


def test_images_are_in_range_and_shapes_stay_inside_the_frame() -> None:
    x, scenes, _ = shapes.batch(0, 0, 200)
    assert x.shape == (200, 3, 32, 32) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    for s in scenes:
        assert s.radius <= s.cx <= 32 - s.radius and s.radius <= s.cy <= 32 - s.radius


def test_rendered_colour_is_the_captioned_colour() -> None:
    x, scenes, _ = shapes.batch(1, 0, 50)
    for img, s in zip(x, scenes, strict=True):
        centre = (img[:, int(s.cy), int(s.cx)] + 1) / 2
        assert np.abs(centre - np.array(shapes.COLOURS[s.colour])).max() < 0.12


def test_heldout_templates_and_paraphrase_words_never_occur_in_training_captions() -> None:
    captions = shapes.all_train_captions()
    assert len(captions) > 1000
    joined = "\n".join(captions)
    for template in shapes.HELDOUT_TEMPLATES:
        stem = template.split("{")[0].strip()
        assert stem not in joined
    for prompt, _, _ in shapes.PARAPHRASES:
        for word in (
            "crimson",
            "scarlet",
            "disc",
            "azure",
            "emerald",
            "tile",
            "cobalt",
            "golden",
            "mustard",
            "arrowhead",
            "plum",
            "mauve",
            "round shape",
            "three-sided",
        ):
            if word in prompt:
                assert word not in joined


def test_every_training_caption_is_in_the_enumerated_set() -> None:
    captions = set(shapes.all_train_captions())
    for i in range(5):
        _, _, caps = shapes.batch(9, i, 64)
        assert set(caps) <= captions
