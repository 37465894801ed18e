"""Admin routes (`FEWSTEP_ADMIN_KEYS`): roll a model back to an older version."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Header

from fewstep.errors import CheckpointError, Conflict, InvalidRequest, NotFound, RegistryError
from fewstep.models.registry import check_name
from fewstep.service.schemas import RollbackRequest, RollbackResponse
from fewstep.service.state import Gateway, GatewayDep
from fewstep.service.watch import announce

log = logging.getLogger("fewstep.service")
router = APIRouter()


@router.post("/v1/admin/models/{model}/rollback", response_model=RollbackResponse)
async def rollback(
    model: str,
    gw: GatewayDep,
    body: RollbackRequest | None = None,
    authorization: str | None = Header(None),
) -> RollbackResponse:
    """Point `model` at an older version (default: the newest older one the gate did not refuse)."""
    gw.admins.require(authorization)
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
        version = await gw.call(registry.rollback, model, to, _flavour(gw, model))
    except (RegistryError, CheckpointError) as e:
        raise Conflict(str(e).replace(f"{registry.root}/", "")) from e
    log.warning("admin rollback: %s %s → %s", model, previous, version)
    await gw.call(announce, gw.settings, model, version, "rollback")
    gw.images.nudged.set()
    gw.streams.versions.nudged.set()
    return RollbackResponse(model=model, version=version, previous=previous)


def _flavour(gw: Gateway, model: str) -> str:
    """The flavour of the gate verdicts that decide which of `model`'s versions were refused."""
    for versions in (gw.images, gw.streams.versions):
        if model in versions.models:
            return versions.loader.flavour(versions.models[model].kind)
    return gw.images.loader.flavour("image")
