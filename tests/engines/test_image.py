"""The step-adaptive image engine on the shipped student (torch backend)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fewstep.engines.base import ImageItem, ImageResult, StepEngine
from fewstep.engines.image import ImageEngine
from fewstep.errors import Cancelled, CheckpointError, InvalidRequest
from fewstep.models.checkpoint import sha256_file


@pytest.fixture(scope="module")
def engine(checkpoints: Path, encoder) -> ImageEngine:  # type: ignore[no-untyped-def]
    e = ImageEngine(checkpoints / "shapes", encoder)
    e.load()
    e.warmup()
    return e


def _pixels(outcome: object) -> np.ndarray:
    assert isinstance(outcome, ImageResult), outcome
    return outcome.pixels.astype(np.int16)


def test_satisfies_the_engine_protocol(engine: ImageEngine) -> None:
    assert isinstance(engine, StepEngine)
    assert engine.spec.steps == [1, 2, 3, 4]


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_same_request_same_image_alone_or_among_strangers(engine: ImageEngine, steps: int) -> None:
    me = ImageItem("a yellow triangle", seed=42, steps=steps)
    alone = _pixels(engine.run([me])[0])
    strangers = [ImageItem(f"a blue square {i}", seed=i, steps=1 + i % 4) for i in range(7)]
    for position in (0, 3, 7):
        batch = [*strangers[:position], me, *strangers[position:]]
        together = _pixels(engine.run(batch)[position])
        assert np.abs(together - alone).max() <= 1


def test_seed_and_steps_change_the_image(engine: ImageEngine) -> None:
    a, b, c = engine.run(
        [ImageItem("a red circle", 1, 4), ImageItem("a red circle", 2, 4), ImageItem("a red circle", 1, 1)]
    )
    assert np.abs(_pixels(a) - _pixels(b)).mean() > 1
    assert np.abs(_pixels(a) - _pixels(c)).mean() > 1


def test_a_bad_item_fails_alone(engine: ImageEngine) -> None:
    good, bad = engine.run([ImageItem("a red circle", 1, 2), ImageItem("a red circle", 1, 7)])
    assert isinstance(good, ImageResult)
    assert isinstance(bad, InvalidRequest) and "Given: 7" in str(bad)


def test_an_item_that_breaks_the_network_call_fails_alone_and_its_neighbours_carry_on(engine: ImageEngine) -> None:
    slots = engine.begin([ImageItem("a red circle", 1, 2), ImageItem("a poison square", 2, 2), ImageItem("x", 3, 1)])
    poison = slots[1].state.x.clone()
    net = engine._net

    def breaks_on_poison(x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        if any(torch.equal(row, poison) for row in x):
            raise RuntimeError("this input breaks the network")
        assert net is not None
        return net(x, *rest)

    engine._net = breaks_on_poison  # type: ignore[assignment]
    try:
        engine.advance(slots)
    finally:
        engine._net = net
    assert "GenerationFailed" in type(slots[1].outcome).__name__
    assert slots[0].outcome is None and slots[0].steps_run == 1  # one step on, as if nothing happened
    assert isinstance(slots[2].outcome, ImageResult)  # its only step: done
    engine.advance([slots[0]])
    alone = engine.run([ImageItem("a red circle", 1, 2)])[0]
    assert np.abs(_pixels(slots[0].outcome) - _pixels(alone)).max() <= 1  # the same image as without poison


def test_weights_that_do_not_match_their_hash_are_refused(student_copy: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    weights = student_copy / "model.safetensors"
    state = load_file(str(weights))
    save_file({k: v + 0.01 for k, v in state.items()}, str(weights))
    e = ImageEngine(student_copy, encoder)
    with pytest.raises(CheckpointError, match="sha256"):
        e.load()


def test_weights_with_wrong_shapes_are_refused(student_copy: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    weights = student_copy / "model.safetensors"
    state = load_file(str(weights))
    name = next(iter(state))
    state[name] = torch.zeros(3)
    _rewrite(student_copy, state)
    with pytest.raises(CheckpointError, match="do not fit"):
        ImageEngine(student_copy, encoder).load()


def test_nan_weights_are_refused_at_warmup(student_copy: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    state = load_file(str(student_copy / "model.safetensors"))
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    _rewrite(student_copy, state)
    e = ImageEngine(student_copy, encoder)
    e.load()
    with pytest.raises(CheckpointError, match="warm-up"):
        e.warmup()


def _rewrite(folder: Path, state: dict[str, torch.Tensor]) -> None:
    """Replace the weights and re-hash them, as a careless (not malicious) trainer would."""
    weights = folder / "model.safetensors"
    save_file(state, str(weights))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {"sha256": sha256_file(weights), "bytes": weights.stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def hybrid_engine(checkpoints: Path, encoder) -> ImageEngine:  # type: ignore[no-untyped-def]
    e = ImageEngine(checkpoints / "shapes", encoder, teacher_folder=checkpoints / "shapes-teacher")
    e.load()
    e.warmup()
    return e


@pytest.mark.parametrize("steps", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4: the slow layer
def test_hybrid_is_deterministic_whatever_shares_its_batch(hybrid_engine: ImageEngine, steps: int) -> None:
    me = ImageItem("a green circle", seed=9, steps=steps, hybrid=True)
    alone = _pixels(hybrid_engine.run([me])[0])
    strangers = [
        ImageItem(f"a red cross {i}", seed=i, steps=1 + i % 4, hybrid=i % 2 == 1 and i % 4 > 0) for i in range(6)
    ]
    for position in (0, 6):
        batch = [*strangers[:position], me, *strangers[position:]]
        assert np.abs(_pixels(hybrid_engine.run(batch)[position]) - alone).max() <= 1


def test_hybrid_changes_the_image_and_costs_the_teachers_cfg(hybrid_engine: ImageEngine) -> None:
    plain, hybrid = hybrid_engine.run([ImageItem("a blue triangle", 5, 3), ImageItem("a blue triangle", 5, 3, True)])
    assert isinstance(plain, ImageResult) and isinstance(hybrid, ImageResult)
    # The teacher's part is the pair's hand-off (the spec reads it from the student's manifest).
    assert plain.nfe == 3 and hybrid.nfe == hybrid_engine.spec.teacher_nfe + 2
    assert np.abs(_pixels(plain) - _pixels(hybrid)).mean() > 1
    assert hybrid_engine.spec.hybrid is True


def test_hybrid_needs_two_steps_and_a_teacher(hybrid_engine: ImageEngine, engine: ImageEngine) -> None:
    (one_step,) = hybrid_engine.run([ImageItem("a red circle", 1, 1, hybrid=True)])
    assert isinstance(one_step, InvalidRequest)
    assert "`steps` must be between 2 and 4 when `hybrid` is true. Given: 1" in str(one_step)
    (no_teacher,) = engine.run([ImageItem("a red circle", 1, 2, hybrid=True)])
    assert isinstance(no_teacher, InvalidRequest) and "teacher" in str(no_teacher)


def test_stopped_items_leave_the_batch_at_the_step_boundary(engine: ImageEngine) -> None:
    items = [ImageItem("a red circle", seed=1, steps=4), ImageItem("a blue square", seed=2, steps=4)]
    calls: list[tuple[int, list[int]]] = []

    def stop(k: int, active: list[int]) -> list[int]:
        calls.append((k, list(active)))
        return [0] if k == 2 else []

    out = engine.run(items, stop)
    assert isinstance(out[0], Cancelled) and str(out[0]) == "cancelled before step 3 of 4"
    assert calls == [(0, [0, 1]), (1, [0, 1]), (2, [0, 1]), (3, [1])]  # item 0 ran 2 of its 4 steps
    alone = engine.run([items[1]])[0]
    assert np.abs(_pixels(out[1]) - _pixels(alone)).max() <= 1  # its neighbour is unaffected (batch-size rounding)


def _start(seed: int) -> np.ndarray:
    """A 32×32 starting image: a blue field with a red square."""
    img = np.zeros((32, 32, 3), np.uint8)
    img[...] = (20, 40, 200)
    img[8 + seed % 4 : 20, 6:18] = (220, 30, 30)
    return img


def _edit(seed: int, steps: int, strength: float) -> ImageItem:
    from fewstep.engines.pixels import encode_png

    return ImageItem("a red square", seed, steps, image=encode_png(_start(seed)), strength=strength)


def test_an_edit_runs_the_kept_steps_from_its_image_and_at_full_strength_is_text_to_image(
    engine: ImageEngine,
) -> None:
    """The shipped student's img2img: the last int(steps × strength) timesteps, from the image noised to the first
    of them by the flow's forward process; strength 1 starts from pure noise, so it is the text-to-image image."""
    (full,) = engine.run([_edit(5, 4, 1.0)])
    (text,) = engine.run([ImageItem("a red square", 5, 4)])
    assert np.array_equal(_pixels(full), _pixels(text))
    edits = engine.run([_edit(5, 4, 0.5), _edit(5, 4, 0.25), ImageItem("a red square", 6, 2), _edit(7, 3, 0.7)])
    half, quarter = edits[0], edits[1]
    assert isinstance(half, ImageResult) and half.nfe == 2 and isinstance(quarter, ImageResult) and quarter.nfe == 1
    start = _start(5).astype(int)
    gap = [np.abs(_pixels(r).astype(int) - start).mean() for r in (quarter, half, text)]
    assert gap[0] < gap[1] < gap[2], gap  # the less strength, the more of the image is kept
    for item, got in zip(
        [_edit(5, 4, 0.5), _edit(5, 4, 0.25), ImageItem("a red square", 6, 2), _edit(7, 3, 0.7)], edits, strict=True
    ):
        (alone,) = engine.run([item])
        assert np.array_equal(_pixels(got), _pixels(alone))  # whatever shares the batch


def test_edits_outside_the_rule_are_refused(engine: ImageEngine) -> None:
    cases = [
        (_edit(1, 1, 0.5), "`strength` × `steps` must be at least 1"),
        (ImageItem("x", 1, 4, hybrid=True, image=_edit(1, 4, 0.5).image, strength=0.5), "`hybrid`"),
        (ImageItem("x", 1, 4, image="aGVsbG8=", strength=0.5), "the starting image does not decode"),
    ]
    for item, needle in cases:
        (out,) = engine.run([item])
        assert isinstance(out, InvalidRequest) and needle in str(out), (needle, out)
