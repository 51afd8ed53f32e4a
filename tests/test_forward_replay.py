"""Traefik, Envoy and ingress-nginx cannot run here: these replay exactly the requests they send to the
gateway (from their documentation and source), under the shipped route policy."""

from __future__ import annotations

from typing import Any

import pytest
from yarl import URL

from gateway.app import create_app
from tests.conftest import ROOT, Client, Services, World, make_config


@pytest.fixture
async def gw(aiohttp_client: Any, services: Services, clean: None) -> Client:
    cfg = make_config(services, policy_file=str(ROOT / "config/policy.yaml"))
    c: Client = await aiohttp_client(create_app(cfg))
    return c


def traefik(key: str | None, uri: str, method: str = "GET", **extra: str) -> dict[str, str]:
    """Traefik forwardAuth: a GET to `address` carrying the client's headers plus X-Forwarded-*."""
    h = {
        "User-Agent": "curl/8.5.0",
        "Accept": "*/*",
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Host": "api.example.com",
        "X-Forwarded-Method": method,
        "X-Forwarded-Port": "443",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Server": "traefik-7d9f",
        "X-Forwarded-Uri": uri,
        "X-Real-Ip": "203.0.113.9",
    }
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    return {**h, **extra}


def ingress(key: str | None, uri: str, method: str = "GET", **extra: str) -> dict[str, str]:
    """ingress-nginx `auth-url`: an nginx subrequest (GET) with X-Original-URL/-Method and the client's headers."""
    h = {
        "Host": "gateway.gateway.svc.cluster.local",
        "X-Original-URL": f"https://api.example.com{uri}",
        "X-Original-Method": method,
        "X-Sent-From": "nginx-ingress-controller",
        "X-Real-IP": "203.0.113.9",
        "X-Forwarded-For": "203.0.113.9",
        "X-Auth-Request-Redirect": uri,
        "X-Forwarded-Host": "api.example.com",
        "X-Forwarded-Port": "443",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Scheme": "https",
        "X-Scheme": "https",
        "User-Agent": "curl/8.5.0",
    }
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    return {**h, **extra}


def envoy(key: str | None, **extra: str) -> dict[str, str]:
    """Envoy ext_authz (HTTP service): the original method, path_prefix + original path, the original
    Host, and only the headers allowed_headers lets through."""
    h = {
        "Host": "api.example.com",
        "x-forwarded-for": "203.0.113.9",
        "x-request-id": "5c1e0f4e",
        "x-envoy-expected-rq-timeout-ms": "250",
        "Content-Length": "0",
    }
    if key is not None:
        h["authorization"] = f"Bearer {key}"
    return {**h, **extra}


async def _project(world: World) -> tuple[dict[str, Any], str]:
    prj = (await world.directory.create_project(world.org_a, "web"))["id"]
    k = await world.key(orgs=[world.org_a], allow_ips=["203.0.113.0/24"])
    return k, f"/v1/orgs/{world.org_a}/projects/{prj}/calls?page=2"


# --- Traefik -------------------------------------------------------------------------------------


async def test_traefik_allows_and_sets_identity(gw: Client, world: World) -> None:
    k, uri = await _project(world)
    r = await gw.get("/auth/traefik", headers=traefik(k["key"], uri, "POST"))
    assert r.status == 200
    assert (r.headers["X-Org"], r.headers["X-Role"], r.headers["X-Key-Id"]) == (world.org_a, "admin", k["id"])
    assert r.headers["X-Project"] == uri.split("/")[5]


async def test_traefik_passes_denials_to_the_client_as_is(gw: Client, world: World) -> None:
    """On non-2xx Traefik returns our answer unchanged: it must be complete on its own."""
    r = await gw.get("/auth/traefik", headers=traefik(None, "/v1/things"))
    assert r.status == 401
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await r.json())["error"]["code"] == r.headers["X-Auth-Error"] == "missing_credentials"
    r = await gw.get("/auth/traefik", headers=traefik(None, "/admin"))
    assert (r.status, (await r.json())["error"]["code"]) == (403, "route_not_allowed")
    r = await gw.get("/auth/traefik", headers=traefik(None, "/docs/intro"))
    assert (r.status, r.headers["X-Auth-Method"]) == (200, "anonymous")


async def test_traefik_ignores_other_proxies_headers(gw: Client, world: World) -> None:
    forged = {"X-Original-URI": "/docs/x", "X-Original-Method": "GET", "X-Original-URL": "https://a.example.com/docs"}
    r = await gw.get("/auth/traefik", headers=traefik(None, "/v1/things", **forged))
    assert r.headers["X-Auth-Error"] == "missing_credentials"


async def test_traefik_client_address_from_forwarded_for(gw: Client, world: World) -> None:
    k, uri = await _project(world)
    r = await gw.get("/auth/traefik", headers=traefik(k["key"], uri, **{"X-Forwarded-For": "198.51.100.1"}))
    assert r.headers["X-Auth-Error"] == "ip_not_allowed"


# --- ingress-nginx -------------------------------------------------------------------------------


async def test_ingress_nginx_allows(gw: Client, world: World) -> None:
    k, uri = await _project(world)
    r = await gw.get("/auth/ingress-nginx", headers=ingress(k["key"], uri, "PUT"))
    assert r.status == 200
    assert r.headers["X-Scopes"] == "*"


