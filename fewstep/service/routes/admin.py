"""Admin routes (`FEWSTEP_ADMIN_KEYS`): roll a model back to an older version."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Header, Request

from fewstep.errors import CheckpointError, Conflict, Forbidden, InvalidRequest, NotFound, RegistryError, Unauthorized
from fewstep.models.registry import check_name
from fewstep.service.kinds import runtime_of
from fewstep.service.schemas import RollbackRequest, RollbackResponse
from fewstep.service.state import GatewayDep, charge_failure
from fewstep.service.watch import announce

log = logging.getLogger("fewstep.service")
router = APIRouter()


@router.post("/v1/admin/models/{model}/rollback", response_model=RollbackResponse)
async def rollback(
    model: str,
    request: Request,
    gw: GatewayDep,
    body: RollbackRequest | None = None,
    authorization: str | None = Header(None),
) -> RollbackResponse:
    """Point `model` at an older version (default: the newest older one the gate did not refuse)."""
    try:
        gw.admins.require(authorization)
    except (Unauthorized, Forbidden):  # admin keys are guessed like any: the same per-address budget
        await gw.call(charge_failure, gw, request.client.host if request.client else "")
        raise
    registry = gw.images.registry
    to = body.to if body is not None else None
    for field, kind, name in (("model", "model", model), ("to", "version", to)):
        try:
            if name is not None:
                check_name(kind, name)
        except RegistryError as e:
            raise InvalidRequest(field, str(e)) from e
    if model not in registry.models():
        raise NotFound(f"model {model!r} not found in the registry")
    try:
        previous = registry.promoted(model)
    except RegistryError:
        previous = None  # a broken pointer: the rollback repairs it
    try:
        version = await gw.call(registry.rollback, model, to, runtime_of(registry, gw.settings, model))
    except (RegistryError, CheckpointError) as e:
        raise Conflict(str(e).replace(f"{registry.root}/", "")) from e
    log.warning("admin rollback: %s %s → %s", model, previous, version)
    await gw.call(announce, gw.settings, model, version, "rollback")
    gw.images.nudged.set()
    gw.streams.versions.nudged.set()
    return RollbackResponse(model=model, version=version, previous=previous)
