from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.authz import effective_permissions, granted, pattern_matches
from gateway.typedefs import METRICS
from tests.conftest import World, nginx_headers

Client = Any


@pytest.mark.parametrize(
    ("pattern", "perm", "ok"),
    [
        ("*", "calls:read", True),
        ("*:read", "calls:read", True),
        ("*:read", "calls:write", False),
        ("calls:*", "calls:delete", True),
        ("calls:read", "calls:read", True),
        ("calls:read", "calls:read:extra", False),
        ("calls", "calls:read", False),
    ],
)
def test_pattern_matching(pattern: str, perm: str, ok: bool) -> None:
    assert pattern_matches(pattern, perm) is ok


def test_effective_permissions_intersect_role_and_scopes() -> None:
    assert effective_permissions(("*",), None) == ("*",)
    assert effective_permissions(("*:read",), ("calls:*",)) == ("calls:read",)
    assert effective_permissions(("*:read", "*:write"), ("calls:read", "projects:*")) == (
        "calls:read",
        "projects:read",
        "projects:write",
    )
    assert effective_permissions(("*:read",), ("billing:write",)) == ()
    assert effective_permissions(("*",), ("calls:read", "*:read")) == ("*:read",)
    assert granted(("calls:read",), "calls:read") and not granted((), "calls:read")


async def test_concurrent_verifications_of_one_key_share_one_argon2(client: Client, world: World) -> None:
    k = await world.key(orgs=[world.org_a])
    rs = await asyncio.gather(*(client.get("/auth/nginx", headers=nginx_headers(k["key"])) for _ in range(20)))
    assert [r.status for r in rs] == [200] * 20
    metrics = client.app[METRICS]
    assert metrics.argon2._value.get() == 1


async def test_wrong_secrets_are_negatively_cached(client: Client, world: World) -> None:
    from gateway.keys import KeyFormat

    k = await world.key(orgs=[world.org_a])
    fmt = KeyFormat("gw")
    wrong = fmt.build("live", k["id"], fmt.generate("live")[0].split("_")[3][:43])
    for _ in range(5):
        r = await client.get("/auth/nginx", headers=nginx_headers(wrong))
        assert r.headers["X-Auth-Error"] == "invalid_api_key"
    assert client.app[METRICS].argon2._value.get() == 1
