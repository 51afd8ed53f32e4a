from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import constants as C
from gateway.app import create_app
from gateway.config import RolesConfig
from gateway.errors import ConfigError, InvalidRequest
from gateway.policy import OriginalRequest, RoutePolicy, compile_policy, load_policy
from tests._proxies import PATH_TRICKS
from tests.conftest import ROOT, Client, Services, World, corrupt, make_config, nginx_headers

SHIPPED = ROOT / "config/policy.yaml"
ROLES = RolesConfig()


def H(**headers: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(headers))


def req(path: str, method: str = "GET", host: str = "api.example.com") -> OriginalRequest:
    return OriginalRequest(method, host, path, "")


@pytest.fixture(scope="module")
def shipped() -> RoutePolicy:
    return load_policy(str(SHIPPED), ROLES)


@pytest.mark.parametrize(
    ("method", "path", "auth", "permission", "org", "project"),
    [
        ("GET", "/", "public", None, None, None),
        ("GET", "/docs", "public", None, None, None),
        ("GET", "/docs/guide/intro", "public", None, None, None),
        ("GET", "/v1/orgs/org_1/projects/prj_1/calls", "required", "projects:read", "org_1", "prj_1"),
        ("HEAD", "/v1/orgs/org_1/projects/prj_1/", "required", "projects:read", "org_1", "prj_1"),
        ("POST", "/v1/orgs/org_1/projects/prj_1/calls", "required", "projects:write", "org_1", "prj_1"),
        ("GET", "/v1/orgs/org_1/members", "required", "*:read", "org_1", None),
        ("DELETE", "/v1/orgs/org_1/members/usr_2", "required", "*:write", "org_1", None),
        ("GET", "/v1/things", "required", None, None, None),
        ("GET", "/admin", "deny", None, None, None),
        ("GET", "/v2/x", "deny", None, None, None),
    ],
)
def test_shipped_policy_decisions(
    shipped: RoutePolicy,
    method: str,
    path: str,
    auth: str,
    permission: str | None,
    org: str | None,
    project: str | None,
) -> None:
    d = shipped.decide(req(path, method), H())
    assert (d.auth, d.permission, d.org, d.project) == (auth, permission, org, project)


def test_org_from_header_and_host(shipped: RoutePolicy) -> None:
    assert shipped.decide(req("/v1/things"), H(**{"X-Org-Id": "org_9"})).org == "org_9"
    p = compile_policy({"rules": [{"host": "{tenant}.example.com", "path": "/**", "org": {"host": "tenant"}}]}, ROLES)
    assert p.decide(req("/x", host="acme.example.com:8443"), H()).org == "acme"
    assert p.decide(req("/x", host="example.com"), H()).auth == "deny"
    with pytest.raises(InvalidRequest):
        p.decide(req("/x", host="a b.example.com"), H())
    with pytest.raises(InvalidRequest):
        shipped.decide(req("/v1/orgs/bad%20id/x"), H())


def test_first_match_wins_and_methods_filter() -> None:
    p = compile_policy(
        {
            "rules": [
                {"name": "ro", "path": "/a/{x}", "methods": ["GET"], "auth": "public"},
                {"name": "lit", "path": "/a/b", "require": {"role": "admin"}},
                {"name": "rest", "path": "/a/**", "auth": "deny"},
            ]
        },
        ROLES,
    )
    assert p.decide(req("/a/b"), H()).rule == "rules[0] (ro)"
    assert p.decide(req("/a/b", "POST"), H()).role == "admin"
    assert p.decide(req("/a/c", "POST"), H()).auth == "deny"
    assert p.decide(req("/a/", "GET"), H()).auth == "deny"  # {x} needs a non-empty segment


@pytest.mark.parametrize(
    ("path", "rule", "org", "project"),
    [
        ("/V1/ORGS/org_AbC/things", "rules[4] (org reads)", "org_AbC", None),
        ("/v1/Orgs/org_AbC/Projects/prj_XyZ/x", "rules[2] (project reads)", "org_AbC", "prj_XyZ"),
        ("/DOCS/x", "rules[1] (docs)", None, None),
        ("/Docs", "rules[1] (docs)", None, None),
        ("/v1/orgs/org_abc/things", "rules[4] (org reads)", "org_abc", None),
    ],
)
def test_literal_segments_ignore_case_params_keep_it(
    shipped: RoutePolicy, path: str, rule: str, org: str | None, project: str | None
) -> None:
    """Express and IIS route `/V1/ORGS/B` as `/v1/orgs/B` (issue 9, item 1: `X-Org-Id: A` won over the
    path's org B): literals match in any case, while an id in a `{param}` is taken as written."""
    d = shipped.decide(req(path), H(**{"X-Org-Id": "org_other"}))
    assert (d.rule, d.org, d.project) == (rule, org, project)


