"""Every Redis key, stream name and TTL default of the job queue, in one place (arq's rule).

Nothing else in fewstep spells a Redis key. The TTL defaults below are what the settings
fields of the same names start from; operators change them through `FEWSTEP_*`.
"""

from __future__ import annotations

from dataclasses import dataclass

RESULT_TTL_S = 24 * 3600
"""How long a job, its results and its events live after their last write."""
SYNC_RESULT_TTL_S = 300
"""How long the items of a synchronous `/v1/images/generations` request live: the gateway reads them at once."""
IDEMPOTENCY_TTL_S = 24 * 3600
"""How long an `Idempotency-Key` keeps pointing at its job."""
CLAIM_IDLE_S = 30.0
"""An item in flight this long without a heartbeat is taken back from its worker (XAUTOCLAIM)."""
HEARTBEAT_S = 5.0
"""How often a worker refreshes its in-flight items and its presence key."""
WORKER_TTL_S = 3 * HEARTBEAT_S
"""A worker whose presence key is older than this no longer counts as alive."""
MAX_DELIVERIES = 3
"""An item delivered this many times without a result goes to the dead-letter stream."""

DEAD_LETTERS_MAX = 10_000
"""The dead-letter record keeps this many newest entries (older ones are trimmed): a poison flood
cannot grow it without bound."""

INTERACTIVE = "interactive"
BATCH = "batch"
VIDEO = "video"
IMAGE_LANES = (INTERACTIVE, BATCH)
"""Synchronous requests go to the interactive lane, jobs to the batch lane; image workers drain interactive
first and claim nothing else."""
LANES = (INTERACTIVE, BATCH, VIDEO)


def image_worker(lanes: tuple[str, ...]) -> bool:
    """Whether a consumer of `lanes` is an image worker, the workers `QueueStats.workers` counts (a gateway's clip
    driver, on the video lane alone, is not: counted, it would hide that every image worker is gone)."""
    return any(lane in IMAGE_LANES for lane in lanes)


"""Every lane. Videos (`POST /v1/videos`) go to the video lane, which only a gateway's clip driver claims: the
process that has the video engines loaded (`service/clips.py`)."""


@dataclass(frozen=True)
class Keys:
    """The key layout under one prefix (`FEWSTEP_REDIS_PREFIX`, default "fewstep")."""

    prefix: str = "fewstep"

    def lane(self, lane: str) -> str:
        """Stream of work items of one lane about to be read: fields job, index, at (ms queued), item (JSON)."""
        return f"{self.prefix}:items:{lane}"

    def backlog_prefix(self, lane: str) -> str:
        """Prefix of the owners' backlogs of one lane (the owner follows): lists of `job|index|ms|item`."""
        return f"{self.prefix}:backlog:{lane}:"

    def waiting(self, lane: str) -> str:
        """One element per item in the lane's backlogs: the list's length is the backlog that autoscalers
        (KEDA's `redis` list trigger) scale workers on, since the stream holds only what is about to be read."""
        return f"{self.prefix}:waiting:{lane}"

    def ring(self, lane: str) -> str:
        """The owners with a backlog in one lane, in turn order (`scripts.FEED`)."""
        return f"{self.prefix}:ring:{lane}"

    @property
    def group(self) -> str:
        """The one consumer group every worker joins, on every lane."""
        return f"{self.prefix}:workers"

    @property
    def dead(self) -> str:
        """Dead-letter stream: items that exhausted their deliveries, with the reason."""
        return f"{self.prefix}:dead"

    @property
    def stats(self) -> str:
        """Hash of queue-wide counters (reclaims, retries, dead, submitted)."""
        return f"{self.prefix}:stats"

    @property
    def owner_cost(self) -> str:
        """Hash: "<owner>|<lane>" → network evaluations of that owner's items queued or running there."""
        return f"{self.prefix}:owner-cost"

    def owner_jobs(self, owner: str, lane: str) -> str:
        """Sorted set: job id → when it may expire, for one owner's jobs on one lane (`key_max_stored_jobs`)."""
        return f"{self.prefix}:owner-jobs:{owner}:{lane}"

    def bucket(self, owner: str, bucket: str) -> str:
        """Hash: tokens, at: one key's token bucket (`service/limits/redis.py`)."""
        return f"{self.prefix}:limit:{owner}:{bucket}"

    def leases(self, owner: str, what: str) -> str:
        """Sorted set: lease id → expiry (server time): one key's concurrent streams or sessions."""
        return f"{self.prefix}:leases:{owner}:{what}"

    def job(self, job_id: str) -> str:
        """Hash: owner, model, total, counters, status timestamps."""
        return f"{self.prefix}:job:{job_id}"

    def results(self, job_id: str) -> str:
        """Hash: item index → result JSON, written once (HSETNX)."""
        return f"{self.prefix}:job:{job_id}:results"

    def events(self, job_id: str) -> str:
        """Stream of progress events of one job, read by SSE clients and synchronous waiters."""
        return f"{self.prefix}:job:{job_id}:events"

    @property
    def webhooks(self) -> str:
        """Sorted set: webhook message id → when its next attempt is due."""
        return f"{self.prefix}:webhooks"

    @property
    def webhook_records(self) -> str:
        """Hash: webhook message id → its record (`WebhookDue` as JSON); `<id>:attempts` → attempts made."""
        return f"{self.prefix}:webhook-records"

    def idempotency(self, owner: str, key_digest: str) -> str:
        """String: the job an owner's `Idempotency-Key` created, with the body's fingerprint."""
        return f"{self.prefix}:idem:{owner}:{key_digest}"

    @property
    def workers(self) -> str:
        """Sorted set: worker name → time of its last heartbeat (alive within WORKER_TTL_S)."""
        return f"{self.prefix}:workers"

    @property
    def registry_channel(self) -> str:
        """Pub/sub channel on which pushes and rollbacks are announced to gateways and workers."""
        return f"{self.prefix}:registry"
