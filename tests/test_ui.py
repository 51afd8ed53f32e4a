"""The web page: its session layer over HTTP, and the whole flow in real headless Chromium."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page, async_playwright

from gateway.app import create_app
from gateway.audit import CLI
from gateway.config import Config
from gateway.invitations import Invitations
from tests._proxies import echo_app, seen
from tests.conftest import ROOT, Client, Services, World, make_config, nginx_headers
from tests.test_deploy_nginx import run_nginx

CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "artifacts" / "screenshots"


# --- the session layer ---------------------------------------------------------------------------


async def sign_in(client: Client, key: str, **headers: str) -> Any:
    return await client.post("/ui/session", json={"key": key}, headers=headers)


async def test_sign_in_sets_a_strict_session_cookie(client: Client, world: World) -> None:
    k = await world.key()
    r = await sign_in(client, k["key"])
    body = await r.json()
    assert r.status == 200 and body["user_id"] == world.user and body["active_org"] in (world.org_a, world.org_b)
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    assert k["key"] not in cookie
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    page = await client.get("/ui/")
    assert page.status == 200 and "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert '<script src="/ui/app.js"' in await page.text()


async def test_secure_cookie_behind_tls(client: Client, world: World) -> None:
    k = await world.key()
    r = await sign_in(client, k["key"], **{"X-Forwarded-Proto": "https"})  # from a trusted proxy (loopback)
    assert "Secure" in r.headers["Set-Cookie"]


async def test_switching_org_and_signing_out(client: Client, world: World) -> None:
    k = await world.key()
    first = await sign_in(client, k["key"])  # another browser, signed in earlier
    first_cookie = first.cookies["gw_session"].value
    session = await (await sign_in(client, k["key"])).json()
    csrf = {"X-CSRF-Token": session["csrf"]}
    r = await client.post("/ui/session/org", json={"org": world.org_b}, headers=csrf)
    assert (await r.json())["active_org"] == world.org_b
    r = await client.post("/ui/session/org", json={"org": "org_elsewhere"}, headers=csrf)
    assert r.status == 400
    r = await client.post("/ui/session/org", json={"org": world.org_a})
    assert (r.status, r.headers["X-Auth-Error"]) == (403, "csrf_failed")  # no CSRF token

    async def with_first_cookie() -> int:
        # A separate browser: no cookie jar, only the first session's cookie.
        async with (
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as other,
            other.get(client.make_url("/ui/session"), headers={"Cookie": f"gw_session={first_cookie}"}) as r,
        ):
            return r.status

    assert await with_first_cookie() == 200
    assert (await client.delete("/ui/session", headers=csrf)).status == 200
    assert (await client.get("/ui/session")).status == 204  # signed out
    assert (await client.get("/v1/me")).status == 401
    assert await with_first_cookie() == 204  # ... everywhere


async def test_sign_ins_spend_the_keys_own_limit(client: Client, world: World) -> None:
    """Before, a key limited to 3/min opened 30 sessions in 0.12 s."""
    k = await world.key(rate_limit="3/1m")
    statuses = [(await sign_in(client, k["key"])).status for _ in range(10)]
    assert statuses.count(200) == 3 and set(statuses[3:]) == {429}, statuses
    r = await sign_in(client, k["key"])
    assert (r.status, (await r.json())["error"]["code"]) == (429, "rate_limited") and "Retry-After" in r.headers


async def test_sign_ins_are_limited_per_address(aiohttp_client: Any, services: Services, world: World) -> None:
    """Different keys from one address: the address's sign-in budget (here 3 at once) refuses the rest."""
    limit = {"sign_in": {"rate": "3/1m", "burst": 3}}
    c = await aiohttp_client(create_app(make_config(services, rate_limits=limit)))
    keys = [await world.key(name=f"k{i}") for i in range(6)]
    statuses = [(await sign_in(c, k["key"])).status for k in keys]
    assert statuses == [200, 200, 200, 429, 429, 429]
    # Another address (through a trusted proxy) still signs in.
    r = await sign_in(c, keys[5]["key"], **{"X-Forwarded-For": "198.51.100.7"})
    assert r.status == 200


