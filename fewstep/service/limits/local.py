"""`Limits` in one process: for the embedded queue, where one gateway is the whole service."""

from __future__ import annotations

import secrets
import threading
import time

from fewstep.service.limits.base import Lease, cap_reached, rate_limited


class LocalLimits:
    """Thread-safe; state is bounded by the number of keys (buckets and leases are per key)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}
        self._leases: dict[tuple[str, str], dict[str, float]] = {}

    def spend(self, owner: str, bucket: str, rate_per_s: float, burst: int, settings: str, cost: float = 1.0) -> None:
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get((owner, bucket), (float(burst), now))
            tokens = min(float(burst), tokens + (now - at) * rate_per_s)
            need = max(cost, 1.0)
            if tokens < need:
                self._buckets[(owner, bucket)] = (tokens, now)
                raise rate_limited(bucket, rate_per_s, burst, settings, (need - tokens) / rate_per_s)
            self._buckets[(owner, bucket)] = (tokens - cost, now)

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
