"""Batch jobs: `POST /v1/jobs`, `GET /v1/jobs/{id}` (+ `/results`, `/events`), `DELETE /v1/jobs/{id}`.

A job's items go to the batch lane of the queue; its owner (the caller's key) alone may see it. The
events stream is Server-Sent Events: a `status` event, then `item`, `cancel` and a final `end`.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Header
from fastapi.responses import StreamingResponse

from fewstep.engines.base import ImageItem
from fewstep.errors import FewstepError, InvalidRequest, limit_error
from fewstep.service.events import sse
from fewstep.service.limits import Lease
from fewstep.service.queue.base import JobSpec, JobStatus, fingerprint
from fewstep.service.queue.keys import BATCH
from fewstep.service.requests import build_items
from fewstep.service.routes.images import image_spec
from fewstep.service.schemas import Job, JobCreateRequest, JobError, JobResult, JobResults, WebhookSecret
from fewstep.service.state import Gateway, GatewayDep, Owner
from fewstep.service.webhooks import check_url, signing_secret, whsec

router = APIRouter()
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def job_view(st: JobStatus) -> Job:
    return Job(**dataclasses.asdict(st))


@router.post("/v1/jobs", status_code=202, response_model=Job)
async def create_job(
    body: JobCreateRequest,
    owner: Owner,
    gw: GatewayDep,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key"),
) -> Job:
    settings = gw.settings
    if idempotency_key is not None and not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
        raise limit_error("Idempotency-Key", "1 to 255 printable ASCII characters", idempotency_key[:300])
    if not 1 <= len(body.requests) <= settings.max_job_items:
        raise limit_error("requests", f"a list of 1 to {settings.max_job_items} requests", len(body.requests))
    spec = image_spec(gw, body.model)
    items: list[ImageItem] = []
    origin: list[int] = []
    for i, r in enumerate(body.requests):
        made = build_items(r, spec, settings, where=f"requests[{i}].")
        items += made
        origin += [i] * len(made)
        if len(items) > settings.max_job_items:
            raise limit_error("requests", f"at most {settings.max_job_items} images in all", f"{len(items)}+")
    job = JobSpec(
        owner=owner,
        model=body.model,
        items=items,
        lane=BATCH,
        ttl_s=settings.result_ttl_s,
        idempotency_key=idempotency_key,
        fingerprint=fingerprint(body.model, [r.model_dump() for r in body.requests]),
        requests=origin,
        owner_limit=gw.owner_limit(settings.key_max_job_cost),
        owner_jobs=settings.key_max_stored_jobs,
        costs=[spec.cost(it) for it in items],
        webhook=None if body.webhook_url is None else check_url(body.webhook_url, settings),
    )
    await gw.spend(owner, "jobs")
    return job_view(await gw.ask(gw.queue.submit, job))


@router.get("/v1/webhooks/secret", response_model=WebhookSecret)
async def webhook_secret(owner: Owner, gw: GatewayDep) -> WebhookSecret:
    """The calling key's webhook signing secret (each key has its own; no key sees another's)."""
    if gw.settings.webhook_secret is None:
        raise InvalidRequest("webhook_url", "webhooks are not enabled here (`webhook_secret` is not set)")
    return WebhookSecret(secret=whsec(signing_secret(gw.settings, owner)))


@router.get("/v1/jobs/{job_id}", response_model=Job)
async def get_job(job_id: str, owner: Owner, gw: GatewayDep) -> Job:
    return job_view(await gw.ask(gw.queue.status, job_id, owner))


@router.delete("/v1/jobs/{job_id}", response_model=Job)
async def cancel_job(job_id: str, owner: Owner, gw: GatewayDep) -> Job:
    return job_view(await gw.ask(gw.queue.cancel, job_id, owner))


@router.get("/v1/jobs/{job_id}/results", response_model=JobResults)
async def job_results(job_id: str, owner: Owner, gw: GatewayDep) -> JobResults:
    status = await gw.ask(gw.queue.status, job_id, owner)
    results = await gw.ask(gw.queue.results, job_id, owner)
    return JobResults(
        status=status.status,
        data=[
            JobResult(
                index=r.index,
                request=r.request,
                b64_json=r.b64_json or "",
                seed=r.seed,
                steps=r.steps,
                nfe=r.nfe,
                model_version=r.model_version,
            )
            for r in results
            if r.outcome == "ok"
        ],
        errors=[
            JobError(index=r.index, request=r.request, outcome=r.outcome, message=r.error)
            for r in results
            if r.outcome != "ok"
        ],
    )


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"description": "Server-Sent Events", "content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: str,
    owner: Owner,
    gw: GatewayDep,
    last_event_id: str | None = Header(None, alias="Last-Event-ID"),
) -> StreamingResponse:
    if last_event_id is not None and not gw.queue.valid_cursor(last_event_id):  # checked by the queue's own rule
        raise limit_error("Last-Event-ID", "an event id this stream sent", last_event_id[:64])
    first = await gw.ask(gw.queue.status, job_id, owner)
    await gw.spend(owner, "event streams")
    s = gw.settings
    ttl = 3 * s.sse_keepalive_s + 30  # renewed at least every keep-alive while the stream lives
    lease = await gw.hold(owner, "event streams", s.key_max_event_streams, ttl, "key_max_event_streams")

    async def stream() -> AsyncIterator[str]:
        try:
            async for chunk in events(gw, job_id, owner, first, last_event_id or "0", lease):
                yield chunk
        finally:
            await gw.release(lease)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


async def events(
    gw: Gateway, job_id: str, owner: str, first: JobStatus, cursor: str, lease: Lease | None
) -> AsyncIterator[str]:
    """The SSE frames of one job after `cursor`: a status first, then items, a cancel, and an end.
    The stream's lease is renewed every keep-alive interval while it lives."""
    yield sse("status", job_view(first).model_dump())
    quiet_since = renewed_at = time.monotonic()
    while True:
        if gw.drain.draining.is_set():  # the gateway is leaving: the client resumes elsewhere from here
            yield sse("shutdown", {"message": "server shutting down: reconnect with Last-Event-ID"}, cursor)
            return
        if time.monotonic() - renewed_at >= gw.settings.sse_keepalive_s:
            renewed_at = time.monotonic()
            await gw.renew(lease)
        fresh = await gw.events.next(job_id, cursor, 1.0)
        try:
            st = await gw.ask(gw.queue.status, job_id, owner)
        except FewstepError as gone:  # the job expired or the queue went away mid-stream
            yield sse("error", {"message": str(gone)})
            return
        if not fresh and st.finished is not None:  # finished: what is left after the cursor, then the end
            fresh = await gw.ask(gw.queue.events, job_id, cursor, 0.0)
            if not fresh:
                yield sse("end", job_view(st).model_dump())
                return
        if not fresh:
            if time.monotonic() - quiet_since >= gw.settings.sse_keepalive_s:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"
            continue
        quiet_since = time.monotonic()
        counts = {"done": st.done, "failed": st.failed, "cancelled": st.cancelled, "total": st.total}
        for ev in fresh:
            cursor = ev.cursor
            if ev.kind == "item":
                yield sse("item", {"index": ev.index, "outcome": ev.outcome, **counts}, ev.cursor)
            elif ev.kind == "cancel":
                yield sse("cancel", counts, ev.cursor)
            elif ev.kind == "end":
                yield sse("end", job_view(st).model_dump(), ev.cursor)
                return  # (partial images are for the request that streams them, not for a job's events)
