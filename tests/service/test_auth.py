"""API and admin keys: who is let in, what the caller is known by, and that a key never leaves as itself."""

from __future__ import annotations

import pytest

from fewstep.errors import Forbidden, Unauthorized
from fewstep.service.auth import AdminKeys, KeyRing, bearer_token
from fewstep.service.settings import Settings

KEY, OTHER = "k" * 24, "o" * 24


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (f"Bearer {KEY}", KEY),
        (f"bearer   {KEY} ", KEY),  # the scheme is case-insensitive; spaces around the token do not count
        (f"Basic {KEY}", None),
        ("Bearer", None),
        ("Bearer  ", None),
        ("", None),
        (None, None),
    ],
)
def test_only_a_bearer_header_carries_a_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_without_keys_everyone_is_one_anonymous_caller() -> None:
    ring = KeyRing(Settings(api_keys=[]))
    assert not ring.enabled and ring.principal(None) == "anonymous" == ring.principal("Bearer whatever")


def test_a_key_is_known_by_an_opaque_id_and_others_are_refused() -> None:
    ring = KeyRing(Settings(api_keys=[KEY, OTHER]))
    a, b = ring.principal(f"Bearer {KEY}"), ring.principal(f"Bearer {OTHER}")
    assert a != b and KEY not in a and len(a) == 16  # stable per key, never the key itself
    assert ring.principal(f"Bearer {KEY}") == a
    with pytest.raises(Unauthorized, match="missing"):
        ring.principal(None)
    with pytest.raises(Unauthorized, match="invalid"):
        ring.principal(f"Bearer {KEY}x")


def test_admin_routes_are_off_until_admin_keys_are_set_and_api_keys_do_not_open_them() -> None:
    with pytest.raises(Forbidden, match="FEWSTEP_ADMIN_KEYS"):
        AdminKeys(Settings(admin_keys=[])).require(f"Bearer {KEY}")
    admins = AdminKeys(Settings(api_keys=[KEY], admin_keys=[OTHER]))
    admins.require(f"Bearer {OTHER}")
    with pytest.raises(Forbidden):
        admins.require(f"Bearer {KEY}")
    with pytest.raises(Unauthorized):
        admins.require(None)
