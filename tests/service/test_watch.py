"""Registry announcements over a real Redis: a push wakes every subscribed process; without Redis, nothing is
sent and nothing fails."""

from __future__ import annotations

import secrets
import threading
import time

from fewstep.service.settings import Settings
from fewstep.service.watch import announce, subscribe
from tests.conftest import RedisServer


def test_without_redis_an_announcement_reaches_no_one_and_nothing_subscribes() -> None:
    settings = Settings(redis_url=None)
    assert announce(settings, "shapes", "2", "push") == 0
    assert subscribe(settings, [threading.Event()], threading.Event()) is None


def test_an_announcement_nudges_every_subscriber(redis_server: RedisServer) -> None:
    settings = Settings(redis_url=redis_server.url, redis_prefix=f"w{secrets.token_hex(3)}")
    images, video, stop = threading.Event(), threading.Event(), threading.Event()
    thread = subscribe(settings, [images, video], stop)
    assert thread is not None
    try:
        assert images.wait(30) and video.wait(30)  # subscribing nudges once: what was missed is looked at
        images.clear()
        video.clear()
        deadline = time.monotonic() + 30
        while announce(settings, "shapes", "2", "push") == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # until the subscription is live
        assert images.wait(30) and video.wait(30)
    finally:
        stop.set()
        thread.join(30)


def test_an_unreachable_redis_costs_the_announcement_not_the_caller() -> None:
    from tests.conftest import free_port

    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert announce(settings, "shapes", "2", "push") == 0
