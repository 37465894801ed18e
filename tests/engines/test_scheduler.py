"""The step-level scheduler on the real student: admission, leaving, cancellation, fairness, and the
determinism contract (DESIGN.md §3) with torch and onnxruntime.

The scheduler is driven tick by tick from the test thread, so every step boundary is explicit.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fewstep.engines.base import ImageItem, ImageResult
from fewstep.engines.image import ImageEngine
from fewstep.engines.noop import NoopEngine
from fewstep.engines.scheduler import LocalSource, LocalTicket, Observer, StepScheduler
from fewstep.errors import Cancelled, InvalidRequest
from fewstep.models.registry import Registry


@pytest.fixture(scope="module")
def torch_engine(checkpoints: Path, encoder) -> ImageEngine:  # type: ignore[no-untyped-def]
    e = ImageEngine(checkpoints / "shapes", encoder, teacher_folder=checkpoints / "shapes-teacher")
    e.load()
    return e


@pytest.fixture(scope="module")
def ort_engine(exported: Registry, encoder) -> ImageEngine:  # type: ignore[no-untyped-def]
    e = ImageEngine(exported.version_dir("shapes", "1"), encoder, backend="onnxruntime", precision="fp32")
    e.load()
    return e


def one_engine() -> Callable[[str], NoopEngine]:
    """A lookup that returns the same engine every time, as a runtime does between version swaps."""
    engine = NoopEngine()
    return lambda _model: engine


def drive(sched: StepScheduler, source: LocalSource, tickets: list[LocalTicket], limit: int = 100) -> int:
    """Tick until every ticket is resolved; returns the number of ticks."""
    for n in range(1, limit + 1):
        sched.tick(source, idle_wait_s=0.0)
        if all(t.future.done() for t in tickets):
            return n
    raise AssertionError("not finished")


def pixels(t: LocalTicket) -> np.ndarray:
    out = t.future.result()
    assert isinstance(out, ImageResult), out
    return out.pixels.astype(np.int16)


STRANGERS = [f"a {c} {s}" for c in ("red", "green", "blue", "purple") for s in ("circle", "square", "triangle")]


@pytest.mark.parametrize("backend", ["torch", pytest.param("onnxruntime", marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    ("before", "join_at"),
    # One joining position in the fast layer; the others (at every later step) in the slow one.
    [(0, 0), *(pytest.param(b, j, marks=pytest.mark.slow) for b, j in [(5, 1), (15, 2), (9, 3)])],
)
def test_same_image_alone_or_joining_a_full_batch_of_strangers_at_any_position(
    request: pytest.FixtureRequest, backend: str, before: int, join_at: int
) -> None:
    engine: ImageEngine = request.getfixturevalue("torch_engine" if backend == "torch" else "ort_engine")
    me = ImageItem("a yellow triangle on a black background", seed=1234, steps=4)
    source = LocalSource(256)
    sched = StepScheduler(lambda _m: engine, max_batch=16, max_wait_s=0.0)
    [alone] = source.submit("shapes", [me])
    drive(sched, source, [alone])

    rng = random.Random(before * 10 + join_at)

    def strangers(n: int) -> list[ImageItem]:
        return [ImageItem(rng.choice(STRANGERS), seed=rng.randrange(10**6), steps=rng.randint(1, 4)) for _ in range(n)]

    early = source.submit("shapes", strangers(20))  # fill the batch, then let it run a few steps
    for _ in range(join_at):
        sched.tick(source, idle_wait_s=0.0)
    queued = source.submit("shapes", strangers(before))
    [mine] = source.submit("shapes", [me])
    late = source.submit("shapes", strangers(12))
    drive(sched, source, early + queued + [mine] + late)
    assert np.abs(pixels(mine) - pixels(alone)).max() <= 1


def test_hybrid_items_are_deterministic_in_a_mixed_running_batch(torch_engine: ImageEngine) -> None:
    me = ImageItem("a green circle", seed=99, steps=3, hybrid=True)
    source = LocalSource(64)
    sched = StepScheduler(lambda _m: torch_engine, max_batch=8, max_wait_s=0.0)
    [alone] = source.submit("shapes", [me])
    drive(sched, source, [alone])
    others = source.submit(
        "shapes", [ImageItem(s, seed=i, steps=1 + i % 4, hybrid=i % 3 == 1) for i, s in enumerate(STRANGERS[:6])]
    )
    sched.tick(source, idle_wait_s=0.0)
    [mine] = source.submit("shapes", [me])
    drive(sched, source, [*others, mine])
    assert np.abs(pixels(mine) - pixels(alone)).max() <= 1


def test_a_one_step_item_joins_a_running_batch_and_leaves_first() -> None:
    source = LocalSource(64)
    sched = StepScheduler(one_engine(), max_batch=4, max_wait_s=0.0)
    [long] = source.submit("m", [ImageItem("long", seed=0, steps=4)])
    sched.tick(source, idle_wait_s=0.0)
    [short] = source.submit("m", [ImageItem("short", seed=1, steps=1)])
    sched.tick(source, idle_wait_s=0.0)
    assert short.future.done() and not long.future.done()
    assert [r.slot.steps_run for r in sched.running] == [2]


class ClosedLoop(LocalSource):
    """A source whose clients send their next request a moment after each result, as clients over HTTP do."""

    def done(self, results: list) -> None:  # type: ignore[type-arg]
        super().done(results)
        for _ in results:
            threading.Timer(0.02, self.submit, ["m", [ImageItem("next", seed=9, steps=1)]]).start()


def test_the_clients_of_items_that_left_join_at_that_boundary_even_when_others_already_wait() -> None:
    """The join wait is for newcomers: an item that was waiting already does not stand in for them (with it
    taken, the scheduler used to stop waiting, and every newcomer lost a whole step)."""
    source = ClosedLoop(64)
    steps: list[int] = []
    engine = NoopEngine(step_s=0.05)  # a join wait of 2 steps: 0.1 s, for clients 0.02 s away
    observer = Observer(step=lambda m, n, s: steps.append(n))
    sched = StepScheduler(lambda _m: engine, max_batch=8, max_wait_s=0.0, join_wait=2.0, observer=observer)
    source.submit("m", [ImageItem("short", seed=0, steps=1), ImageItem("long", seed=1, steps=4)])
    sched.tick(source, idle_wait_s=0.0)  # both run one step; the short one leaves (its client sends again)
    source.submit("m", [ImageItem("waiting", seed=2, steps=4)])  # waiting before that boundary
    sched.tick(source, idle_wait_s=0.0)
    assert steps == [2, 3]  # the long one, the one that waited, and the short one's next request


class PoisonedEngine(NoopEngine):
    """Fails a whole `begin` call when any item's prompt is poison, as a tokenizer encoding the batch does."""

    def begin(self, items):  # type: ignore[no-untyped-def]
        if any("poison" in it.prompt for it in items):
            raise UnicodeEncodeError("utf-8", "poison", 0, 1, "surrogates not allowed")
        return super().begin(items)


