"""Domain errors → HTTP and WebSocket close codes, in one table, and the handlers that use it.

`STATUS` has an entry for every `FewstepError` subclass (tests/service/test_errors.py checks that
a new error class cannot silently become a 500). Every error body has OpenAI's shape.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fewstep.errors import (
    Cancelled,
    CheckpointError,
    Conflict,
    FewstepError,
    Forbidden,
    GenerationFailed,
    InvalidRequest,
    NotFound,
    NotReady,
    Overloaded,
    RangeNotSatisfiable,
    RegistryError,
    Unauthorized,
)

log = logging.getLogger("fewstep.service")

STATUS: dict[type[FewstepError], int] = {
    InvalidRequest: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    Cancelled: 409,
    RangeNotSatisfiable: 416,
    Overloaded: 429,
    NotReady: 503,
    GenerationFailed: 500,
    CheckpointError: 500,
    RegistryError: 500,
    FewstepError: 500,
}
"""HTTP status of each domain error class (looked up by exact class, then by its bases)."""


def http_status(exc: FewstepError) -> tuple[int, dict[str, str]]:
    """Status code and extra headers for a domain error."""
    status = next((STATUS[c] for c in type(exc).__mro__ if c in STATUS), 500)
    headers: dict[str, str] = {}
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, RangeNotSatisfiable):
        headers["Content-Range"] = f"bytes */{exc.size}"
    if isinstance(exc, Overloaded | NotReady):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return status, headers


WS_POLICY_VIOLATION, WS_INTERNAL_ERROR, WS_TRY_AGAIN_LATER = 1008, 1011, 1013


def ws_close_code(exc: FewstepError) -> int:
    """WebSocket close code for a domain error: the client's fault 1008, capacity or not yet loaded 1013,
    the server's fault 1011 (RFC 6455 §7.4)."""
    status, _ = http_status(exc)
    if status in (429, 503):
        return WS_TRY_AGAIN_LATER
    if status < 500:
        return WS_POLICY_VIOLATION
    return WS_INTERNAL_ERROR


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    416: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}
"""OpenAI's error `type` by status (what its SDK and clients written for it expect); 5xx: `server_error`."""


def error_body(message: str, code: str, param: str | None = None, status: int = 400) -> dict[str, object]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}: `type` from the status
    (`ERROR_TYPES`), `code` fewstep's own name for the error (`InvalidRequest`, `Overloaded`, …)."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(exc: FewstepError) -> JSONResponse:
    status, headers = http_status(exc)
    if status >= 500:
        log.error("request failed: %s: %s", type(exc).__name__, exc)
    param = exc.field if isinstance(exc, InvalidRequest) else None
    body = error_body(str(exc), type(exc).__name__, param, status)
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Register the handlers: domain errors, request-schema errors, and anything unexpected."""

    async def on_domain(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, FewstepError)
        return error_response(exc)

    async def on_schema(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(
                error_body(
                    f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}", "InvalidRequest", "body"
                ),
                status_code=STATUS[InvalidRequest],
            )
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        field = ".".join(loc) or "body"
        msg = f"`{field}`: {first.get('msg', 'invalid value')}. Given: {first.get('input')!r}"
        return JSONResponse(error_body(msg, "InvalidRequest", field), status_code=STATUS[InvalidRequest])

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        """Starlette's own errors (no such route, a method the route does not take) in OpenAI's shape."""
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            message, kind = f"no route {request.method} {request.url.path}", "NotFound"
        elif exc.status_code == 405:
            allowed = next((v for k, v in (exc.headers or {}).items() if k.lower() == "allow"), "")
            message, kind = (
                f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}",
                "MethodNotAllowed",
            )
        else:
            message, kind = str(exc.detail), "HTTPError"
        return JSONResponse(
            error_body(message, kind, None, exc.status_code), status_code=exc.status_code, headers=exc.headers
        )

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal error", "InternalError", None, 500), status_code=500)

    app.add_exception_handler(FewstepError, on_domain)
    app.add_exception_handler(RequestValidationError, on_schema)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
