"""One conformance suite for every `Limits`: in process and in Redis (real redis-server)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest

from fewstep.errors import Overloaded
from fewstep.service.limits import Limits
from fewstep.service.limits.local import LocalLimits
from fewstep.service.limits.redis import RedisLimits


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.slow)])
def limits(request: pytest.FixtureRequest) -> Iterator[Limits]:
    if request.param == "local":
        lim: Limits = LocalLimits()
    else:
        server = request.getfixturevalue("redis_server")
        lim = RedisLimits(server.url, prefix=f"t{secrets.token_hex(4)}")
    yield lim
    lim.close()


def test_a_bucket_allows_its_burst_then_refuses_with_the_wait_and_refills(limits: Limits) -> None:
    for _ in range(3):
        limits.spend("alice", "jobs", 2.0, 3, "`key_requests_per_s`, `key_burst`")
    with pytest.raises(Overloaded, match=r"jobs at most 2/s on average, bursts of 3 \(`key_requests_per_s`") as e:
        limits.spend("alice", "jobs", 2.0, 3, "`key_requests_per_s`, `key_burst`")
    assert 0.0 < e.value.retry_after <= 0.5 + 1e-6
    limits.spend("bob", "jobs", 2.0, 3, "`key_requests_per_s`, `key_burst`")  # another key has its own bucket
    time.sleep(e.value.retry_after + 0.05)
    limits.spend("alice", "jobs", 2.0, 3, "`key_requests_per_s`, `key_burst`")  # refilled at the rate


def test_leases_are_capped_per_key_released_once_and_expire(limits: Limits) -> None:
    a = limits.hold("alice", "video sessions", 2, 60.0, "key_max_video_sessions")
    limits.hold("alice", "video sessions", 2, 60.0, "key_max_video_sessions")
    with pytest.raises(Overloaded, match=r"already holds 2 video sessions, the limit \(`key_max_video_sessions`\)"):
        limits.hold("alice", "video sessions", 2, 60.0, "key_max_video_sessions")
    limits.hold("bob", "video sessions", 2, 60.0, "key_max_video_sessions")
    limits.release(a)
    limits.release(a)  # idempotent: it frees one slot, not two
    limits.hold("alice", "video sessions", 2, 60.0, "key_max_video_sessions")
    with pytest.raises(Overloaded):
        limits.hold("alice", "video sessions", 2, 60.0, "key_max_video_sessions")
    short = limits.hold("carol", "event streams", 1, 0.3, "key_max_event_streams")
    limits.renew(short)
    with pytest.raises(Overloaded):
        limits.hold("carol", "event streams", 1, 0.3, "key_max_event_streams")
    time.sleep(0.5)  # a dead gateway's lease frees itself
    limits.hold("carol", "event streams", 1, 0.3, "key_max_event_streams")


def test_in_process_buckets_stay_bounded_under_rotating_addresses() -> None:
    """Every new client address (IPv6, or forwarded addresses) used to leave a bucket behind for good."""
    limits = LocalLimits(max_buckets=100)
    for i in range(1000):
        limits.spend(f"address:2001:db8::{i:x}", "failed authentications", 1.0, 5, "`n`")
    assert limits.buckets == 100
    fast = LocalLimits()
    fast.spend("address:a", "b", 1000.0, 5, "`n`")
    time.sleep(0.05)  # refilled: a full bucket is a new one, nothing to keep
    fast.spend("address:c", "b", 0.001, 5, "`n`")
    assert fast.buckets == 1