BAD_POLICIES: list[tuple[Any, str]] = [
    ("just text", "policy: the file must hold a mapping"),
    ({"rules": {}}, "policy: rules must be a list"),
    ({"rulez": []}, "policy: unknown key 'rulez'"),
    ({"rules": [{"path": "/a", "color": "red"}]}, "rules[0]: unknown key 'color'"),
    ({"rules": [{"name": "x", "path": "/a/{b"}]}, "rules[0] (x): bad path parameter"),
    ({"rules": [{"path": "/a/x{y}"}]}, "rules[0]: bad path parameter"),
    ({"rules": [{"path": "/a/**/b"}]}, "rules[0]: ** may only end"),
    ({"rules": [{"path": "/a/{b}/{b}"}]}, "appears twice"),
    ({"rules": [{"path": "a"}]}, "rules[0]: path must be a string starting with /"),
    ({"rules": [{"path": "/a/../b"}]}, "bad path segment"),
    # Literals a canonical request can never carry, or that routers decode differently: refused.
    ({"rules": [{"path": "/a;b"}]}, "bad path segment 'a;b'"),
    ({"rules": [{"path": "/a%41"}]}, "bad path segment 'a%41'"),
    ({"rules": [{"path": "/things:batch"}]}, "bad path segment 'things:batch'"),
    ({"rules": [{"path": "/orgs./x"}]}, "bad path segment 'orgs.'"),
    ({"rules": [{"path": "/a//b"}]}, "bad path segment ''"),
    (
        {"rules": [{"name": "lower", "path": "/docs/**"}, {"name": "upper", "path": "/DOCS/x"}]},
        "rules[1] (upper): can never match: rules[0] (lower) matches everything it does",
    ),
    ({"rules": [{"path": "/a", "auth": "maybe"}]}, "auth must be public, required or deny"),
    ({"rules": [{"path": "/a", "require": {"role": "god"}}]}, "require.role 'god' is not a role"),
    ({"rules": [{"path": "/a", "require": {"permission": "everything"}}]}, "require.permission"),
    ({"rules": [{"path": "/a", "auth": "public", "require": {"role": "admin"}}]}, "require only applies"),
    ({"rules": [{"path": "/a", "org": {"path": "org"}}]}, "names path parameter {org}"),
    ({"rules": [{"path": "/a", "org": {"host": "t"}}]}, "names host parameter {t}"),
    ({"rules": [{"path": "/a/{p}", "project": {"header": "X-P"}}]}, "project can only come from a path"),
    ({"rules": [{"path": "/a", "methods": "GET"}]}, "methods must be a non-empty list"),
    ({"rules": [{"path": "/a", "host": "bad_host!"}]}, "bad host label"),
    (
        {"rules": [{"name": "all", "path": "/**"}, {"name": "dead", "path": "/a/{b}"}]},
        "rules[1] (dead): can never match: rules[0] (all) matches everything it does",
    ),
    (
        {"rules": [{"path": "/a/{x}", "methods": ["GET", "POST"]}, {"path": "/a/b", "methods": ["GET"]}]},
        "rules[1]: can never match",
    ),
    ({"default": {"path": "/x"}}, "default: unknown key 'path'"),
]


@pytest.mark.parametrize(("data", "message"), BAD_POLICIES)
def test_bad_policies_name_the_rule(data: Any, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        compile_policy(data, ROLES)
    assert message in str(exc.value)


def test_not_shadowed_when_narrower_first() -> None:
    compile_policy({"rules": [{"path": "/a/b", "methods": ["GET"]}, {"path": "/a/{x}"}, {"path": "/**"}]}, ROLES)
    compile_policy({"rules": [{"host": "a.example.com", "path": "/**"}, {"path": "/**"}]}, ROLES)


def test_policy_check_command(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "gateway", "policy", "check", str(SHIPPED)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        env={"PATH": os.environ["PATH"]},
    )
    assert ok.returncode == 0, ok.stderr
    assert "rules[2] (project reads)" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"rules": [{"name": "all", "path": "/**"}, {"name": "dead", "path": "/x"}]}))
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "policy", "check", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        env={"PATH": os.environ["PATH"]},
    )
    assert r.returncode == 2
    assert "rules[1] (dead): can never match" in r.stderr and "Traceback" not in r.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("rules: [\n")
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "policy", "check", str(broken)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        env={"PATH": os.environ["PATH"]},
    )
    assert r.returncode == 2 and "not valid YAML" in r.stderr


# --- through the gateway -----------------------------------------------------------------------


@pytest.fixture
async def pclient(aiohttp_client: Any, services: Services, clean: None) -> Client:
    cfg = make_config(services, policy_file=str(SHIPPED))
    c: Client = await aiohttp_client(create_app(cfg))
    return c