def test_an_item_whose_input_breaks_the_batch_call_fails_alone() -> None:
    engine = PoisonedEngine()
    source = LocalSource(64)
    sched = StepScheduler(lambda _model: engine, max_batch=8, max_wait_s=0.0)
    tickets = source.submit("m", [ImageItem(p, seed=i, steps=2) for i, p in enumerate(["a", "b", "poison", "c"])])
    drive(sched, source, tickets)
    outcomes = [t.future.result() for t in tickets]
    assert [type(o).__name__ for o in outcomes] == ["ImageResult", "ImageResult", "GenerationFailed", "ImageResult"]
    assert "UnicodeEncodeError" in str(outcomes[2])


def test_request_level_policy_admits_only_into_an_empty_batch() -> None:
    source = LocalSource(64)
    sched = StepScheduler(one_engine(), max_batch=4, max_wait_s=0.0, policy="request")
    [long] = source.submit("m", [ImageItem("long", seed=0, steps=4)])
    sched.tick(source, idle_wait_s=0.0)
    [short] = source.submit("m", [ImageItem("short", seed=1, steps=1)])
    ticks = drive(sched, source, [long])
    assert ticks == 3 and not short.future.done()  # it waited for the whole batch
    sched.tick(source, idle_wait_s=0.0)
    assert short.future.done()


