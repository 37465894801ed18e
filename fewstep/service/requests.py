"""Request validation: image requests against the settings and a model's spec, and WebSocket messages.

Every violation is an `InvalidRequest` whose message names the limit and the value, in the house
format ("`steps` must be between 1 and 4. Given: 9"). Messages are parsed by pydantic models
(`schemas.StreamStart`, `schemas.PromptChange`) and their errors turned into that format.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import secrets
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from fewstep.engines.base import ImageItem
from fewstep.engines.specs import ImageSpec
from fewstep.errors import InvalidRequest, limit_error
from fewstep.models.schedules import MAX_SEED
from fewstep.service.schemas import (
    ImageEditRequest,
    ImageGenerationRequest,
    JobRequestItem,
    PromptChange,
    StreamStart,
)
from fewstep.service.settings import Settings

RESPONSE_FORMATS = ("b64_json",)
Start = tuple[str, int, int]
"""An edit's starting image as the gateway made it: (base64 PNG, width, height)."""
M = TypeVar("M", bound=BaseModel)


def build_items(
    req: ImageGenerationRequest | ImageEditRequest | JobRequestItem,
    spec: ImageSpec,
    settings: Settings,
    where: str = "",
    starts: list[Start] | None = None,
) -> list[ImageItem]:
    """Validate one image request against the settings and the model's spec; one item per image (an edit's:
    `n` per starting image, in the order given).

    `where` prefixes field names in messages ("requests[3]." inside a job)."""

    def limit(name: str, rule: str, given: object) -> InvalidRequest:
        return limit_error(where + name, rule, given)

    check_prompt(req.prompt, settings, where)
    if not 1 <= req.n <= settings.max_n:
        raise limit("n", f"between 1 and {settings.max_n}", req.n)
    strength = req.strength if isinstance(req, ImageEditRequest) else None
    if starts is not None and len(starts) * req.n > settings.max_n:
        raise limit(
            "n", f"at most {settings.max_n} images in all (`max_n`)", f"{req.n} for each of {len(starts)} images"
        )
    width, height = parse_size(req.size, where)
    if req.response_format not in RESPONSE_FORMATS:
        raise limit("response_format", " or ".join(repr(f) for f in RESPONSE_FORMATS), req.response_format)
    partials = getattr(req, "partial_images", 0)
    if not 0 <= partials <= settings.max_partial_images:
        raise limit("partial_images", f"between 0 and {settings.max_partial_images}", partials)
    partials = partials if getattr(req, "stream", False) else 0
    if req.steps is not None:
        steps = req.steps
    elif strength is not None and 0.0 < strength <= 1.0:
        steps = spec.edit_steps(strength)
    else:
        steps = spec.default_steps
    spec.check_steps(steps, where)
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED - settings.max_n:
        raise limit("seed", f"between 0 and {MAX_SEED - settings.max_n}", req.seed)
    base = req.seed if req.seed is not None else secrets.randbelow(1 << 31)
    if req.negative_prompt is not None:
        check_prompt(req.negative_prompt, settings, where, "negative_prompt")
    guidance = None if req.guidance_scale is None else _float(req.guidance_scale)
    if guidance is not None and not math.isfinite(guidance):
        raise limit("guidance_scale", "a finite number", req.guidance_scale)
    if starts is None:
        items = [
            ImageItem(req.prompt, base + i, steps, req.hybrid, width, height, guidance, req.negative_prompt)
            for i in range(req.n)
        ]
    else:
        items = [
            ImageItem(req.prompt, base + i, steps, req.hybrid, w, h, guidance, req.negative_prompt, image, strength)
            for i, (image, w, h) in enumerate(s for s in starts for _ in range(req.n))
        ]
    if partials:
        items = [dataclasses.replace(it, partials=partials) for it in items]
    for it in items:
        try:
            spec.validate(it)
        except InvalidRequest as e:
            raise InvalidRequest(where + e.field, str(e).replace(f"`{e.field}`", f"`{where}{e.field}`")) from e
    return items


