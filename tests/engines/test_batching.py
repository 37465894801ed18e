"""The request batcher in front of the real image engine."""

import threading
from pathlib import Path

import pytest

from fewstep.engines.base import ImageItem, ImageResult
from fewstep.engines.batching import RequestBatcher
from fewstep.engines.image import ImageEngine
from fewstep.errors import Cancelled, Overloaded


@pytest.fixture(scope="module")
def engine(checkpoints: Path, encoder) -> ImageEngine:  # type: ignore[no-untyped-def]
    e = ImageEngine(checkpoints / "shapes", encoder)
    e.load()
    return e


def test_concurrent_requests_share_batches(engine: ImageEngine) -> None:
    sizes: list[int] = []
    b = RequestBatcher(engine, max_batch=8, max_wait_s=0.2, max_queue=64, on_batch=lambda n, _: sizes.append(n))
    try:
        futures = []
        lock = threading.Lock()

        def client(i: int) -> None:
            fs = b.submit([ImageItem(f"a green cross {i}", seed=i, steps=2)])
            with lock:
                futures.extend(fs)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = [f.result(timeout=60) for f in futures]
        assert all(isinstance(r, ImageResult) for r in results)
        assert sum(sizes) == 8 and max(sizes) > 1
    finally:
        b.close()


def test_full_queue_is_refused_whole_and_at_once(engine: ImageEngine) -> None:
    b = RequestBatcher(engine, max_batch=1, max_wait_s=0.0, max_queue=3)
    try:
        with pytest.raises(Overloaded, match="`max_queue` = 3"):
            b.submit([ImageItem("a red circle", i, 4) for i in range(4)])
        assert b.waiting == 0
    finally:
        b.close()


def test_close_resolves_waiting_items_as_cancelled(engine: ImageEngine) -> None:
    b = RequestBatcher(engine, max_batch=1, max_wait_s=0.0, max_queue=64)
    futures = b.submit([ImageItem("a red circle", i, 4) for i in range(20)])
    b.close()
    outcomes = [f.result(timeout=60) for f in futures]
    assert any(isinstance(o, Cancelled) for o in outcomes)
    assert all(isinstance(o, ImageResult | Cancelled) for o in outcomes)
