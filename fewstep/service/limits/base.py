"""The `Limits` protocol: a token bucket per (key, bucket) and capped leases per (key, resource).

Both implementations keep the same semantics (tests/service/limits/test_conformance.py):

* `spend` takes one token from a bucket that refills at `rate_per_s` up to `burst`; short of a token
  it raises `Overloaded` whose `retry_after` is when one will be there, and takes nothing.
* `hold` grants one of at most `limit` concurrent leases or raises `Overloaded`. A lease lasts
  `ttl_s` unless renewed, so the leases of a gateway that died free themselves; `release` is
  idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from fewstep.errors import Overloaded


@dataclass(frozen=True)
class Lease:
    """One held slot of `what` for `owner`; `id` is unique per grant."""

    owner: str
    what: str
    id: str
    ttl_s: float


def rate_limited(what: str, rate_per_s: float, burst: int, settings: str, retry_after: float) -> Overloaded:
    return Overloaded(
        f"rate limit: {what} at most {rate_per_s:g}/s on average, bursts of {burst} ({settings}); "
        f"retry in {retry_after:.1f} s",
        retry_after=max(retry_after, 0.1),
    )


def cap_reached(what: str, limit: int, setting: str) -> Overloaded:
    return Overloaded(f"this key already holds {limit} {what}, the limit (`{setting}`)", retry_after=5.0)


class Limits(Protocol):
    def spend(self, owner: str, bucket: str, rate_per_s: float, burst: int, settings: str) -> None:
        """Take one token from the owner's bucket, or raise `Overloaded` (taking nothing) when it holds less;
        `settings` names the limits in the refusal."""

    def hold(self, owner: str, what: str, limit: int, ttl_s: float, setting: str) -> Lease:
        """One of at most `limit` concurrent leases of `what`; `Overloaded` naming `setting` when all are held."""

    def renew(self, lease: Lease) -> None:
        """Push the lease's expiry `ttl_s` into the future (a long stream stays counted)."""

    def release(self, lease: Lease) -> None:
        """Give the lease back; idempotent."""

    def close(self) -> None:
        """Release connections."""