def _float(value: float) -> float:
    """A JSON number as a float; infinity for an integer too large for one (refused as not finite)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


UNSAFE_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
"""Control characters other than tab and newlines, and unpaired UTF-16 surrogates (valid JSON escapes
that are not text: a tokenizer raises on them, and it encodes a whole batch at once)."""


def check_prompt(prompt: str, settings: Settings, where: str = "", field: str = "prompt") -> None:
    """A prompt the text encoders can take: non-empty, within `max_prompt_chars`, and text."""
    bad = UNSAFE_TEXT.search(prompt)
    if bad is not None:
        what = "an unpaired surrogate" if "\ud800" <= bad.group() <= "\udfff" else "a control character"
        raise InvalidRequest(
            where + field,
            f"`{where}{field}` must be text without control characters or unpaired surrogates. "
            f"Given: {what} ({bad.group()!a}) at position {bad.start()}",
        )
    if not prompt.strip() and field == "prompt":
        raise limit_error(where + field, "a non-empty string", prompt)
    if len(prompt) > settings.max_prompt_chars:
        chars = f"{len(prompt)} characters"
        raise limit_error(where + field, f"at most {settings.max_prompt_chars} characters long", chars)


SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")


def parse_size(size: str | None, where: str = "") -> tuple[int | None, int | None]:
    """`"WxH"` → (W, H); None → (None, None), the model's native size."""
    if size is None:
        return None, None
    m = SIZE.fullmatch(size)
    if m is None:
        raise limit_error(where + "size", "WxH in pixels, e.g. '512x512'", size)
    return int(m.group(1)), int(m.group(2))


def json_object(raw: str, what: str) -> dict[str, Any]:
    """`raw` parsed as a JSON object; InvalidRequest naming `what` otherwise."""
    try:
        msg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvalidRequest("message", f"{what} must be a JSON object ({e.msg})") from e
    except (ValueError, RecursionError) as e:  # an integer of thousands of digits; nesting past the stack
        raise InvalidRequest("message", f"{what} must be a small JSON object ({type(e).__name__})") from e
    if not isinstance(msg, dict):
        raise InvalidRequest("message", f"{what} must be a JSON object. Given: {type(msg).__name__}")
    return msg


_RULES = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "bool_type": "true or false",
    "string_type": "a non-empty string",
}


def parse(model: type[M], msg: dict[str, Any], settings: Settings) -> M:
    """`msg` as `model`, or InvalidRequest in the house format for the first field that is wrong
    (an unknown field first)."""
    try:
        return model.model_validate(msg)
    except ValidationError as e:
        errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
        first = errors[0]
        name = str(first["loc"][0]) if first["loc"] else "message"
        if first["type"] == "extra_forbidden":
            fields = tuple(model.model_fields)
            raise InvalidRequest(name, f"unknown field {name!r}; the message takes {fields}") from e
        if first["type"] == "missing" and name == "frames":
            raise limit_error(name, f"an integer between 1 and {settings.video_max_frames}", None) from e
        rule = _RULES.get(first["type"], "a non-empty string" if first["type"] == "missing" else "valid")
        raise limit_error(name, rule, msg.get(name)) from e


def stream_start(msg: dict[str, Any], settings: Settings) -> StreamStart:
    """The first message of a stream, validated (its API key is checked by the caller, before this)."""
    start = parse(StreamStart, msg, settings)
    if not start.model.strip():
        raise limit_error("model", "a non-empty string", start.model)
    check_prompt(start.prompt, settings)
    return start


def prompt_change(raw: str, settings: Settings) -> str:
    """The new prompt of a mid-stream message."""
    msg = json_object(raw, "messages")
    if msg.get("type") != "prompt":
        raise InvalidRequest(
            "type", f"a message mid-stream must be {{'type': 'prompt', 'prompt': …}}. Given: {raw[:100]!r}"
        )
    change = parse(PromptChange, msg, settings)
    check_prompt(change.prompt, settings)
    return change.prompt