async def test_session_calls_spend_the_keys_limit(client: Client, world: World) -> None:
    """Found by review: GET /ui/session and POST /ui/session/org were never charged to the key."""
    k = await world.key(rate_limit="3/1m")
    session = await (await sign_in(client, k["key"])).json()
    statuses = [(await client.get("/ui/session")).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    r = await client.post("/ui/session/org", json={"org": world.org_b}, headers={"X-CSRF-Token": session["csrf"]})
    assert r.status == 429


async def test_sign_ins_are_limited_per_ipv6_64(aiohttp_client: Any, services: Services, world: World) -> None:
    """Found by review: each address of one IPv6 /64 had a budget of its own."""
    limit = {"sign_in": {"rate": "3/1m", "burst": 3}}
    c = await aiohttp_client(create_app(make_config(services, rate_limits=limit)))
    k = await world.key()
    statuses = [(await sign_in(c, k["key"], **{"X-Forwarded-For": f"2001:db8:1:2::{i:x}"})).status for i in range(1, 7)]
    assert statuses == [200, 200, 200, 429, 429, 429]
    assert (await sign_in(c, k["key"], **{"X-Forwarded-For": "2001:db8:1:3::1"})).status == 200


@pytest.mark.parametrize("body", [b"", b"[]", b'{"key": 1}', b'{"key": "x", "more": 1}'])
async def test_bad_sign_in(client: Client, world: World, body: bytes) -> None:
    r = await client.post("/ui/session", data=body, headers={"Content-Type": "application/json"})
    assert r.status == 400
    r = await client.post("/ui/session", data=b"key=x", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 400  # a cross-site form cannot sign anyone in
    assert (await sign_in(client, "gw_live_nope")).status == 401


# --- in Chromium -----------------------------------------------------------------------------------


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        b = await pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield b
        await b.close()


async def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def test_the_whole_flow_in_chromium(aiohttp_server: Any, cfg: Config, world: World, browser: Browser) -> None:
    server = await aiohttp_server(create_app(cfg))
    base = f"http://127.0.0.1:{server.port}"
    await world.directory.create_project(world.org_a, "web")
    k = await world.key(name="laptop")
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

    await page.goto(f"{base}/ui/")
    await page.fill("#signin-key", k["key"])
    await shot(page, "signin")
    await page.click("#signin-form button")
    await page.wait_for_selector("#keys-table tbody tr")
    await page.select_option("#org-switch", world.org_a)
    await page.wait_for_selector("a[data-page=members]:not([hidden])")
    await shot(page, "keys")

    # Create a key and read it from the one-time dialog.
    await page.click("#new-key")
    await page.fill("#k-name", "from-the-browser")
    await page.select_option("#k-role", "member")
    await page.fill("#k-scopes", "calls:read")
    await page.select_option("#k-expiry", "30d")
    await shot(page, "create-dialog")
    await page.click("#create-submit")
    await page.wait_for_selector("#secret-dialog[open]")
    raw = (await page.text_content("#secret-value")) or ""
    assert raw.startswith("gw_live_")
    await shot(page, "new-key")
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{base}/auth/verify", headers=nginx_headers(raw, **{"X-Org-Id": world.org_a})) as r,
    ):
        assert (r.status, r.headers["X-Scopes"]) == (200, "calls:read")
    await page.click("#close-secret")

    # Reload: the raw key is nowhere on the page any more.
    await page.reload()
    await page.wait_for_selector("text=from-the-browser")
    assert raw not in await page.content()
    assert raw.split("_")[3][:20] not in await page.content()

    # Revoke it and watch /auth/verify refuse it.
    row = page.locator("#keys-table tbody tr", has_text="from-the-browser")
    await row.get_by_role("button", name="Revoke").click()
    await page.click("#confirm-yes")
    await page.wait_for_selector("#keys-table tbody tr:has-text('from-the-browser') .status.revoked")
    async with aiohttp.ClientSession() as s:
        for _ in range(50):
            async with s.get(f"{base}/auth/verify", headers=nginx_headers(raw, **{"X-Org-Id": world.org_a})) as r:
                if r.status == 401:
                    break
            await asyncio.sleep(0.05)
        assert r.headers["X-Auth-Error"] == "revoked_api_key"

    # Admin pages in org A.
    await page.click("a[data-page=members]")
    await page.wait_for_selector("#members-table tbody tr")
    await shot(page, "members")
    await page.click("a[data-page=audit]")
    await page.wait_for_selector("#audit-table tbody tr:has-text('api_key.revoked')")
    await shot(page, "audit")

    # Switch to org B, where the user is only a viewer: the admin pages go away at once.
    await page.select_option("#org-switch", world.org_b)
    await page.wait_for_selector("a[data-page=members]", state="hidden")
    assert await page.is_visible("#keys")
    await page.select_option("#org-switch", world.org_a)
    await page.wait_for_selector("a[data-page=members]:not([hidden])")

    # A phone-width screen.
    phone = await browser.new_context(
        viewport={"width": 390, "height": 844}, storage_state=await context.storage_state()
    )
    mobile = await phone.new_page()
    await mobile.goto(f"{base}/ui/")
    await mobile.wait_for_selector("#keys-table tbody tr")
    await shot(mobile, "keys-phone")
    width = await mobile.evaluate("document.documentElement.scrollWidth")
    assert width <= 390  # nothing spills sideways but the table's own scroller

    # Sign out ends the session for every tab that shares it.
    await page.click("#sign-out")
    await page.wait_for_selector("#signin:not([hidden])")
    await mobile.reload()
    await mobile.wait_for_selector("#signin:not([hidden])")
    assert not errors, errors
    await phone.close()
    await context.close()


async def test_accepting_an_invitation_in_chromium(
    aiohttp_server: Any, cfg: Config, world: World, browser: Browser
) -> None:
    server = await aiohttp_server(create_app(cfg))
    base = f"http://127.0.0.1:{server.port}"
    user = (await world.directory.create_user("new@example.com"))["id"]
    await world.directory.set_member(world.org_b, user, "member")
    k = await world.key(name="new", user=user, role="admin")
    invitation = await Invitations(world.directory).invite(world.org_a, "new@example.com", "viewer", CLI)
    page = await (await browser.new_context(viewport={"width": 1280, "height": 800})).new_page()
    await page.goto(f"{base}/ui/")
    await page.fill("#signin-key", k["key"])
    await page.click("#signin-form button")
    row = page.locator(f"#invitations-table tr[data-invitation-id='{invitation['id']}']")
    await row.wait_for()
    assert await page.is_visible("#invitations") and "A" in (await row.text_content() or "")
    assert await page.locator(f"#org-switch option[value='{world.org_a}']").count() == 0
    await shot(page, "invitation")
    await row.get_by_role("button", name="Accept").click()
    await page.wait_for_selector(f"#org-switch option[value='{world.org_a}']", state="attached")
    await page.wait_for_selector("#invitations", state="hidden")
    assert await world.directory.member_role(world.org_a, user) == "viewer"


async def test_the_page_is_told_which_orgs_the_key_administers(client: Client, world: World) -> None:
    """Issue 11: the page guessed admin rights from role names (`["admin", "owner"]`); the session now
    says, per org, what the API decides (`roles.admin` or above)."""
    k = await world.key()  # admin of org A, viewer of org B (the owner's roles there)
    body = await (await sign_in(client, k["key"])).json()
    assert {o["id"]: (o["role"], o["admin"]) for o in body["orgs"]} == {
        world.org_a: ("admin", True),
        world.org_b: ("viewer", False),
    }


async def test_a_session_through_nginx_in_chromium(
    aiohttp_server: Any, cfg: Config, world: World, browser: Browser, tmp_path: Path
) -> None:
    """Issue 12: sign in on the page, then call a protected upstream page through nginx with the session
    cookie alone; switch org on the page and see X-Org change at the upstream without signing in again;
    sign out and be refused."""
    up = await aiohttp_server(echo_app())
    gw = await aiohttp_server(create_app(dataclasses.replace(cfg, policy_file=str(ROOT / "config/policy.yaml"))))
    nginx = await asyncio.to_thread(run_nginx, tmp_path / "nginx", gw.port, up.port)
    try:
        k = await world.key(name="laptop")
        context = await browser.new_context()
        page = await context.new_page()
        await page.goto(f"http://127.0.0.1:{gw.port}/ui/")
        await page.fill("#signin-key", k["key"])
        await page.click("#signin-form button")
        await page.wait_for_selector("#keys-table tbody tr")
        upstream = await context.new_page()  # the browser's cookie jar: host-scoped, so nginx's too

        async def protected() -> tuple[int, dict[str, Any]]:
            response = await upstream.goto(f"{nginx.url}/v1/things")
            assert response is not None
            return response.status, await response.json()

        for org, role in ((world.org_a, "admin"), (world.org_b, "viewer")):
            if await page.locator("#org-switch").input_value() != org:
                async with page.expect_response("**/ui/session/org"):
                    await page.select_option("#org-switch", org)
            status, body = await protected()
            assert status == 200
            assert (seen(body, "X-Org"), seen(body, "X-Role")) == ([org], [role])
            assert seen(body, "X-Auth-Method") == ["session"]
        await page.click("#sign-out")
        await page.wait_for_selector("#signin-form")
        status, body = await protected()
        assert (status, body["error"]["code"]) == (401, "missing_credentials")
        await context.close()
    finally:
        await asyncio.to_thread(nginx.stop)


async def test_the_sessions_page_ends_one_or_all(
    aiohttp_server: Any, cfg: Config, world: World, browser: Browser
) -> None:
    """Issue 12: the page lists the user's sessions (this browser marked), ends another one, and signs
    out everywhere."""
    server = await aiohttp_server(create_app(cfg))
    base = f"http://127.0.0.1:{server.port}"
    k = await world.key(name="laptop")
    async with aiohttp.ClientSession() as other:  # another browser, signed in first
        async with other.post(f"{base}/ui/session", json={"key": k["key"]}) as r:
            assert r.status == 200
        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        page = await context.new_page()
        await page.goto(f"{base}/ui/")
        await page.fill("#signin-key", k["key"])
        await page.click("#signin-form button")
        await page.wait_for_selector("#keys-table tbody tr")
        await page.click("a[data-page=sessions]")
        await page.wait_for_selector("#sessions-table tbody tr:nth-child(2)")
        await shot(page, "sessions")
        assert await page.locator("#sessions-table .badge").count() == 1  # this browser
        await page.click("#sessions-table tbody button")  # end the other one
        await page.locator("#sessions-table tbody tr").nth(1).wait_for(state="detached")
        async with other.get(f"{base}/ui/session") as r:
            assert r.status == 204  # signed out there
        await page.click("#end-all-sessions")
        await page.click("#confirm-yes")
        await page.wait_for_selector("#signin-form")
        await context.close()
