"""JWT access tokens through forward auth, and their refresh tokens (gateway/tokens.py, gateway/grants.py,
gateway/signing.py): what a token may do, every way a bad one is refused, rotation with reuse detection,
signing-key rotation, and no token bytes anywhere they could leak."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from joserfc import jwt
from joserfc.jwk import OKPKey

from gateway.audit import CLI
from gateway.signing import eddsa_allowed
from gateway.typedefs import SIGNING
from tests.conftest import Client, Services, World, nginx_headers, start_gateway, until
from tests.test_api import auth


async def _issue(client: Client, key: dict[str, Any], **body: Any) -> dict[str, Any]:
    r = await client.post("/v1/tokens", json=body, headers=auth(key))
    assert r.status == 200, await r.text()
    assert r.headers["Cache-Control"] == "no-store"
    pair: dict[str, Any] = await r.json()
    return pair


async def _forward(client: Client, token: str, org: str | None = None, method: str = "GET") -> Any:
    extra = {"X-Org-Id": org} if org else {}
    return await client.get("/auth/nginx", headers=nginx_headers(token, method=method, **extra))


def _b64(data: dict[str, Any] | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def kid(token: str) -> str:
    return str(json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))["kid"])


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


async def test_a_token_identifies_its_user_in_its_org(client: Client, world: World) -> None:
    key = await world.key(role="admin")
    pair = await _issue(client, key, org=world.org_a)
    assert pair["token_type"] == "Bearer" and pair["expires_in"] == 900
    header = json.loads(base64.urlsafe_b64decode(pair["access_token"].split(".")[0] + "=="))
    assert header["alg"] == "EdDSA" and header["kid"].startswith("sk_")
    claims = _claims(pair["access_token"])
    assert {"iss", "aud", "sub", "org", "role", "scope", "sid", "jti", "iat", "nbf", "exp"} <= set(claims)
    r = await _forward(client, pair["access_token"])
    assert r.status == 200, await r.text()
    assert r.headers["X-Auth-Method"] == "jwt"
    assert (r.headers["X-Org"], r.headers["X-Role"], r.headers["X-User"]) == (world.org_a, "admin", world.user)
    # Issued with a key: the key it keeps the limits of (id, env, allowlist, rate limit) is named.
    assert (r.headers["X-Key-Id"], r.headers["X-Key-Env"]) == (key["id"], "live")


async def test_requested_role_and_scopes_never_exceed_the_callers(client: Client, world: World) -> None:
    key = await world.key(role="member", scopes=["calls:read"])
    r = await client.post("/v1/tokens", json={"org": world.org_a, "role": "admin"}, headers=auth(key))
    assert (r.status, r.headers["X-Auth-Error"]) == (403, "insufficient_permissions")
    r = await client.post("/v1/tokens", json={"org": world.org_a, "scopes": ["calls:write"]}, headers=auth(key))
    assert r.status == 403
    pair = await _issue(client, key, org=world.org_a)
    r = await _forward(client, pair["access_token"])
    assert (r.headers["X-Role"], r.headers["X-Scopes"]) == ("member", "calls:read")
    # A key for org B only cannot issue for org A.
    b_only = await world.key(name="b", role="viewer", orgs=[world.org_b])
    r = await client.post("/v1/tokens", json={"org": world.org_a}, headers=auth(b_only))
    assert (r.status, r.headers["X-Auth-Error"]) == (403, "org_not_allowed")
    # A space (or a tab) would smuggle a second pattern into the space-separated claim; not a pattern: 400.
    scoped = await world.key(name="calls", role="admin", scopes=["calls:*"])
    for bad in (["calls:read *"], ["calls:read\t*"], [1], [["calls:read"]], []):
        r = await client.post("/v1/tokens", json={"org": world.org_a, "scopes": bad}, headers=auth(scoped))
        assert (r.status, r.headers["X-Auth-Error"]) == (400, "invalid_request"), bad
    # The claim says what the token grants: a viewer token of an admin key says *:read, not *.
    admin_key = await world.key(name="admin", role="admin")
    viewer = await _issue(client, admin_key, org=world.org_a, role="viewer")
    assert _claims(viewer["access_token"])["scope"] == "*:read"
    # A token cannot mint tokens.
    r = await client.post("/v1/tokens", json={}, headers={"Authorization": f"Bearer {pair['access_token']}"})
    assert r.status == 403


async def test_a_token_of_org_a_on_org_bs_route_is_refused(client: Client, world: World) -> None:
    pair = await _issue(client, await world.key(role="admin"), org=world.org_a)
    r = await _forward(client, pair["access_token"], org=world.org_b)
    assert (r.status, r.headers["X-Auth-Error"]) == (403, "org_not_allowed")


async def test_the_role_is_capped_by_the_membership_as_it_is_now(client: Client, world: World) -> None:
    pair = await _issue(client, await world.key(role="admin"), org=world.org_a)
    assert (await _forward(client, pair["access_token"])).headers["X-Role"] == "admin"
    await world.directory.set_member(world.org_a, world.user, "viewer")  # mid-lifetime

    async def role() -> str:
        return str((await _forward(client, pair["access_token"])).headers.get("X-Role"))

    deadline = time.monotonic() + 1.0
    while await role() != "viewer":
        assert time.monotonic() < deadline, "the downgrade did not apply within a second"
        await asyncio.sleep(0.02)
    await world.directory.remove_member(world.org_a, world.user)
    deadline = time.monotonic() + 1.0
    while (await _forward(client, pair["access_token"])).status != 403:
        assert time.monotonic() < deadline, "the removal did not apply within a second"
        await asyncio.sleep(0.02)


async def _sign(client: Client, **changes: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": "gateway", "aud": "gateway", "sub": "usr_x", "org": "org_x", "role": "admin", "scope": "*",
        "sid": "fam_x", "jti": "j", "iat": now, "nbf": now, "exp": now + 600, **changes,
    }  # fmt: skip
    return client.app[SIGNING].sign(claims)


async def test_bad_tokens_are_invalid_and_expired_ones_say_so(client: Client, world: World) -> None:
    pair = await _issue(client, await world.key(role="admin"), org=world.org_a)
    good = pair["access_token"]
    claims = _claims(good)
    head, _, sig = good.split(".")

    async def code(token: str) -> tuple[int, str]:
        r = await _forward(client, token)
        return r.status, r.headers.get("X-Auth-Error", "")

    # Expired (past the leeway), signed by the real key.
    expired = await _sign(client, **{**claims, "exp": int(time.time()) - 60, "nbf": int(time.time()) - 120})
    assert await code(expired) == (401, "expired_token")
    # A payload changed under the same signature.
    tampered = ".".join([head, _b64({**claims, "role": "owner"}), sig])
    assert await code(tampered) == (401, "invalid_token")
    # alg none, and HS256 keyed with the published public key.
    header = json.loads(base64.urlsafe_b64decode(head + "=="))
    none = ".".join([_b64({**header, "alg": "none"}), _b64(claims), ""])
    assert await code(none) == (401, "invalid_token")
    jwks = await (await client.get("/.well-known/jwks.json")).json()
    public = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    signing_input = f"{_b64({**header, 'alg': 'HS256'})}.{_b64(claims)}"
    for secret in (json.dumps(public).encode(), base64.urlsafe_b64decode(public["x"] + "=")):
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        assert await code(f"{signing_input}.{_b64(mac)}") == (401, "invalid_token")
    # A key nobody published, and a token of the right shape that is no JWT at all.
    stranger = OKPKey.generate_key("Ed25519", parameters={"kid": "sk_stranger"})
    with eddsa_allowed():
        unknown = jwt.encode({"alg": "EdDSA", "kid": "sk_stranger"}, claims, stranger, algorithms=["EdDSA"])
    assert await code(unknown) == (401, "invalid_token")
    assert await code("eyJhbGciOi.e30.x") == (401, "invalid_token")
    assert await code("eyJ" + "a" * 5000 + ".e30.x") == (401, "invalid_token")
    # Wrong audience or issuer.
    assert await code(await _sign(client, **{**claims, "aud": "elsewhere"})) == (401, "invalid_token")
    assert await code(await _sign(client, **{**claims, "iss": "elsewhere"})) == (401, "invalid_token")
    assert (await _forward(client, good)).status == 200


async def _refresh(client: Client, token: str) -> Any:
    return await client.post("/v1/tokens/refresh", json={"refresh_token": token})


async def test_refresh_rotates_and_reuse_revokes_the_family(client: Client, world: World) -> None:
    pair = await _issue(client, await world.key(role="admin"), org=world.org_a)
    r = await _refresh(client, pair["refresh_token"])
    assert r.status == 200
    second = await r.json()
    assert second["refresh_token"] != pair["refresh_token"]
    assert _claims(second["access_token"])["sid"] == _claims(pair["access_token"])["sid"]
    third = await (await _refresh(client, second["refresh_token"])).json()
    assert (await _forward(client, third["access_token"])).status == 200
    # The first one again: two rotations old, no grace covers it. The whole family is revoked.
    r = await _refresh(client, pair["refresh_token"])
    assert (r.status, r.headers["X-Auth-Error"]) == (401, "invalid_token")
    assert (await _refresh(client, third["refresh_token"])).status == 401
    r = await _forward(client, third["access_token"])
    assert (r.status, r.headers["X-Auth-Error"]) == (401, "invalid_token")
    rows = await world.pool.fetch("SELECT type FROM audit_events WHERE type LIKE 'token.%' ORDER BY id")
    assert [r["type"] for r in rows] == ["token.issued", "token.refreshed", "token.refreshed", "token.reuse_detected"]


async def test_the_grace_covers_the_previous_token_once_and_only_it(client: Client, world: World) -> None:
    pair = await _issue(client, await world.key(role="admin"), org=world.org_a)
    second = await (await _refresh(client, pair["refresh_token"])).json()
    # A retry of the first refresh (its answer lost): within the grace it gets a new pair.
    retried = await _refresh(client, pair["refresh_token"])
    assert retried.status == 200
    latest = await retried.json()
    assert latest["refresh_token"] != second["refresh_token"]
    # Once more: the first token is now two rotations back, and only the immediately previous one has a
    # grace. A reuse: the family is revoked, the newest refresh token with it.
    r = await _refresh(client, pair["refresh_token"])
    assert (r.status, r.headers["X-Auth-Error"]) == (401, "invalid_token")
    assert (await _refresh(client, latest["refresh_token"])).status == 401


async def test_the_grace_ends(world: World, services: Services, aiohttp_client: Any) -> None:
    from gateway.app import create_app
    from tests.conftest import make_config

    c = await aiohttp_client(create_app(make_config(services, tokens={"reuse_grace_s": 0})))
    pair = await _issue(c, await world.key(role="admin"), org=world.org_a)
    assert (await _refresh(c, pair["refresh_token"])).status == 200
    assert (await _refresh(c, pair["refresh_token"])).status == 401


async def test_revoking_a_family_stops_its_access_tokens(client: Client, world: World) -> None:
    pair = await _issue(client, await world.key(role="admin"), org=world.org_a)
    assert (await _forward(client, pair["access_token"])).status == 200
    r = await client.post(
        "/v1/tokens/revoke",
        data={"token": pair["refresh_token"], "token_type_hint": "refresh_token"},
    )
    assert r.status == 200
    assert (await _forward(client, pair["access_token"])).status == 401
    assert (await _refresh(client, pair["refresh_token"])).status == 401
    # RFC 7009: an unknown token is answered 200 too; no token at all is a bad request.
    assert (await client.post("/v1/tokens/revoke", data={"token": "nothing"})).status == 200
    assert (await client.post("/v1/tokens/revoke", data={})).status == 400
    # An access token revokes its family as well.
    other = await _issue(client, world.keys["k"], org=world.org_a)
    await client.post("/v1/tokens/revoke", json={"token": other["access_token"]})
    assert (await _forward(client, other["access_token"])).status == 401


async def test_signing_key_rotation_keeps_tokens_of_both_keys_valid(client: Client, world: World) -> None:
    key = await world.key(role="admin")
    before = await _issue(client, key, org=world.org_a)
    signing = client.app[SIGNING]
    published = set(signing.published)
    rotated = await signing.rotate()
    # The key that signs now was published before the rotation (it was `next`).
    assert rotated["current"] in published
    await until(lambda: rotated["next"] in signing.published)
    after = await _issue(client, key, org=world.org_a)
    assert kid(before["access_token"]) != kid(after["access_token"]) == rotated["current"]
    for pair in (before, after):
        assert (await _forward(client, pair["access_token"])).status == 200
    jwks = await (await client.get("/.well-known/jwks.json")).json()
    # Previous (the one `before` was signed with), current and next; previous keys of earlier rotations
    # stay published until their tokens could have expired.
    assert {k["kid"] for k in jwks["keys"]} >= {kid(before["access_token"]), rotated["current"], rotated["next"]}
    assert all("d" not in k for k in jwks["keys"])  # public parts only


async def test_private_keys_are_stored_encrypted(client: Client, world: World) -> None:
    rows = await world.pool.fetch("SELECT kid, private_enc FROM signing_keys")
    assert rows
    for row in rows:
        assert b"PRIVATE KEY" not in row["private_enc"]


async def test_no_token_bytes_in_logs_audit_or_redis(
    client: Client, world: World, rclient: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pair = await _issue(client, await world.key(role="admin"), org=world.org_a)
    await _forward(client, pair["access_token"])
    second = await (await _refresh(client, pair["refresh_token"])).json()
    await _refresh(client, pair["refresh_token"])  # a reuse, audited
    await _forward(client, second["access_token"])
    secrets = [pair["access_token"], pair["refresh_token"], second["access_token"], second["refresh_token"]]
    fragments = [s.split(".")[-1][:20] if "." in s else s[-20:] for s in secrets]
    audit = json.dumps([dict(r) for r in await world.pool.fetch("SELECT * FROM audit_events")], default=str)
    families = json.dumps([dict(r) for r in await world.pool.fetch("SELECT * FROM refresh_tokens")], default=str)
    keys = [k.decode() if isinstance(k, bytes) else k for k in await rclient.keys("*")]
    values = [str(await rclient.dump(k)) for k in keys]
    for text in (audit, families, caplog.text, " ".join(keys), " ".join(values)):
        for fragment in fragments:
            assert fragment not in text


async def test_revocation_and_org_switch_reach_another_process_within_a_second(
    services: Services, world: World, tmp_path: Path
) -> None:
    """Two `gateway serve` processes: a token family revoked through one (by a refresh token's reuse) is
    refused by the other within a second; a session's org switched through one is seen by the other's next
    request. The delay measured is printed (the closing note's figure)."""
    one = await start_gateway(services, tmp_path, "one", "--workers", "1")
    two = await start_gateway(services, tmp_path, "two", "--workers", "1")
    key = await world.key(role="admin")
    try:
        async with aiohttp.ClientSession() as http:

            async def forward(gw: Any, headers: dict[str, str]) -> Any:
                async with http.get(f"{gw.url}/auth/nginx", headers=nginx_headers(**headers)) as r:
                    return r.status, dict(r.headers)

            async with http.post(f"{one.url}/v1/tokens", json={"org": world.org_a}, headers=auth(key)) as r:
                pair = await r.json()
            bearer = {"Authorization": f"Bearer {pair['access_token']}"}
            assert (await forward(two, bearer))[0] == 200  # verified (and cached) by the other process
            refresh = pair["refresh_token"]
            for _ in range(2):  # two rotations: the first token is past the grace of the previous one
                async with http.post(f"{one.url}/v1/tokens/refresh", json={"refresh_token": refresh}) as r:
                    refresh = (await r.json())["refresh_token"]
            started = time.monotonic()
            async with http.post(f"{one.url}/v1/tokens/refresh", json={"refresh_token": pair["refresh_token"]}) as r:
                assert r.status == 401  # reused: the family is revoked
            while (await forward(two, bearer))[0] != 401:
                assert time.monotonic() - started < 1.0, "the other process still accepts the token"
                await asyncio.sleep(0.005)
            print(f"family revocation seen by the other process after {(time.monotonic() - started) * 1000:.0f} ms")

            laptop = await world.key(name="laptop", role="admin")  # the web page's session: all the user's orgs
            async with http.post(f"{one.url}/ui/session", json={"key": laptop["key"]}) as r:
                issued = await r.json()
                cookie = {"Cookie": f"gw_session={r.cookies['gw_session'].value}"}
            http.cookie_jar.clear()
            switch = {**cookie, "X-CSRF-Token": issued["csrf"]}
            async with http.post(f"{one.url}/v1/session/org", json={"org": world.org_a}, headers=switch) as r:
                assert r.status == 200
            assert (await forward(two, cookie))[1]["X-Org"] == world.org_a
            async with http.post(f"{one.url}/v1/session/org", json={"org": world.org_b}, headers=switch) as r:
                assert r.status == 200
            assert (await forward(two, cookie))[1]["X-Org"] == world.org_b  # the very next request
    finally:
        one.stop()
        two.stop()


async def test_revoking_the_key_revokes_the_tokens_it_issued(client: Client, world: World) -> None:
    key = await world.key(role="admin")
    pair = await _issue(client, key, org=world.org_a)
    assert (await _forward(client, pair["access_token"])).status == 200
    await world.keyring.revoke_key(key["id"])
    deadline = time.monotonic() + 1.0  # by NOTIFY, within a second
    while (r := await _forward(client, pair["access_token"])).status == 200:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert (r.status, r.headers["X-Auth-Error"]) == (401, "invalid_token")
    assert (await _refresh(client, pair["refresh_token"])).status == 401


async def test_a_token_keeps_the_limits_of_the_key_it_was_issued_with(client: Client, world: World) -> None:
    """Found by review: a token dropped its key's env, allowlist, rate limit and expiry, and could mint a
    key without them. It keeps them, and makes no keys at all."""
    elsewhere = await world.key(name="elsewhere", role="admin", env="test", allow_ips=["10.0.0.0/8"])
    r = await client.post("/v1/tokens", json={"org": world.org_a}, headers=auth(elsewhere))
    assert (r.status, r.headers["X-Auth-Error"]) == (403, "ip_not_allowed")  # the key itself cannot act here
    local = await world.key(name="local", role="admin", env="test", allow_ips=["127.0.0.0/8"], expires_in="1h")
    pair = await _issue(client, local, org=world.org_a)
    assert pair["refresh_expires_in"] <= 3600  # the family ends with the key
    r = await _forward(client, pair["access_token"])
    assert (r.status, r.headers["X-Key-Env"], r.headers["X-Key-Id"]) == (200, "test", local["id"])
    bearer = {"Authorization": f"Bearer {pair['access_token']}"}
    r = await client.post("/v1/keys", json={"name": "forever", "role": "viewer"}, headers=bearer)
    assert (r.status, r.headers["X-Auth-Error"]) == (403, "insufficient_permissions")


async def test_stopping_the_key_in_an_org_stops_its_tokens_there(client: Client, world: World) -> None:
    """Found by review: an org's admin stopping a member's all-orgs key in that org left the tokens the key
    had issued for the org working, and refreshable."""
    member = (await world.directory.create_user("member@example.com"))["id"]
    await world.directory.set_member(world.org_a, member, "admin")
    await world.directory.set_member(world.org_b, member, "admin")
    everywhere = await world.key(name="everywhere", user=member, role="admin")
    pair = await _issue(client, everywhere, org=world.org_a)
    assert (await _forward(client, pair["access_token"])).status == 200
    owner = await world.key(name="owner", role="admin", orgs=[world.org_a])  # an admin of A
    r = await client.post(f"/v1/keys/{everywhere['id']}/revoke", headers=auth(owner))
    assert (r.status, (await r.json())["revoked_in"]) == (200, [world.org_a])
    deadline = time.monotonic() + 1.0
    while (r := await _forward(client, pair["access_token"])).status == 200:
        assert time.monotonic() < deadline, "the stopped key's token still acts in the org"
        await asyncio.sleep(0.02)
    assert r.headers["X-Auth-Error"] == "org_not_allowed"
    assert (await _refresh(client, pair["refresh_token"])).status == 401


async def test_a_family_ends_after_its_idle_and_absolute_lifetimes(client: Client, world: World) -> None:
    key = await world.key(role="admin")
    idle, absolute = await _issue(client, key, org=world.org_a), await _issue(client, key, org=world.org_a)
    for pair, change in (
        (idle, "last_used_at = now() - interval '8 days'"),  # tokens.refresh_idle_s: 7 days
        (absolute, "expires_at = now() - interval '1 second'"),
    ):
        sid = _claims(pair["access_token"])["sid"]
        await world.pool.execute(f"UPDATE token_families SET {change} WHERE id = $1", sid)  # noqa: S608 - constant
        r = await _refresh(client, pair["refresh_token"])
        assert (r.status, r.headers["X-Auth-Error"]) == (401, "invalid_token")


async def test_es256_signing_keys(services: Services, world: World, aiohttp_client: Any) -> None:
    """`tokens.algorithm: ES256`: new signing keys are P-256; their tokens verify, and say so in `alg`."""
    from gateway.app import create_app
    from tests.conftest import make_config

    c = await aiohttp_client(create_app(make_config(services, tokens={"algorithm": "ES256"})))
    await c.app[SIGNING].rotate()  # the next key made now is ES256; one more rotation makes it sign
    rotated = await c.app[SIGNING].rotate()
    await until(lambda: c.app[SIGNING].published.get(rotated["current"]) is not None)
    await c.app[SIGNING].load()
    pair = await _issue(c, await world.key(role="admin"), org=world.org_a)
    header = json.loads(base64.urlsafe_b64decode(pair["access_token"].split(".")[0] + "=="))
    assert (header["alg"], header["kid"]) == ("ES256", rotated["current"])
    assert (await _forward(c, pair["access_token"])).status == 200
    jwks = await (await c.get("/.well-known/jwks.json")).json()
    assert next(k for k in jwks["keys"] if k["kid"] == rotated["current"])["crv"] == "P-256"


async def test_a_service_account_issues_tokens_for_members_of_its_org(client: Client, world: World) -> None:
    sa = await world.directory.create_service_account(world.org_a, "backend", "admin", CLI)
    issuer = await world.key(name="backend", user=sa["id"], role="admin", orgs=[world.org_a])
    await world.directory.set_member(world.org_a, world.user, "member")
    pair = await _issue(client, issuer, user=world.user)
    claims = _claims(pair["access_token"])
    assert (claims["sub"], claims["org"], claims["role"]) == (world.user, world.org_a, "member")  # the member's
    # Found by review: the token named the service account's key, whose owner is not the token's user,
    # so every such token was refused. It is the member's, tied to no key.
    assert "key" not in claims
    r = await _forward(client, pair["access_token"])
    assert (r.status, r.headers["X-User"], r.headers["X-Role"], r.headers["X-Key-Id"]) == (
        200,
        world.user,
        "member",
        "",
    )
    refreshed = await (await _refresh(client, pair["refresh_token"])).json()
    assert (await _forward(client, refreshed["access_token"])).status == 200
    # An access token issues no sessions: a session would outlive it.
    bearer = {"Authorization": f"Bearer {(await _issue(client, issuer, org=world.org_a))['access_token']}"}
    r = await client.post("/v1/sessions", json={"user": world.user, "org": world.org_a}, headers=bearer)
    assert r.status == 403
    stranger = (await world.directory.create_user("stranger@example.com"))["id"]
    r = await client.post("/v1/tokens", json={"user": stranger}, headers=auth(issuer))
    assert r.status == 404
    person = await world.key(name="person", role="admin")
    r = await client.post("/v1/tokens", json={"user": stranger, "org": world.org_a}, headers=auth(person))
    assert r.status == 403  # only a service account issues for someone else


async def test_revoking_with_an_expired_access_token_and_bad_forms(client: Client, world: World) -> None:
    pair = await _issue(client, await world.key(role="admin"), org=world.org_a)
    claims = _claims(pair["access_token"])
    expired = await _sign(client, **{**claims, "exp": int(time.time()) - 60, "nbf": int(time.time()) - 120})
    assert (await client.post("/v1/tokens/revoke", data={"token": expired})).status == 200
    assert (await _refresh(client, pair["refresh_token"])).status == 401  # its family is revoked
    r = await client.post(
        "/v1/tokens/revoke", data="token=a&token=b", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert r.status == 400
    r = await client.post(
        "/v1/tokens/refresh", data=b"refresh_token=\xff", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert r.status == 400
    bad_projects = await _sign(client, **{**claims, "prj": "prj_x"})
    assert (await _forward(client, bad_projects)).headers["X-Auth-Error"] == "invalid_token"


async def test_a_token_whose_role_the_gateway_no_longer_knows_is_refused(client: Client, world: World) -> None:
    """Found by review: a role missing from roles.order (removed from the config since) raised, a 500."""
    pair = await _issue(client, await world.key(role="admin"), org=world.org_a)
    claims = _claims(pair["access_token"])
    unknown = await _sign(client, **{**claims, "role": "superuser", "jti": "other"})
    r = await _forward(client, unknown)
    assert (r.status, r.headers["X-Auth-Error"]) == (401, "invalid_token")
