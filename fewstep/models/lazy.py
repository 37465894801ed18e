"""Names from diffusers and transformers, resolved under one process-wide lock.

Both libraries resolve their public names lazily (`diffusers.UNet2DConditionModel` imports the model's
module on first access), and that resolution is not thread-safe: with two engines loading in parallel
threads (an image model and the video model's first-frame UNet), one of them got
`ImportError: cannot import name 'UNet2DConditionModel' from 'diffusers'`. Nor are they imported at
module level: diffusers alone takes ~7 s to import on these cores, which processes that never build
one of its models (a queue-only gateway, no-op workers, the CLI) should not pay.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

_LOCK = threading.RLock()


def attr(module: str, name: str) -> Any:
    """`module.name` (e.g. `attr("diffusers", "AutoencoderKL")`), imported under the lock."""
    with _LOCK:
        return getattr(importlib.import_module(module), name)
