"""Test-only stand-in for `fewstep worker`: its engine kills the process on any item whose prompt says "poison".

It plays an item that crashes the engine every time (a segfault, an OOM kill): the worker
process dies without writing anything, as a real crash would. Usage: poison_worker.py NAME STEP_MS.
"""

from __future__ import annotations

import os
import sys

from fewstep.engines.base import Slot
from fewstep.engines.noop import NoopEngine
from fewstep.service.queue import open_queue
from fewstep.service.settings import Settings
from fewstep.service.worker import Worker


class PoisonedEngine(NoopEngine):
    def advance(self, slots: list[Slot]) -> None:
        if any("poison" in s.item.prompt for s in slots):
            os._exit(86)
        super().advance(slots)


if __name__ == "__main__":
    name, step_ms = sys.argv[1], float(sys.argv[2])
    settings = Settings()
    engine = PoisonedEngine(step_s=step_ms / 1000.0)
    Worker(open_queue(settings), lambda _model: engine, settings, name=name).run()