def test_no_batching_runs_one_item_at_a_time() -> None:
    seen: list[int] = []
    source = LocalSource(64)
    obs = Observer(step=lambda _m, n, _s: seen.append(n))
    sched = StepScheduler(one_engine(), max_batch=16, max_wait_s=0.0, policy="none", observer=obs)
    tickets = source.submit("m", [ImageItem("x", seed=i, steps=2) for i in range(3)])
    drive(sched, source, tickets)
    assert seen == [1] * 6


def test_running_batch_never_exceeds_max_batch_and_admits_oldest_first() -> None:
    occupancy: list[int] = []
    source = LocalSource(64)
    obs = Observer(step=lambda _m, n, _s: occupancy.append(n))
    sched = StepScheduler(one_engine(), max_batch=3, max_wait_s=0.0, observer=obs)
    tickets = source.submit("m", [ImageItem("x", seed=i, steps=1 + i % 2) for i in range(10)])
    order: list[int] = []
    for t in tickets:
        t.future.add_done_callback(lambda f, t=t: order.append(tickets.index(t)))
    drive(sched, source, tickets)
    assert max(occupancy) == 3 and sum(occupancy) == sum(1 + i % 2 for i in range(10))
    started = sorted(range(10), key=lambda i: order.index(i) - (1 + i % 2))  # finish time minus own steps
    assert started[:3] == [0, 1, 2]  # the first three admitted are the three oldest


def test_cancelled_items_leave_at_the_next_boundary_and_free_their_slot() -> None:
    source = LocalSource(64)
    sched = StepScheduler(one_engine(), max_batch=2, max_wait_s=0.0)
    a, b, c = source.submit("m", [ImageItem("x", seed=i, steps=4) for i in range(3)])
    sched.tick(source, idle_wait_s=0.0)
    a.cancel.set()
    sched.tick(source, idle_wait_s=0.0)
    out = a.future.result()
    assert isinstance(out, Cancelled) and str(out) == "cancelled before step 2 of 4"
    assert {r.admission.ticket for r in sched.running} == {b, c}  # c took a's slot at once


def test_invalid_items_fail_alone_and_a_lone_item_waits_for_company(torch_engine: ImageEngine) -> None:
    source = LocalSource(64)
    sizes: list[int] = []
    obs = Observer(step=lambda _m, n, _s: sizes.append(n))
    sched = StepScheduler(lambda _m: torch_engine, max_batch=8, max_wait_s=0.3, observer=obs)
    first = source.submit(
        "shapes", [ImageItem("a red circle", seed=1, steps=9), ImageItem("a red circle", seed=2, steps=1)]
    )
    threading.Timer(0.05, lambda: source.submit("shapes", [ImageItem("a blue circle", seed=3, steps=1)])).start()
    t0 = time.monotonic()
    sched.tick(source, idle_wait_s=1.0)
    assert isinstance(first[0].future.result(), InvalidRequest)
    assert isinstance(first[1].future.result(), ImageResult)
    assert sizes == [2] and time.monotonic() - t0 >= 0.25  # waited for the late one, ran both in one step


def test_a_slot_finishes_on_the_engine_that_began_it_when_a_new_version_arrives() -> None:
    old, new = NoopEngine(), NoopEngine()
    current = [old]
    source = LocalSource(64)
    sched = StepScheduler(lambda _m: current[0], max_batch=4, max_wait_s=0.0)
    [first] = source.submit("m", [ImageItem("first", seed=0, steps=4)])
    sched.tick(source, idle_wait_s=0.0)
    current[0] = new  # a hot swap between two step boundaries
    [second] = source.submit("m", [ImageItem("second", seed=1, steps=2)])
    drive(sched, source, [first, second])
    assert old.evaluations == 4 and new.evaluations == 2  # never mixed within a trajectory
