"""`Drain`: the count of work in flight that a graceful shutdown waits on."""

from __future__ import annotations

import threading

from fewstep.service.drain import Drain


def test_in_flight_work_is_counted_until_it_ends_even_when_it_raises() -> None:
    drain = Drain()
    with drain.track(), drain.track():
        assert drain.active == 2
    try:
        with drain.track():
            raise RuntimeError("a request that fails")
    except RuntimeError:
        pass
    assert drain.active == 0 and drain.wait_idle(0.0)


def test_wait_idle_returns_when_the_last_work_ends_or_reports_the_timeout() -> None:
    drain = Drain()
    drain.start()
    drain.start()  # idempotent
    assert drain.draining.is_set()
    inside, leave = threading.Event(), threading.Event()

    def work() -> None:
        with drain.track():
            inside.set()
            leave.wait(30)

    t = threading.Thread(target=work)
    t.start()
    assert inside.wait(30)
    assert not drain.wait_idle(0.05)  # still in flight: the timeout is reported, not hidden
    leave.set()
    assert drain.wait_idle(30)
    t.join(30)
