"""`Limits` in one process: for the embedded queue, where one gateway is the whole service."""

from __future__ import annotations

import secrets
import threading
import time

from fewstep.service.limits.base import Lease, cap_reached, rate_limited


class LocalLimits:
    """Thread-safe. Buckets are kept for owners that are not full: a client address or a key whose bucket has
    refilled is forgotten (a full bucket is what a new one is), and past `max_buckets` the least recently used
    go first, so rotating addresses cannot grow memory without bound. Leases are per key."""

    def __init__(self, max_buckets: int = 100_000) -> None:
        self._lock = threading.Lock()
        self.max_buckets = max_buckets
        self._buckets: dict[tuple[str, str], tuple[float, float, float]] = {}
        """(owner, bucket) → (tokens, when counted, when full again), least recently used first."""
        self._leases: dict[tuple[str, str], dict[str, float]] = {}

    def spend(self, owner: str, bucket: str, rate_per_s: float, burst: int, settings: str) -> None:
        now = time.monotonic()
        with self._lock:
            tokens, at, _ = self._buckets.pop((owner, bucket), (float(burst), now, now))
            tokens = min(float(burst), tokens + (now - at) * rate_per_s)
            left = tokens if tokens < 1.0 else tokens - 1.0
            self._buckets[(owner, bucket)] = (left, now, now + (burst - left) / rate_per_s)
            self._forget(now)
            if tokens < 1.0:
                raise rate_limited(bucket, rate_per_s, burst, settings, (1.0 - tokens) / rate_per_s)

    def _forget(self, now: float) -> None:
        """Drop the least recently used buckets while there are too many, and those already full again."""
        while len(self._buckets) > self.max_buckets:
            del self._buckets[next(iter(self._buckets))]
        oldest = next(iter(self._buckets.items()), None)
        while oldest is not None and oldest[1][2] <= now:  # full again: forgotten, as if never used
            del self._buckets[oldest[0]]
            oldest = next(iter(self._buckets.items()), None)

    @property
    def buckets(self) -> int:
        """Buckets kept now."""
        with self._lock:
            return len(self._buckets)

    def hold(self, owner: str, what: str, limit: int, ttl_s: float, setting: str) -> Lease:
        now = time.monotonic()
        with self._lock:
            held = self._leases.setdefault((owner, what), {})
            for lease_id in [i for i, expires in held.items() if expires <= now]:
                del held[lease_id]
            if len(held) >= limit:
                raise cap_reached(what, limit, setting)
            lease = Lease(owner, what, secrets.token_hex(8), ttl_s)
            held[lease.id] = now + ttl_s
            return lease

    def renew(self, lease: Lease) -> None:
        with self._lock:
            held = self._leases.get((lease.owner, lease.what), {})
            if lease.id in held:
                held[lease.id] = time.monotonic() + lease.ttl_s

    def release(self, lease: Lease) -> None:
        with self._lock:
            held = self._leases.get((lease.owner, lease.what))
            if held is not None:
                held.pop(lease.id, None)
                if not held:
                    del self._leases[(lease.owner, lease.what)]

    def close(self) -> None:
        return None
