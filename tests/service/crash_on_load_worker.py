"""Test-only stand-in for `fewstep worker`: the process is SIGKILLed while it loads one model version.

It plays the OOM killer (or a node failure) striking in the middle of a hot swap: the process
dies without cleaning up, as a real crash would. The version is named by
FEWSTEP_TEST_CRASH_VERSION. Usage: crash_on_load_worker.py NAME STEP_MS (STEP_MS is ignored).
"""

from __future__ import annotations

import os
import signal
import sys

from fewstep.cli import main
from fewstep.engines.image import ImageEngine

CRASH = os.environ["FEWSTEP_TEST_CRASH_VERSION"]
_real_load = ImageEngine.load


def _load(self: ImageEngine) -> None:
    if self.spec.version == CRASH:
        os.kill(os.getpid(), signal.SIGKILL)
    _real_load(self)


if __name__ == "__main__":
    ImageEngine.load = _load  # type: ignore[method-assign]
    sys.exit(main(["worker", "--engine", "registry", "--name", sys.argv[1]]))
