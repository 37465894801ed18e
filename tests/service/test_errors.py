"""Errors → HTTP: one table with an entry for every domain error class, in OpenAI's error shape."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import fewstep
from fewstep.errors import (
    CheckpointError,
    FewstepError,
    InvalidRequest,
    NotFound,
    NotReady,
    Overloaded,
    Unauthorized,
)
from fewstep.service.errors import STATUS, error_response, http_status, ws_close_code


def _subclasses(cls: type) -> set[type]:
    return {cls} | {s for c in cls.__subclasses__() for s in _subclasses(c)}


def test_every_domain_error_class_has_an_entry_in_the_table() -> None:
    for info in pkgutil.walk_packages(fewstep.__path__, "fewstep."):  # wherever a subclass may be defined
        importlib.import_module(info.name)
    missing = sorted(c.__qualname__ for c in _subclasses(FewstepError) if c not in STATUS)
    assert missing == [], f"add these to fewstep.service.errors.STATUS: {missing}"


@pytest.mark.parametrize(
    ("error", "status", "headers", "close"),
    [
        (InvalidRequest("steps", "`steps` must be between 1 and 4. Given: 9"), 400, {}, 1008),
        (Unauthorized("missing API key"), 401, {"WWW-Authenticate": "Bearer"}, 1008),
        (NotFound("model 'x' not found"), 404, {}, 1008),
        (Overloaded("queue full", retry_after=2.4), 429, {"Retry-After": "2"}, 1013),
        (NotReady("loading", retry_after=0.2), 503, {"Retry-After": "1"}, 1013),
        (CheckpointError("bad weights"), 500, {}, 1011),
    ],
)
def test_statuses_headers_and_close_codes(error: FewstepError, status: int, headers: dict, close: int) -> None:
    assert http_status(error) == (status, headers)
    assert ws_close_code(error) == close
    body = error_response(error).body
    assert b'"error":{"message":' in body and b'"code":"' + type(error).__name__.encode() in body
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
    assert (
        b'"type":"' + kind.get(status, "service_unavailable_error" if status == 503 else "server_error").encode()
        in body
    )


def test_recoverable_errors_are_the_clients_or_the_moments_and_fatal_ones_the_artifacts() -> None:
    assert InvalidRequest("x", "y").recoverable and NotReady("z").recoverable
    assert not CheckpointError("bad").recoverable
