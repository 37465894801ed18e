"""`Limits` in Redis: the limits of one key hold across every gateway of a deployment.

Each operation is one Lua script, atomic on the server, timed by the server's clock (`TIME`), so
gateways' clocks need not agree.
"""

from __future__ import annotations

import contextlib
import secrets
from typing import Any

import redis

from fewstep.errors import NotReady
from fewstep.service.limits.base import Lease, cap_reached, rate_limited
from fewstep.service.queue.keys import Keys

# KEYS: bucket hash. ARGV: rate per s, burst. Takes one token: returns "0" when spent, else the seconds to wait.
SPEND = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(b[1]) or burst
local at = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return tostring(wait)
"""

# KEYS: leases sorted set (member: lease id, score: expiry). ARGV: limit, ttl, lease id.
# Returns -1 when granted, else how many are held.
HOLD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[1]) then return held end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 1)
return -1
"""

# KEYS: leases sorted set. ARGV: ttl, lease id.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2]) then
  redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 1)
end
return 1
"""


class RedisLimits:
    """Thread-safe (redis-py pools connections). Redis away: `NotReady` (503), never a silent pass."""

    def __init__(self, url: str, prefix: str) -> None:
        self.keys = Keys(prefix)
        self.r: Any = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._spend = self.r.register_script(SPEND)
        self._hold = self.r.register_script(HOLD)
        self._renew = self.r.register_script(RENEW)

    def _call(self, script: Any, keys: list[str], args: list[str | int | float]) -> Any:
        try:
            return script(keys=keys, args=args)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise NotReady(f"limits store unreachable: {type(e).__name__}", retry_after=2.0) from e

    def spend(self, owner: str, bucket: str, rate_per_s: float, burst: int, settings: str) -> None:
        wait = float(self._call(self._spend, [self.keys.bucket(owner, bucket)], [rate_per_s, burst]))
        if wait > 0:
            raise rate_limited(bucket, rate_per_s, burst, settings, wait)

    def hold(self, owner: str, what: str, limit: int, ttl_s: float, setting: str) -> Lease:
        lease = Lease(owner, what, secrets.token_hex(8), ttl_s)
        if int(self._call(self._hold, [self.keys.leases(owner, what)], [limit, ttl_s, lease.id])) >= 0:
            raise cap_reached(what, limit, setting)
        return lease

    def renew(self, lease: Lease) -> None:
        self._call(self._renew, [self.keys.leases(lease.owner, lease.what)], [lease.ttl_s, lease.id])

    def release(self, lease: Lease) -> None:
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):  # it expires by itself after its ttl
            self.r.zrem(self.keys.leases(lease.owner, lease.what), lease.id)

    def close(self) -> None:
        self.r.close()
