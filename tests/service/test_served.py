"""`share`: the stable number a canary's share of new work is cut by."""

from __future__ import annotations

from fewstep.service.served import share


def test_share_is_stable_per_key_and_spreads_keys_evenly() -> None:
    keys = [f"job-{i}" for i in range(4000)]
    values = [share(k) for k in keys]
    assert values == [share(k) for k in keys]  # every retry of a job meets the same version
    assert all(0.0 <= v < 1.0 for v in values)
    below = sum(v < 0.1 for v in values) / len(values)
    assert 0.08 < below < 0.12  # a 10 % canary takes about 10 % of jobs
