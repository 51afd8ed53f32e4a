"""Values the contract writes the same way everywhere, defined once (gateway.formats)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.config import RolesConfig, rate_of
from gateway.errors import ConfigError
from gateway.formats import PERMISSION_RE, iso, parse_iso
from gateway.keyring import parse_duration
from gateway.policy import compile_policy


def test_times_round_trip() -> None:
    t = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert iso(t) == "2026-01-02T03:04:05Z"
    assert iso(t.timestamp()) == "2026-01-02T03:04:05Z"
    assert iso(t.astimezone(timezone(timedelta(hours=2)))) == "2026-01-02T03:04:05Z"
    assert iso(None) is None
    assert parse_iso("2026-01-02T03:04:05Z") == t
    assert parse_iso("2026-01-02T05:04:05+02:00") == t
    assert parse_iso("2026-01-02T03:04:05") == t  # no offset: UTC
    with pytest.raises(ValueError):
        parse_iso("yesterday")


@pytest.mark.parametrize("text", ["*", "calls:read", "*:read", "projects:*", "a:b:c:d", "x.y-z_1:w"])
def test_one_permission_grammar_for_scopes_and_routes(text: str) -> None:
    """Issue 11: key scopes and route requirements had two grammars that disagreed (`*` was a scope but
    not a route's permission). Both now read the one in gateway.formats."""
    assert PERMISSION_RE.fullmatch(text)
    rule = {"rules": [{"path": "/a", "require": {"permission": text}}]}
    assert compile_policy(rule, RolesConfig()).rules[0].permission == text


@pytest.mark.parametrize("text", ["", "read", "Calls:read", "a:b:c:d:e", "calls: read", "ü:x"])
def test_what_is_not_a_permission(text: str) -> None:
    assert not PERMISSION_RE.fullmatch(text)
    with pytest.raises(ConfigError, match=r"require\.permission"):
        compile_policy({"rules": [{"path": "/a", "require": {"permission": text}}]}, RolesConfig())


def test_durations_and_rates_share_their_units() -> None:
    assert parse_duration("2w") == timedelta(days=14)
    assert parse_duration("90m") == timedelta(hours=1, minutes=30)
    assert rate_of("100/1m") == (100, 60_000)
    assert rate_of("5/2h") == (5, 7_200_000)
    assert rate_of("10/d") == (10, 86_400_000)
