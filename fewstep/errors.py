"""Every domain error fewstep raises, in one place.

Errors are split into *recoverable* (the request was wrong, or the system is busy: the
caller may retry or fix the request; serving goes on) and *fatal* (an artifact or the
process is broken): a model version whose load fails with a fatal error is refused, one
that fails with a recoverable error is tried again (service/versions.py). The HTTP mapping
lives in exactly one table, `fewstep.service.errors.STATUS`.

This module sits outside the `models → … → service` flow on purpose: it is a leaf that
every stage may import, and it imports nothing.
"""

from __future__ import annotations


class FewstepError(Exception):
    """Base class. `recoverable` says whether serving can go on unchanged."""

    recoverable: bool = True


class InvalidRequest(FewstepError):
    """A request value is outside its limit. The message names the limit and the value."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def limit_error(field: str, rule: str, given: object) -> InvalidRequest:
    """The house format for limit violations: "`steps` must be <= 4. Given: 9" (a long value shortened)."""
    return InvalidRequest(field, f"`{field}` must be {rule}. Given: {shown(given)}")


def shown(value: object, limit: int = 80) -> str:
    """`repr(value)` for a message, at most about `limit` characters: clients send 5000-digit numbers too (whose
    repr Python refuses to make)."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return "an integer of thousands of digits"
    return text if len(text) <= limit else f"{text[: limit - 20]}… ({len(text)} characters)"


class Unauthorized(FewstepError):
    """Missing or unknown API key."""


class Forbidden(FewstepError):
    """A valid caller asked for something its key does not allow (admin routes)."""


class NotFound(FewstepError):
    """An unknown model, version or job."""


class Overloaded(FewstepError):
    """Too much work queued; the caller should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotReady(FewstepError):
    """The service is alive but cannot take this request yet (models loading, queue down)."""

    def __init__(self, message: str, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Conflict(FewstepError):
    """The request contradicts stored state (an `Idempotency-Key` reused with a different body)."""


class RangeNotSatisfiable(FewstepError):
    """An HTTP `Range` that does not parse, or asks for bytes past the end of a `size`-byte body."""

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


class Cancelled(FewstepError):
    """The work item was cancelled before it finished."""


class GenerationFailed(FewstepError):
    """The engine raised while running an item that passed validation."""


class CheckpointError(FewstepError):
    """A checkpoint or artifact is refused: bad manifest, hash mismatch, unsafe path, bad shapes."""

    recoverable = False


class RegistryError(FewstepError):
    """A registry name, path or pointer is invalid."""

    recoverable = False
