"""`GET /v1/models`: every served model, image and video, in one list (OpenAI's shape plus fewstep's)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from fewstep.engines.specs import ImageSpec, Spec, VideoSpec
from fewstep.service.routes.videos import clip_limits
from fewstep.service.schemas import ModelCard, ModelList, ModelVersion
from fewstep.service.settings import Settings
from fewstep.service.state import GatewayDep, principal

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(principal)])
async def list_models(gw: GatewayDep) -> ModelList:
    cards = []
    s = gw.settings
    for kind, versions, backend, precision in (
        ("image", gw.images, s.backend, s.precision),
        ("video", gw.streams.versions, s.video_backend, "fp32"),
    ):
        for m in list(versions.models.values()):
            spec = m.serving.spec if m.serving is not None else None
            cards.append(
                ModelCard(
                    id=m.name,
                    created=m.created,
                    kind=kind,
                    version=m.serving.version if m.serving is not None else None,
                    versions=[ModelVersion(version=v, status=st, reason=why) for v, (st, why) in m.statuses.items()],
                    steps=spec.steps if spec else [],
                    default_steps=spec.default_steps if spec else 0,
                    size=spec.size if spec else "",
                    backend=spec.backend if spec else backend,
                    precision=spec.precision if spec else precision,
                    hybrid=bool(spec and spec.hybrid),
                    **_image_fields(spec),
                    **_video_fields(spec, s),
                )
            )
    return ModelList(data=cards)


def _image_fields(spec: Spec | None) -> dict[str, Any]:
    """What an image model takes beyond steps: edits, and its family, sizes and guidance (imported students)."""
    if not isinstance(spec, ImageSpec):
        return {}
    if spec.family is None:
        return {"edits": spec.edits}
    g = spec.guidance
    sizes = (
        None if spec.sizes is None else {"min": spec.sizes.low, "max": spec.sizes.high, "multiple": spec.sizes.multiple}
    )
    guidance = (
        {"mode": g.mode} if g.mode == "none" else {"mode": g.mode, "min": g.low, "max": g.high, "default": g.default}
    )
    return {"family": spec.family, "sizes": sizes, "guidance": guidance, "edits": spec.edits}


def _video_fields(spec: Spec | None, settings: Settings) -> dict[str, Any]:
    """What a video of a video model can be (`POST /v1/videos`): its frame rate, its most frames, the frame counts it
    makes, and whether it makes MP4s at all (H.264 in yuv420p needs even sides)."""
    if not isinstance(spec, VideoSpec):
        return {}
    fps, most = clip_limits(spec, settings)
    even = spec.width % 2 == 0 and spec.height % 2 == 0
    return {"fps": fps, "max_frames": most, "frame_step": spec.frame_step, "videos": even}
