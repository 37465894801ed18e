"""The `JobQueue` protocol and the records that cross it.

Two implementations keep one set of semantics (tests/service/queue/test_conformance.py runs
against both):

* `EmbeddedQueue`: in-process, the default, for one machine and for development;
* `RedisQueue`: Redis Streams with one consumer group, for gateways and workers that scale apart.

Semantics (the same for both):

* A job is N items. The gateway `submit`s it; workers `claim` items, run them and `finish` each
  with one `ItemResult`. Delivery is **at least once**: an item whose worker died is taken back
  by `reclaim` once idle past a timeout, so the engine may run an item twice, but a result is
  written **once** per (job, item): later writes are ignored.
* Workers `heartbeat` their in-flight items so that long items are not taken back.
* An item delivered `max_deliveries` times without a result goes to the dead-letter record
  (written before the item is acknowledged) and its job reports that item failed.
* `submit` is atomic: either all N items are queued or none, and a full lane raises `Overloaded`.
  The same owner and `Idempotency-Key` return the job the key first created.
* `cancel` marks the job; workers skip its queued items and stop running ones at the next
  denoising step (`cancelled` is what they ask).
* An item is an image (`ImageItem`, on the interactive and batch lanes) or a clip (`StreamRequest`, on the video
  lane, which image workers never claim). A running clip reports how far it got (`progress`); an owner's jobs of
  one lane can be listed (`jobs`: `GET /v1/videos`).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

from fewstep.engines.base import ImageItem, StreamRequest
from fewstep.errors import Conflict, InvalidRequest, Overloaded
from fewstep.service.queue.keys import IMAGE_LANES, INTERACTIVE

ItemOutcome = Literal["ok", "failed", "cancelled"]
"""How an item ended, as its result records it (an engine's `Outcome` is what made it)."""
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Work = ImageItem | StreamRequest
"""What one item of a job makes: an image, or a clip (a stream session run to its end and encoded)."""


@dataclass(frozen=True)
class JobSpec:
    """What the gateway submits. `fingerprint` identifies the body for idempotency checks."""

    owner: str
    model: str
    items: Sequence[Work]
    lane: str
    ttl_s: int
    idempotency_key: str | None = None
    fingerprint: str = ""
    requests: list[int] | None = None
    """Which request of the body each item came from (a request with `n` > 1 makes n items)."""
    owner_limit: int | None = None
    """Most cost (`cost`) this owner may have queued or running on this lane, this job included;
    None: no per-owner limit (the lane's depth still holds)."""
    owner_jobs: int | None = None
    """Most jobs of this owner kept on this lane (queued, running or finished and not yet expired), this
    one included; None: no limit. Bounds what one key makes the queue remember."""
    costs: list[int] | None = None
    """Each item's cost in network evaluations, from the model's spec (a hybrid's teacher hand-off,
    classic guidance); None: `item_cost`'s estimate."""
    webhook: str | None = None
    """Where the job's end is announced (`job.completed`, `job.failed`, `job.cancelled`): a URL the gateway
    checked against the webhook settings. The queue schedules the delivery in the same step that records the
    job's last result, so no finished job loses its webhook (`WebhookDue`)."""
    meta: str = ""
    """What the gateway keeps with the job and reads back in `JobStatus.meta` (a video's prompt, seconds and
    size); opaque to the queue."""

    @property
    def cost(self) -> int:
        return sum(self.cost_of(i) for i in range(len(self.items)))

    def cost_of(self, index: int) -> int:
        return self.costs[index] if self.costs is not None else item_cost(self.items[index])

    def request_of(self, index: int) -> int:
        return self.requests[index] if self.requests is not None else 0


def item_cost(item: Work) -> int:
    """An item's cost in network evaluations when its model's spec did not say (`JobSpec.costs`): its
    steps, and one more for a hybrid's teacher; a clip's steps for each of its frames and the pass that writes
    each frame into the cache. Items queued by a gateway carry the spec's figure."""
    if isinstance(item, StreamRequest):
        return item.frames * (item.steps + 1)
    return item.steps + (1 if item.hybrid else 0)  # an edit runs at most its steps


@dataclass(frozen=True)
class WorkItem:
    """One item of one job, as a worker receives it. `owner` is the submitting key's id: the queue
    gives the item's cost back to that owner's budget when the item is acknowledged."""

    job_id: str
    index: int
    model: str
    item: Work
    cost: int
    """Network evaluations the queue charged the item's owner (`JobSpec.cost_of`), given back when the item
    is acknowledged."""
    request: int = 0
    owner: str = ""

    @property
    def image(self) -> ImageItem:
        """The item as an image; `InvalidRequest` for a clip (a misrouted item fails alone, never its worker)."""
        if not isinstance(self.item, ImageItem):
            raise InvalidRequest("item", "an image worker was handed a clip: clips belong to the video lane")
        return self.item

    def encode(self) -> str:
        fields = {"model": self.model, "request": self.request, "owner": self.owner, "cost": self.cost}
        kind = {"type": "clip"} if isinstance(self.item, StreamRequest) else {}
        return json.dumps({**fields, **kind, **asdict(self.item)}, sort_keys=True)

    @classmethod
    def decode(cls, job_id: str, index: int, payload: str) -> WorkItem:
        d = json.loads(payload)
        item = _clip(d) if d.get("type") == "clip" else _image(d)
        return cls(
            job_id=job_id,
            index=index,
            model=d["model"],
            item=item,
            cost=item_cost(item) if d.get("cost") is None else int(d["cost"]),  # absent: queued before costs
            request=int(d.get("request", 0)),
            owner=str(d.get("owner", "")),
        )


def _clip(d: dict) -> StreamRequest:
    return StreamRequest(
        prompt=d["prompt"],
        frames=int(d["frames"]),
        steps=int(d["steps"]),
        seed=int(d["seed"]),
        hybrid=bool(d["hybrid"]),
    )


def _image(d: dict) -> ImageItem:
    guidance = d.get("guidance")
    item = ImageItem(
        prompt=d["prompt"],
        seed=int(d["seed"]),
        steps=int(d["steps"]),
        hybrid=bool(d["hybrid"]),
        width=None if d.get("width") is None else int(d["width"]),
        height=None if d.get("height") is None else int(d["height"]),
        guidance=None if guidance is None else float(guidance),
        negative_prompt=d.get("negative_prompt"),
        image=d.get("image"),
        strength=None if d.get("strength") is None else float(d["strength"]),
        partials=int(d.get("partials", 0)),
    )
    return item


@dataclass(eq=False)  # identity: the scheduler uses deliveries as tickets
class Delivery:
    """A work item handed to one worker. `deliveries` counts handings, this one included."""

    entry_id: str
    lane: str
    work: WorkItem
    deliveries: int = 1
    queued_at: float = 0.0
    """Wall-clock time the item was queued (for wait-time metrics)."""


@dataclass(frozen=True)
class ItemResult:
    """The one result of one item. `b64_json` is the PNG for `ok`; `error` says why otherwise."""

    index: int
    outcome: ItemOutcome
    seed: int
    request: int = 0
    steps: int = 0
    nfe: int = 0
    model_version: str | None = None
    b64_json: str | None = None
    error: str | None = None
    finished_at: float = field(default_factory=time.time)

    def encode(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def decode(cls, payload: str | bytes) -> ItemResult:
        return cls(**json.loads(payload))


@dataclass(frozen=True)
class JobStatus:
    """A job as `GET /v1/jobs/{id}` reports it."""

    id: str
    status: JobState
    model: str
    total: int
    done: int
    failed: int
    cancelled: int
    created: float
    started: float | None = None
    finished: float | None = None
    expires: float | None = None
    """When the job and its results expire unless written again (the job's TTL from its last write)."""
    progress: int = 0
    """How far its running item got, 0–100 (`JobQueue.progress`: a clip's frames made so far)."""
    meta: str = ""
    """`JobSpec.meta`, as submitted."""

    @classmethod
    def of(
        cls,
        job_id: str,
        model: str,
        counts: tuple[int, int, int, int],
        times: tuple[float, float | None, float | None],
        cancel_requested: bool,
        more: tuple[float | None, int, str] = (None, 0, ""),
    ) -> JobStatus:
        """The record from (total, done, failed, cancelled), (created, started, finished) and (expires, progress,
        meta); the state is derived."""
        total, done, failed, cancelled = counts
        created, started, finished = times
        state = job_state(cancel_requested, started is not None, total, done, failed, cancelled)
        return cls(job_id, state, model, total, done, failed, cancelled, created, started, finished, *more)

    @property
    def settled(self) -> bool:
        """Every item has its result (ok, failed or cancelled)."""
        return self.done + self.failed + self.cancelled >= self.total


@dataclass(frozen=True)
class JobEvent:
    """One progress event. `cursor` resumes the event stream after this event."""

    cursor: str
    kind: Literal["item", "cancel", "end", "partial"]
    index: int | None = None
    outcome: str | None = None
    partial: int | None = None
    """A `partial` event's partial-image index (0-based) of item `index`."""
    data: str | None = None
    """A `partial` event's image: base64 PNG."""


@dataclass(frozen=True)
class WebhookDue:
    """A job's end to announce, as the queue recorded it when the job finished: the job's figures then, the URL,
    and how many attempts were made before this one. `id` is the message id (the same at every attempt, so
    that receivers drop repeats)."""

    id: str
    job: str
    owner: str
    url: str
    model: str
    counts: tuple[int, int, int, int]
    """(total, done, failed, cancelled)."""
    cancel: bool
    created: float
    finished: float
    attempts: int = 0

    @property
    def state(self) -> JobState:
        return job_state(self.cancel, True, *self.counts)

    def encode(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def decode(cls, payload: str | bytes, attempts: int) -> WebhookDue:
        d = json.loads(payload)
        d["counts"] = tuple(int(c) for c in d["counts"])
        return cls(**{**d, "attempts": attempts})


def webhook_id(job_id: str) -> str:
    """The message id of a job's end: one per job."""
    return f"msg_{job_id}"


@dataclass(frozen=True)
class QueueStats:
    """Queue-wide numbers for `/metrics`."""

    depth: dict[str, int]
    in_flight: int
    oldest_age_s: float
    dead: int
    reclaims: int
    retries: int
    workers: int
    """Image workers with a recent claim or heartbeat (`keys.image_worker`)."""


@dataclass(frozen=True)
class Written:
    """What `finish` did: whether it wrote the result, and the job's age if that result completed it."""

    wrote: bool
    job_seconds: float | None = None


def job_state(cancel_requested: bool, started: bool, total: int, done: int, failed: int, cancelled: int) -> JobState:
    """The one rule both queues use to name a job's state from its counters."""
    if cancel_requested:
        return "cancelled"
    if done + failed + cancelled >= total:
        return "failed" if failed else "succeeded"
    if started or done or failed:
        return "running"
    return "queued"


def valid_job_id(job_id: str) -> bool:
    """Job ids are server-made url-safe tokens; anything else is unknown, not a key to look up."""
    return bool(_JOB_ID.fullmatch(job_id))


def fingerprint(model: str, requests: list[dict]) -> str:
    """A stable digest of a job body, to tell a retried submission from a different one."""
    body = json.dumps({"model": model, "requests": requests}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def key_digest(idempotency_key: str) -> str:
    """Idempotency keys are client strings: store a digest, never the raw value, under a key name."""
    return hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]


def owner_over_limit(spec: JobSpec, outstanding: int) -> Overloaded:
    setting = "key_max_sync_cost" if spec.lane == INTERACTIVE else "key_max_job_cost"
    return Overloaded(
        f"this key has {outstanding} network evaluations of {spec.lane} work queued or running; this job adds "
        f"{spec.cost}, over the per-key limit of {spec.owner_limit} (`{setting}`)",
        retry_after=5.0,
    )


def owner_over_jobs(spec: JobSpec, kept: int) -> Overloaded:
    return Overloaded(
        f"this key has {kept} {spec.lane} jobs kept (queued, running, or finished within `result_ttl_s`), the "
        f"per-key limit (`key_max_stored_jobs` = {spec.owner_jobs})",
        retry_after=60.0,
    )


def idempotency_conflict(key: str) -> Conflict:
    return Conflict(f"`Idempotency-Key` {key!r} was already used with a different body")


class JobQueue(Protocol):
    """The queue between gateways (submit, observe, cancel) and workers (claim, finish)."""

    in_process: bool
    """Whether calls stay in this process (no I/O; a lock held for microseconds): the gateway then makes them on
    its event loop instead of paying a thread hop for each (with a busy engine thread, every hop also waits
    for the GIL)."""

    # -- gateway side ------------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> JobStatus:
        """Queue all items atomically, or return the job an idempotency key already made.

        Raises `Overloaded` when the lane is full, `Conflict` when the key names another body,
        `NotReady` when the queue is unreachable.
        """

    def status(self, job_id: str, owner: str) -> JobStatus:
        """The job's counters; `NotFound` when it does not exist or belongs to another owner."""

    def results(self, job_id: str, owner: str) -> list[ItemResult]:
        """Results written so far, by index."""

    def cancel(self, job_id: str, owner: str) -> JobStatus:
        """Mark the job cancelled; idempotent."""

    def events(self, job_id: str, cursor: str, block_s: float) -> list[JobEvent]:
        """Events after `cursor` ("0" for all), waiting up to `block_s` for the first one."""

    def watch(self, cursors: dict[str, str], block_s: float) -> dict[str, list[JobEvent]]:
        """Events after each job's cursor, for many jobs in one call (one gateway thread serves every
        waiter: service/events.py); waits up to `block_s` for the first, or until `interrupt`. Jobs
        with nothing new (or unknown) are left out."""

    def interrupt(self) -> None:
        """Make a `watch` in progress (or the next one) return at once: its set of jobs changed."""

    def valid_cursor(self, cursor: str) -> bool:
        """Whether `cursor` is an event id this queue could have sent ("0": from the start). Cursors come from
        clients (`Last-Event-ID`); one this queue cannot read must be refused before it joins a shared `watch`."""

    def jobs(self, owner: str, lane: str) -> list[JobStatus]:
        """The owner's jobs kept on `lane` (queued, running, or finished and not yet expired), oldest first."""
        ...

    def forget(self, job_id: str, owner: str) -> None:
        """Drop a job, its results and events now (a synchronous request's, once its caller has them), so
        that memory holds results only while someone may still read them. Unknown jobs are ignored."""

    def stats(self) -> QueueStats:
        """Depth per lane, items in flight, oldest item's age, dead letters, reclaims, workers."""

    def ping(self) -> None:
        """Raise `NotReady` if the queue cannot be reached."""

    def dead_letters(self) -> list[dict[str, str]]:
        """Dead-lettered items: job, index, item, deliveries, reason."""

    # -- worker side -------------------------------------------------------------------------
    def claim(
        self, consumer: str, max_items: int, block_s: float, gather_s: float, lanes: tuple[str, ...] = IMAGE_LANES
    ) -> list[Delivery]:
        """Up to `max_items` new items of `lanes`, in that order (interactive first); the consumer is marked alive
        (an image worker when `lanes` holds an image lane: `keys.image_worker`).

        Waits up to `block_s` for the first item, then up to `gather_s` for company.
        """

    def reclaim(
        self,
        consumer: str,
        min_idle_s: float,
        max_deliveries: int,
        max_items: int,
        lanes: tuple[str, ...] = IMAGE_LANES,
    ) -> list[Delivery]:
        """Take over items of `lanes` idle longer than `min_idle_s`; dead-letter those past `max_deliveries`."""

    def heartbeat(self, consumer: str, deliveries: list[Delivery], lanes: tuple[str, ...] = IMAGE_LANES) -> None:
        """Reset the idle time of items still running, and mark the consumer of `lanes` alive (as `claim` does)."""

    def finish(self, done: list[tuple[Delivery, ItemResult]]) -> list[Written]:
        """Write each item's result (once: later writes are ignored) and acknowledge it.

        Each item is atomic on its own; the batch is one round trip, not one transaction, so
        retrying a batch after a partial failure is safe.
        """

    def partial(self, job_id: str, index: int, partial: int, b64_png: str) -> None:
        """Add a partial image of item `index` to the job's events (a streamed request's, `partial_images`). Best
        effort, not a result: nothing is written for a job that is gone or already finished."""
        ...

    def cancelled(self, job_ids: set[str]) -> set[str]:
        """Which of these jobs have been cancelled (or have expired)."""

    def progress(self, job_id: str, percent: int) -> None:
        """Record how far a running job got, 0–100 (a clip's frames made so far). Best effort, not a result: a job
        that is gone or finished is left as it is, and progress never goes back."""
        ...

    def webhooks_due(self, now: float, lease_s: float, n: int) -> list[WebhookDue]:
        """Up to `n` webhook deliveries due by `now`, each leased for `lease_s` (not handed out again meanwhile;
        a sender that dies leaves them to another once the lease ends)."""
        ...

    def webhook_retry(self, due: WebhookDue, at: float) -> None:
        """Try `due` again at `at` (one more attempt counted)."""
        ...

    def webhook_done(self, due: WebhookDue) -> None:
        """`due` is delivered, or given up: forget it."""
        ...

    def close(self) -> None:
        """Release connections; pending waits end."""
