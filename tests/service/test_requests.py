"""Property tests of the request and WebSocket message validators: any input is either accepted as
something safe or refused with `InvalidRequest` (a 400 / close 1008), never another exception."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fewstep.errors import InvalidRequest
from fewstep.service.requests import check_prompt, json_object, parse_size, prompt_change, stream_start
from fewstep.service.settings import Settings

SETTINGS = Settings(api_keys=[])
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
FIELDS = st.sampled_from(["model", "prompt", "frames", "steps", "seed", "hybrid", "api_key", "type", "fps"])
MESSAGES = st.dictionaries(FIELDS | st.text(max_size=8), JSON, max_size=7)


@FAST
@given(st.text(max_size=600))
def test_a_prompt_is_accepted_only_as_encodable_printable_bounded_text(prompt: str) -> None:
    try:
        check_prompt(prompt, SETTINGS)
    except InvalidRequest as e:
        assert e.field == "prompt" and "`prompt`" in str(e)
        return
    prompt.encode("utf-8")  # no lone surrogates: a tokenizer takes it
    assert prompt.strip() and len(prompt) <= SETTINGS.max_prompt_chars
    assert all(c in "\t\n\r" or (ord(c) >= 0x20 and c != "\x7f") for c in prompt)


@FAST
@given(st.text(max_size=200) | st.builds(json.dumps, JSON) | st.integers(1, 20_000).map(lambda n: "[" * n))
def test_json_messages_parse_to_an_object_or_are_refused(raw: str) -> None:
    try:
        assert isinstance(json_object(raw, "the message"), dict)
    except InvalidRequest as e:
        assert "the message must be" in str(e)


@FAST
@given(MESSAGES)
def test_a_first_message_is_a_valid_start_or_refused_naming_a_field(msg: dict[str, Any]) -> None:
    try:
        start = stream_start(msg, SETTINGS)
    except InvalidRequest as e:
        assert str(e) and isinstance(e.field, str)
        return
    assert isinstance(start.prompt, str) and start.prompt.strip() and isinstance(start.frames, int)


@FAST
@given(MESSAGES.map(json.dumps) | st.text(max_size=100))
def test_a_mid_stream_message_is_a_prompt_change_or_refused(raw: str) -> None:
    try:
        prompt = prompt_change(raw, SETTINGS)
    except InvalidRequest:
        return
    assert json.loads(raw)["type"] == "prompt" and prompt.strip()


@FAST
@given(st.text(max_size=20) | st.from_regex(r"[0-9]{1,7}x[0-9]{1,7}", fullmatch=True))
def test_a_size_is_two_bounded_positive_integers_or_refused(size: str) -> None:
    try:
        w, h = parse_size(size)
    except InvalidRequest as e:
        assert e.field == "size"
        return
    assert w is not None and h is not None and 1 <= w < 100_000 and 1 <= h < 100_000