async def test_ingress_nginx_denials(gw: Client, world: World) -> None:
    k, uri = await _project(world)
    r = await gw.get("/auth/ingress-nginx", headers=ingress(None, uri))
    assert (r.status, r.headers["X-Auth-Error"]) == (401, "missing_credentials")
    viewer = await world.key(name="v", role="viewer", orgs=[world.org_a])
    r = await gw.get("/auth/ingress-nginx", headers=ingress(viewer["key"], uri, "DELETE"))
    assert (r.status, r.headers["X-Auth-Error"]) == (403, "insufficient_permissions")
    r = await gw.get(
        "/auth/ingress-nginx", headers=ingress(k["key"], "/docs/../v1/things", **{"X-Original-URL": "nope"})
    )
    assert (r.status, r.headers["X-Auth-Error"]) == (401, "invalid_request")


@pytest.mark.parametrize(
    "authority",
    ["api.example.com:1?", "api.example.com?x=", "api.example.com#", "user@api.example.com", "api.example.com:1;"],
)
async def test_ingress_nginx_authority_must_be_a_host(gw: Client, world: World, authority: str) -> None:
    """ingress-nginx builds X-Original-URL from the client's own Host: a Host ending in `?` once turned a
    protected path into the query of a public `/` and was allowed anonymously."""
    url = f"http://{authority}/v1/orgs/{world.org_b}/things"
    r = await gw.get("/auth/ingress-nginx", headers=ingress(None, "/", **{"X-Original-URL": url}))
    assert (r.status, r.headers["X-Auth-Error"]) == (401, "invalid_request")


async def test_ingress_nginx_ignores_traefik_headers(gw: Client, world: World) -> None:
    r = await gw.get("/auth/ingress-nginx", headers=ingress(None, "/v1/things", **{"X-Forwarded-Uri": "/docs/a"}))
    assert r.headers["X-Auth-Error"] == "missing_credentials"


# --- Envoy ---------------------------------------------------------------------------------------


async def test_envoy_allows_with_original_method_and_path(gw: Client, world: World) -> None:
    k, uri = await _project(world)
    r = await gw.request("POST", "/auth/envoy" + uri, headers=envoy(k["key"]))
    assert r.status == 200
    assert (r.headers["X-Org"], r.headers["X-Key-Id"]) == (world.org_a, k["id"])
    viewer = await world.key(name="v", role="viewer", orgs=[world.org_a])
    r = await gw.request("POST", "/auth/envoy" + uri, headers=envoy(viewer["key"]))
    assert (r.status, r.headers["X-Auth-Error"]) == (403, "insufficient_permissions")
    r = await gw.request("GET", "/auth/envoy" + uri, headers=envoy(viewer["key"]))
    assert r.status == 200


async def test_envoy_public_and_denied(gw: Client, world: World) -> None:
    r = await gw.get("/auth/envoy/docs/guide", headers=envoy(None))
    assert (r.status, r.headers["X-Auth-Method"]) == (200, "anonymous")
    r = await gw.get("/auth/envoy/", headers=envoy(None))
    assert r.status == 200
    r = await gw.get("/auth/envoy/v1/things", headers=envoy(None))
    assert (r.status, r.headers["X-Auth-Error"]) == (401, "missing_credentials")


@pytest.mark.parametrize(
    "trick", ["/docs/%2e%2e/v1/things", "/docs/%2E%2E/v1/things", "/docs/..%2Fv1/things", "/docs//../v1/things"]
)
async def test_envoy_path_tricks(gw: Client, world: World, trick: str) -> None:
    # encoded=True: send the path exactly as written, not as the client library would clean it.
    r = await gw.session.get(URL(f"http://127.0.0.1:{gw.port}/auth/envoy{trick}", encoded=True), headers=envoy(None))
    assert (r.status, r.headers["X-Auth-Error"]) == (401, "invalid_request")


async def test_envoy_ignores_other_proxies_headers(gw: Client, world: World) -> None:
    forged = {"X-Forwarded-Uri": "/docs/a", "X-Original-URI": "/docs/a", "X-Forwarded-Method": "GET"}
    r = await gw.request("DELETE", "/auth/envoy/v1/things", headers=envoy(None, **forged))
    assert r.headers["X-Auth-Error"] == "missing_credentials"


async def test_envoy_without_original_path_is_invalid(gw: Client, world: World) -> None:
    r = await gw.get("/auth/envoy", headers=envoy(None))
    assert r.status == 404  # not an endpoint: Envoy always appends the original path


async def test_identity_header_aliases_are_refused(gw: Client, world: World) -> None:
    k, uri = await _project(world)
    for alias in ("X_Org", "x_role", "X.Scopes", "X_Key_Id"):
        r = await gw.get("/auth/traefik", headers=traefik(k["key"], uri, **{alias: "forged"}))
        assert (r.status, r.headers["X-Auth-Error"]) == (401, "invalid_request"), alias


async def test_envoy_with_a_session_cookie_and_the_csrf_rule(gw: Client, world: World) -> None:
    """Issue 12: Envoy forwards the cookie, Origin and Sec-Fetch-Site (deploy/envoy/envoy.yaml); a session
    identifies, and its unsafe requests need an allowed origin."""
    k = await world.key(orgs=[world.org_a])
    signed_in = await gw.post("/ui/session", json={"key": k["key"]})
    cookie = f"gw_session={signed_in.cookies['gw_session'].value}"
    gw.session.cookie_jar.clear()
    r = await gw.request("GET", "/auth/envoy/v1/things", headers=envoy(None, cookie=cookie))
    assert (r.status, r.headers["X-Auth-Method"], r.headers["X-Org"]) == (200, "session", world.org_a)
    r = await gw.request("POST", "/auth/envoy/v1/things", headers=envoy(None, cookie=cookie))
    assert (r.status, r.headers["X-Auth-Error"]) == (403, "csrf_failed")
    r = await gw.request(
        "POST", "/auth/envoy/v1/things", headers=envoy(None, cookie=cookie, **{"sec-fetch-site": "same-origin"})
    )
    assert r.status == 200