async def test_upper_case_literals_take_the_orgs_rule(pclient: Client, world: World) -> None:
    """`/v1/ORGS/B/things` with `X-Org-Id: A` was authorised for A while Express served B (issue 9, item 1)."""
    k = await world.key(orgs=[world.org_a])
    for path in (f"/v1/ORGS/{world.org_b}/things", f"/V1/Orgs/{world.org_b}/things"):
        r = await pclient.get("/auth/nginx", headers=nginx_headers(k["key"], uri=path, **{"X-Org-Id": world.org_a}))
        assert (r.status, r.headers["X-Auth-Error"]) == (403, "org_not_allowed"), path
    r = await pclient.get("/auth/nginx", headers=nginx_headers(k["key"], uri=f"/V1/ORGS/{world.org_a}/things"))
    assert (r.status, r.headers["X-Org"]) == (200, world.org_a)
    r = await pclient.get("/auth/nginx", headers=nginx_headers(uri="/DOCS/Intro"))
    assert (r.status, r.headers["X-Auth-Method"]) == (200, "anonymous")


async def test_public_routes_are_anonymous(pclient: Client, world: World) -> None:
    for path in ("/", "/docs/", "/docs/a/b"):
        r = await pclient.get("/auth/nginx", headers=nginx_headers(uri=path))
        assert r.status == 200, path
        assert r.headers["X-Auth-Method"] == "anonymous"
        assert r.headers["X-Org"] == r.headers["X-Role"] == r.headers["X-Key-Id"] == ""


@pytest.mark.parametrize("trick", PATH_TRICKS)
async def test_path_tricks_cannot_reach_protected_routes_as_public(pclient: Client, world: World, trick: str) -> None:
    r = await pclient.get("/auth/nginx", headers=nginx_headers(uri=trick))
    assert (r.status, r.headers["X-Auth-Error"]) == (401, "invalid_request")


async def test_unmatched_route_is_denied(pclient: Client, world: World) -> None:
    k = await world.key(orgs=[world.org_a])
    r = await pclient.get("/auth/nginx", headers=nginx_headers(k["key"], uri="/admin"))
    assert (r.status, r.headers["X-Auth-Error"]) == (403, "route_not_allowed")


async def test_org_and_project_from_path(pclient: Client, world: World) -> None:
    prj_a = (await world.directory.create_project(world.org_a, "web"))["id"]
    prj_b = (await world.directory.create_project(world.org_b, "web"))["id"]
    k = await world.key(orgs=[world.org_a])
    ok = await pclient.get(
        "/auth/nginx", headers=nginx_headers(k["key"], uri=f"/v1/orgs/{world.org_a}/projects/{prj_a}/x")
    )
    assert ok.status == 200
    assert (ok.headers["X-Org"], ok.headers["X-Project"]) == (world.org_a, prj_a)
    other = f"/v1/orgs/{world.org_a}/projects/{prj_b}/x"  # a project of another org
    r = await pclient.get("/auth/nginx", headers=nginx_headers(k["key"], uri=other))
    assert (r.status, r.headers["X-Auth-Error"]) == (403, "project_not_allowed")
    r = await pclient.get(
        "/auth/nginx", headers=nginx_headers(k["key"], uri=f"/v1/orgs/{world.org_a}/projects/prj_nope/x")
    )
    assert r.headers["X-Auth-Error"] == "project_not_allowed"
    r = await pclient.get("/auth/nginx", headers=nginx_headers(k["key"], uri=f"/v1/orgs/{world.org_b}/x"))
    assert r.headers["X-Auth-Error"] == "org_not_allowed"


async def test_key_project_list(pclient: Client, world: World) -> None:
    prj_1 = (await world.directory.create_project(world.org_a, "one"))["id"]
    prj_2 = (await world.directory.create_project(world.org_a, "two"))["id"]
    k = await world.key(orgs=[world.org_a], projects=[prj_1])
    base = f"/v1/orgs/{world.org_a}/projects"
    assert (await pclient.get("/auth/nginx", headers=nginx_headers(k["key"], uri=f"{base}/{prj_1}/x"))).status == 200
    r = await pclient.get("/auth/nginx", headers=nginx_headers(k["key"], uri=f"{base}/{prj_2}/x"))
    assert r.headers["X-Auth-Error"] == "project_not_allowed"


