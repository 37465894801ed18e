"""The OpenAPI document says what the gateway really answers: every error in OpenAI's shape.

FastAPI documents a 422 with its own validation body for every route that takes input; fewstep
answers invalid input with 400 in OpenAI's error shape (service/errors.py), and every route can
answer the statuses below. Schemathesis checks the server against this document
(tests/service/test_fuzz.py), so a response outside it is a failing test.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
API_ERRORS = {
    "400": "invalid request: the message names the field, the rule and the value given",
    "401": "missing or invalid API key",
    "404": "no such model, job or route",
    "405": "method not allowed on this route",
    "408": "body not whole within `body_timeout_s`",
    "409": "conflict (an Idempotency-Key reused with another body, a cancelled request)",
    "413": "body over `max_body_bytes`",
    "431": "headers over `max_header_bytes`",
    "429": "a limit was reached (queue, per-key rate or cap); see Retry-After",
    "503": "not ready, shutting down, over `max_connections`, or the queue is unreachable; see Retry-After",
    "500": "the server's fault (an engine error)",
}
ADMIN_ERRORS = {"403": "not an admin key, or the admin routes are disabled"}
PROBE = {"type": "object", "properties": {"status": {"type": "string"}, "reason": {"type": "string"}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def document_errors(app: FastAPI) -> None:
    """Replace `app.openapi` with one that documents fewstep's errors on every route (built once)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas["Error"] = ERROR
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for path, operations in schema["paths"].items():
            for op in operations.values():
                responses = op["responses"]
                responses.pop("422", None)
                if path == "/readyz":
                    responses["503"] = {
                        "description": "not ready (why)",
                        "content": {"application/json": {"schema": PROBE}},
                    }
                    continue
                if path in ("/healthz", "/metrics"):
                    continue
                for status, description in {**API_ERRORS, **(ADMIN_ERRORS if "/admin/" in path else {})}.items():
                    responses.setdefault(status, _json(description, {"$ref": "#/components/schemas/Error"}))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
