"""Per-key rate limits and concurrency caps: one protocol, in-process and Redis implementations."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fewstep.service.limits.base import Lease, Limits

if TYPE_CHECKING:
    from fewstep.service.settings import Settings

__all__ = ["Lease", "Limits", "open_limits"]


def open_limits(settings: Settings) -> Limits:
    """Redis-backed when `FEWSTEP_REDIS_URL` is set (the limits hold across gateways), else in process."""
    if settings.redis_url is None:
        from fewstep.service.limits.local import LocalLimits

        return LocalLimits(settings.max_rate_buckets)
    from fewstep.service.limits.redis import RedisLimits

    return RedisLimits(settings.redis_url.get_secret_value(), settings.redis_prefix)
