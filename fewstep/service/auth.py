"""API-key authentication: `Authorization: Bearer <key>` on every `/v1/*` route."""

from __future__ import annotations

import hashlib
import hmac

from fewstep.errors import Forbidden, Unauthorized
from fewstep.service.settings import Settings


def bearer_token(authorization: str | None) -> str | None:
    """The credentials of an `Authorization: Bearer <token>` header; the scheme is case-insensitive
    (RFC 7235 §2.1). None when the header is absent or names another scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class KeyRing:
    """Checks presented keys in constant time; knows keys only by their SHA-256."""

    def __init__(self, settings: Settings) -> None:
        self._digests = [hashlib.sha256(k.get_secret_value().encode()).digest() for k in settings.api_keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def principal(self, authorization: str | None) -> str:
        """An opaque id of the caller's key (never the key itself); 'anonymous' when auth is off."""
        if not self.enabled:
            return "anonymous"
        token = bearer_token(authorization)
        if token is None:
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
        digest = hashlib.sha256(token.encode()).digest()
        if not any(hmac.compare_digest(digest, d) for d in self._digests):
            raise Unauthorized("invalid API key")
        return digest.hex()[:16]


class AdminKeys:
    """Keys of the admin routes (`FEWSTEP_ADMIN_KEYS`), known by SHA-256. None set: every admin call is refused."""

    def __init__(self, settings: Settings) -> None:
        self._digests = [hashlib.sha256(k.get_secret_value().encode()).digest() for k in settings.admin_keys]

    def require(self, authorization: str | None) -> None:
        if not self._digests:
            raise Forbidden("admin routes are disabled: set FEWSTEP_ADMIN_KEYS")
        token = bearer_token(authorization)
        if token is None:
            raise Unauthorized("missing admin key: send `Authorization: Bearer <admin key>`")
        digest = hashlib.sha256(token.encode()).digest()
        if not any(hmac.compare_digest(digest, d) for d in self._digests):
            raise Forbidden("this key may not use the admin routes")
