"""The job queue between gateways and engine workers: one protocol, embedded and Redis implementations."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fewstep.service.queue.base import JobQueue
from fewstep.service.queue.keys import BATCH, INTERACTIVE, VIDEO

if TYPE_CHECKING:  # settings import this package's key defaults
    from fewstep.service.settings import Settings


def open_queue(settings: Settings) -> JobQueue:
    """The Redis queue when `FEWSTEP_REDIS_URL` is set, else the embedded one."""
    depth = {INTERACTIVE: settings.max_queue, BATCH: settings.max_job_queue, VIDEO: settings.video_max_queue}
    if settings.redis_url is None:
        from fewstep.service.queue.embedded import EmbeddedQueue

        return EmbeddedQueue(depth)
    from fewstep.service.queue.redis import RedisQueue

    return RedisQueue(settings.redis_url.get_secret_value(), depth, settings.redis_prefix)
