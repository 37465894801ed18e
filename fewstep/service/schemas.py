"""Request and response bodies of the REST API (OpenAI Images shape plus fewstep extensions)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr


class ImageGenerationRequest(BaseModel):
    """`POST /v1/images/generations`. Unknown OpenAI fields (quality, style, user) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    prompt: StrictStr
    n: StrictInt = 1
    size: StrictStr | None = None
    response_format: StrictStr = "b64_json"
    steps: StrictInt | None = Field(None, description="Student steps (NFE), 1-4; default: the model's.")
    seed: StrictInt | None = Field(None, description="Fixes the image; random when absent, echoed back.")
    hybrid: StrictBool = Field(False, description="Teacher runs the first step (diversity hybrid).")
    guidance_scale: StrictFloat | StrictInt | None = Field(
        None, description="Models whose family takes guidance (classic CFG or an embedding); default: the model's."
    )
    negative_prompt: StrictStr | None = Field(None, description="Models with classic CFG only.")
    stream: StrictBool = Field(False, description="Server-Sent Events: partial images, then the completed ones.")
    partial_images: StrictInt = Field(0, description="Partial images to stream before each final one (with `stream`).")


class ImageEditRequest(BaseModel):
    """`POST /v1/images/edits`'s form fields (multipart: values arrive as text and are read as their types). The
    images are the form's `image` (or `image[]`) files; unknown OpenAI fields (quality, background, user) are
    ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str
    n: int = 1
    size: str | None = None
    response_format: str = "b64_json"
    steps: int | None = Field(
        None, description="Student steps of the whole list, before `strength` keeps its last ones."
    )
    seed: int | None = None
    strength: float = Field(0.8, description="How much of the image is made anew, in (0, 1] (diffusers' default 0.8).")
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    hybrid: bool = False
    stream: bool = False
    partial_images: int = 0


class ImageDatum(BaseModel):
    b64_json: str
    seed: int
    revised_prompt: str | None = None


class ImageGenerationResponse(BaseModel):
    created: int
    model: str
    model_version: str
    steps: int
    nfe: int
    hybrid: bool
    size: str
    output_format: str = "png"
    data: list[ImageDatum]


class ModelVersion(BaseModel):
    version: str
    status: Literal["serving", "canary", "ready", "refused"]
    reason: str | None = None


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str | None = None
    """Version to make current; default the newest older one the serving gate did not refuse."""


class RollbackResponse(BaseModel):
    model: str
    version: str
    """The version the model now points at."""
    previous: str | None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "fewstep"
    kind: Literal["image", "video"]
    version: str | None
    versions: list[ModelVersion]
    steps: list[int]
    default_steps: int
    size: str
    backend: str
    precision: str
    hybrid: bool = Field(False, description="Whether `hybrid: true` requests are served (teacher loaded).")
    family: str | None = Field(None, description="An imported student's few-step family.")
    sizes: dict[str, int] | None = Field(None, description="Sizes besides the native one: min, max, multiple.")
    guidance: dict[str, str | float] | None = Field(None, description="How `guidance_scale` is taken, if at all.")
    edits: bool | None = Field(None, description="Whether `POST /v1/images/edits` takes this model (image models).")


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class JobRequestItem(BaseModel):
    """One request of a batch job: an image request without `model`."""

    model_config = ConfigDict(extra="ignore")

    prompt: StrictStr
    n: StrictInt = 1
    size: StrictStr | None = None
    response_format: StrictStr = "b64_json"
    steps: StrictInt | None = None
    seed: StrictInt | None = None
    hybrid: StrictBool = False
    guidance_scale: StrictFloat | StrictInt | None = None
    negative_prompt: StrictStr | None = None


class JobCreateRequest(BaseModel):
    """`POST /v1/jobs`."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    requests: list[JobRequestItem]
    webhook_url: StrictStr | None = Field(
        None, description="Announce the job's end here (signed, Standard Webhooks); a host `webhook_hosts` allows."
    )


class Job(BaseModel):
    """`GET /v1/jobs/{id}`. `total` counts images (a request with `n` = 3 adds 3)."""

    id: str
    object: str = "job"
    status: str
    model: str
    total: int
    done: int
    failed: int
    cancelled: int
    created: float
    started: float | None = None
    finished: float | None = None


class JobResult(BaseModel):
    index: int
    request: int
    b64_json: str
    seed: int
    steps: int
    nfe: int
    model_version: str | None


class JobError(BaseModel):
    index: int
    request: int
    outcome: str
    message: str | None


class JobResults(BaseModel):
    """`GET /v1/jobs/{id}/results`: images finished so far; failed and cancelled items in `errors`."""

    object: str = "list"
    status: str
    data: list[JobResult]
    errors: list[JobError]


class StreamStart(BaseModel):
    """The first message of `WS /v1/video/stream`."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    prompt: StrictStr
    frames: StrictInt
    steps: StrictInt | None = None
    seed: StrictInt | None = None
    hybrid: StrictBool = False
    guidance_scale: StrictFloat | StrictInt | None = None
    negative_prompt: StrictStr | None = None
    api_key: StrictStr | None = None


class PromptChange(BaseModel):
    """A message mid-stream: the frames after the one in progress follow `prompt`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["prompt"]
    prompt: StrictStr


class WebhookSecret(BaseModel):
    """`GET /v1/webhooks/secret`: the calling key's signing secret, as Standard Webhooks libraries take it."""

    object: str = "webhook_secret"
    secret: str


class VideoCreateRequest(BaseModel):
    """`POST /v1/videos` (JSON, or a multipart form as OpenAI's SDK sends it: values arrive as text and are read as
    their types). `seconds` × the model's frame rate is the clip's frame count; `steps` and `seed` are fewstep's
    extensions (`extra_body`). A field this server does not serve (`input_reference`) is refused."""

    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: str
    seconds: str | float = "4"
    size: str | None = None
    steps: int | None = Field(None, description="Student steps per frame; default: the model's.")
    seed: int | None = Field(None, description="Fixes the clip; random when absent.")


class VideoError(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    """OpenAI's Video object (`GET /v1/videos/{id}`): `status` queued | in_progress | completed | failed."""

    id: str
    object: Literal["video"] = "video"
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    error: VideoError | None = None
    model: str
    prompt: str | None = None
    seconds: str
    size: str
    remixed_from_video_id: str | None = None
    steps: int | None = None
    seed: int | None = None


class VideoList(BaseModel):
    """`GET /v1/videos`: one page, newest first unless `order=asc`; the next page is `?after=<last_id>`."""

    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True