async def test_permissions_per_method(pclient: Client, world: World) -> None:
    k = await world.key(role="member", orgs=[world.org_b])  # viewer in B: reads only
    uri = f"/v1/orgs/{world.org_b}/members"
    r = await pclient.get("/auth/nginx", headers=nginx_headers(k["key"], uri=uri))
    assert (r.status, r.headers["X-Scopes"]) == (200, "*:read")
    r = await pclient.get("/auth/nginx", headers=nginx_headers(k["key"], uri=uri, method="POST"))
    assert (r.status, r.headers["X-Auth-Error"]) == (403, "insufficient_permissions")
    scoped = await world.key(name="scoped", orgs=[world.org_a], scopes=["calls:read"])
    r = await pclient.get("/auth/nginx", headers=nginx_headers(scoped["key"], uri=f"/v1/orgs/{world.org_a}/members"))
    assert r.headers["X-Auth-Error"] == "insufficient_permissions"  # *:read is more than calls:read


async def test_bad_key_on_public_route_is_still_refused(pclient: Client, world: World) -> None:
    k = await world.key(orgs=[world.org_a])
    r = await pclient.get("/auth/nginx", headers=nginx_headers(corrupt(k["key"]), uri="/docs/x"))
    assert r.headers["X-Auth-Error"] == "invalid_api_key"
    r = await pclient.get("/auth/nginx", headers=nginx_headers(k["key"], uri="/docs/x"))
    assert (r.status, r.headers["X-Auth-Method"]) == (200, "api_key")


async def test_sighup_reloads_and_keeps_old_on_error(
    aiohttp_client: Any, services: Services, clean: None, world: World, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"rules": [{"path": "/open", "auth": "public"}]}))
    c = await aiohttp_client(create_app(make_config(services, policy_file=str(policy))))
    assert (await c.get("/auth/nginx", headers=nginx_headers(uri="/open"))).status == 200
    assert (await c.get("/auth/nginx", headers=nginx_headers(uri="/new"))).headers[
        "X-Auth-Error"
    ] == "route_not_allowed"
    policy.write_text(yaml.safe_dump({"rules": [{"path": "/new", "auth": "public"}]}))
    os.kill(os.getpid(), signal.SIGHUP)
    await asyncio.sleep(0.1)
    assert (await c.get("/auth/nginx", headers=nginx_headers(uri="/new"))).status == 200
    assert (await c.get("/auth/nginx", headers=nginx_headers(uri="/open"))).status == 403
    policy.write_text("rules: [ {path: nope} ]\n")  # bad: the running policy stays
    os.kill(os.getpid(), signal.SIGHUP)
    await asyncio.sleep(0.1)
    assert (await c.get("/auth/nginx", headers=nginx_headers(uri="/new"))).status == 200


async def test_keys_verify_applies_the_route_policy(pclient: Client, world: World) -> None:
    prj = (await world.directory.create_project(world.org_a, "web"))["id"]
    k = await world.key(role="viewer", orgs=[world.org_a])
    base = f"/v1/orgs/{world.org_a}/projects/{prj}/calls"

    async def verify(**body: str) -> dict[str, Any]:
        r = await pclient.post("/v1/keys/verify", json={"key": k["key"], **body})
        assert r.status == 200
        result: dict[str, Any] = await r.json()
        return result

    assert (await verify(method="GET", path=base))["code"] == "VALID"
    assert (await verify(method="POST", path=base))["code"] == "INSUFFICIENT_PERMISSIONS"
    assert (await verify(path="/admin"))["code"] == "ROUTE_NOT_ALLOWED"
    assert (await verify(path=f"/v1/orgs/{world.org_b}/x"))["code"] == "ORG_NOT_ALLOWED"
    assert (await verify(path="/v1/things", org=world.org_a))["org"] == world.org_a
    for path in ("/a%2Fb", f"/v1/orgs/{world.org_b}/../{world.org_a}/x", f"/v1/orgs/{world.org_a}/..;/x", "/x#y"):
        r = await pclient.post("/v1/keys/verify", json={"key": k["key"], "path": path})
        assert (r.status, (await r.json())["error"]["code"]) == (400, "invalid_request"), path


def test_route_matches_are_remembered_within_a_bound() -> None:
    """A proxy sends the same routes over and over: each (method, host, path) is matched once, and a
    stream of distinct paths empties the memo instead of growing it."""
    p = compile_policy(
        {"rules": [{"path": "/v1/orgs/{org}/**", "methods": ["GET"], "org": {"path": "org"}}, {"path": "/**"}]},
        ROLES,
    )
    headers = H()
    first = p.decide(req("/v1/orgs/A/x"), headers)
    assert p.decide(req("/v1/orgs/A/x"), headers) == first and first.org == "A"
    assert p.decide(req("/v1/orgs/A/x", "POST"), headers).org is None  # the method is part of the match
    assert p.decide(req("/v1/orgs/B/x"), headers).org == "B"
    for i in range(C.POLICY_MATCH_MEMO + 10):
        p.decide(req(f"/v1/orgs/o{i}/x"), headers)
    assert len(p._matched) <= C.POLICY_MATCH_MEMO
    assert p.decide(req("/v1/orgs/A/x"), headers) == first
