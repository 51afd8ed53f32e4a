"""The OpenAPI document of /v1/ against what the gateway answers: every success answer of every operation,
checked against the schema the document gives it (exactly: a field the document does not name fails
here), and schemathesis driving a real `gateway serve` through the whole document.

Issue 11: the document modelled request bodies only; every success answer was `{"type": "object"}`."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from hypothesis import strategies as st

from gateway import policy
from gateway.api import MAX_PAGE
from gateway.audit import CLI
from gateway.invitations import Invitations
from gateway.openapi import openapi
from gateway.responses import RESPONSES
from gateway.schemas import ID_PATTERN, REQUESTS
from tests.conftest import Client, GatewayProcess, Services, World, start_gateway
from tests.test_api import auth

# --- the document itself -------------------------------------------------------------------------


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, m, op) for path, ops in doc["paths"].items() for m, op in ops.items() if m != "parameters"]


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_every_success_answer_has_a_schema_from_the_response_models() -> None:
    doc = openapi()
    schemas = doc["components"]["schemas"]
    for model in RESPONSES:
        generated = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
        for name, nested in generated.pop("$defs", {}).items():
            assert schemas[name] == nested, name  # the models a model nests sit beside it
        assert schemas[model.__name__] == generated
    for path, method, op in _operations(doc):
        ok = {s: r for s, r in op["responses"].items() if s.startswith("2")}
        assert ok, (path, method)
        for answer in ok.values():
            ref = answer["content"]["application/json"]["schema"]["$ref"]
            assert ref.rsplit("/", 1)[1] in {m.__name__ for m in RESPONSES}, (path, method)
    # Every reference resolves within the document.
    for ref in _refs(doc):
        node: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
    assert not {m.__name__ for m in REQUESTS} & {m.__name__ for m in RESPONSES}


def test_parameters_are_typed_as_the_handlers_read_them() -> None:
    """Before, every parameter was a bare string: `limit` (an integer from 1 to 100, gateway.api.page),
    `revoke_keys` (true or false) and the ids in paths (gateway.policy.checked_id)."""
    doc = openapi()
    query = {
        (path, method, p["name"]): p["schema"]
        for path, method, op in _operations(doc)
        for p in op.get("parameters", [])
    }
    limit = {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 50}
    assert query["/v1/keys", "get", "limit"] == query["/v1/orgs/{org}/audit", "get", "limit"] == limit
    assert query["/v1/keys", "get", "status"]["enum"] == ["active", "expired", "revoked"]
    assert query["/v1/orgs/{org}/projects/{project}", "delete", "revoke_keys"] == {"type": "boolean", "default": False}
    assert query["/v1/orgs/{org}/audit", "get", "since"]["format"] == "date-time"
    assert ID_PATTERN == "^[A-Za-z0-9_-]{1,64}$" and policy.checked_id("prj_x-1", "id") == "prj_x-1"
    for path, item in doc["paths"].items():
        names = re.findall(r"{(\w+)}", path)
        assert [(p["name"], p["in"], p["schema"]["pattern"]) for p in item.get("parameters", [])] == [
            (n, "path", ID_PATTERN) for n in names
        ]


def test_each_operation_lists_the_statuses_its_handler_answers() -> None:
    doc = openapi()
    statuses = {(path, method): set(op["responses"]) for path, method, op in _operations(doc)}
    assert statuses["/v1/orgs/{org}/members", "post"] >= {"200", "202", "409"}  # member already, or invited
    assert statuses["/v1/keys/{key_id}/rotate", "post"] >= {"201", "409"}  # a key no longer active
    assert statuses["/v1/keys/verify", "post"] == {"200", "400", "408", "413", "500", "503"}
    for (path, method), codes in statuses.items():
        if path not in ("/v1/keys/verify", "/v1/tokens/revoke"):  # no credential to refuse
            assert codes >= {"400", "401", "403", "429", "500", "503"}, (path, method)
    rotate = doc["paths"]["/v1/keys/{key_id}/rotate"]["post"]
    assert rotate["requestBody"]["required"] is False  # an empty body is `{}`: grace 0


# --- real answers, checked against the document --------------------------------------------------


def _closed(node: Any) -> Any:
    """The schemas with every object that names its properties closed to others: the document stays open
    for clients (a new field is not a breaking change), but an answer here must carry nothing it omits."""
    if isinstance(node, dict):
        out = {k: _closed(v) for k, v in node.items()}
        if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_closed(v) for v in node]
    return node


class Document:
    """The served document, and which documented answers the test has seen."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.components = _closed(doc["components"])
        self.seen: set[tuple[str, str, str]] = set()

    def check(self, method: str, path: str, status: int, body: Any) -> None:
        responses = self.doc["paths"][path][method]["responses"]
        assert str(status) in responses, f"{method} {path} answered {status}, not documented: {body}"
        answer = responses[str(status)]
        ref = answer["$ref"] if "$ref" in answer else answer["content"]["application/json"]["schema"]["$ref"]
        if ref.startswith("#/components/responses/"):
            ref = "#/components/schemas/Error"
        validator = jsonschema_rs.Draft202012Validator(
            {"$ref": ref, "components": self.components}, validate_formats=True
        )
        errors = [f"{e.instance_path}: {e.message}" for e in validator.iter_errors(body)]
        assert not errors, f"{method} {path} {status}: {errors}\n{body}"
        self.seen.add((method, path, str(status)))

    def unseen_successes(self) -> set[tuple[str, str, str]]:
        documented = {
            (method, path, status)
            for path, method, op in _operations(self.doc)
            for status in op["responses"]
            if status.startswith("2")
        }
        return documented - self.seen


@dataclass
class Api:
    client: Client
    doc: Document

    async def __call__(
        self,
        method: str,
        path: str,
        status: int,
        key: dict[str, Any] | None,
        json: Any = None,
        query: str = "",
        headers: dict[str, str] | None = None,
        **ids: str,
    ) -> Any:
        headers = {**(auth(key) if key is not None else {}), **(headers or {})}
        r = await self.client.request(method.upper(), path.format(**ids) + query, json=json, headers=headers)
        body = await r.json()
        assert r.status == status, (method, path, r.status, body)
        self.doc.check(method, path, r.status, body)
        return body


@pytest.fixture
async def api(client: Client) -> Api:
    r = await client.get("/v1/openapi.json")
    return Api(client, Document(await r.json()))


async def _keys(api: Api, world: World, me: dict[str, Any], org: str, project: str) -> None:
    rich = {
        "name": "ci",
        "role": "member",
        "env": "test",
        "orgs": [org],
        "projects": [project],
        "scopes": ["calls:read"],
        "expires_in": "30d",
        "allowed_ips": ["127.0.0.0/8"],
        "rate_limit": "100/1m",
    }
    created = await api("post", "/v1/keys", 201, me, json=rich)
    await api("post", "/v1/keys", 201, me, json={"name": "plain", "role": "viewer"})
    page = await api("get", "/v1/keys", 200, me, query="?limit=1")
    assert page["next_cursor"] is not None
    await api("get", "/v1/keys", 200, me, query=f"?org={org}&status=active&cursor={page['next_cursor']}")
    await api("get", "/v1/keys/{key_id}", 200, me, key_id=created["id"])
    await api("get", "/v1/keys", 200, me, query="?q=c&status=active&expires_before=2999-01-01T00:00:00Z")
    usage = await api("get", "/v1/keys/{key_id}/usage", 200, me, query="?days=7", key_id=created["id"])
    assert len(usage["items"]) == 7
    rotated = await api("post", "/v1/keys/{key_id}/rotate", 201, me, json={"grace": "1h"}, key_id=created["id"])
    own = await api("post", "/v1/keys/{key_id}/revoke", 200, me, key_id=rotated["id"])
    assert own["revoked_at"] is not None
    await api("post", "/v1/keys/{key_id}/rotate", 409, me, key_id=rotated["id"])  # revoked
    # Another member's keys, as the org's admin sees and stops them: a key of this org only is revoked
    # whole; an all-orgs key (its owner is in org B too) is stopped here only.
    dev = (await world.directory.create_user("dev@example.com"))["id"]
    for org_id in (org, world.org_b):
        await world.directory.set_member(org_id, dev, "member")
    here = await world.key(name="here", user=dev, role="member", orgs=[org])
    everywhere = await world.key(name="everywhere", user=dev, role="member")
    await api("get", "/v1/keys/{key_id}", 200, me, key_id=everywhere["id"])
    whole = await api("post", "/v1/keys/{key_id}/revoke", 200, me, key_id=here["id"])
    stopped = await api("post", "/v1/keys/{key_id}/revoke", 200, me, key_id=everywhere["id"])
    assert whole["revoked_at"] is not None and stopped["revoked_in"] == [org]


async def _verify(api: Api, me: dict[str, Any], org: str) -> None:
    valid = await api("post", "/v1/keys/verify", 200, None, json={"key": me["key"], "org": org})
    assert valid["valid"] is True and valid["ratelimit"] is not None
    refused = await api("post", "/v1/keys/verify", 200, None, json={"key": "gw_live_nope"})
    assert (refused["valid"], refused["code"]) == (False, "INVALID_API_KEY")
    await api("post", "/v1/keys/verify", 400, None, json={"key": 5})


async def _members(api: Api, world: World, me: dict[str, Any], org: str) -> None:
    invited = await api(
        "post", "/v1/orgs/{org}/members", 202, me, json={"email": "x@example.com", "role": "member"}, org=org
    )
    x_key = await world.key(name="x", user=invited["user_id"], role="owner")
    await api("get", "/v1/orgs/{org}/invitations", 200, me, org=org)
    await api("get", "/v1/invitations", 200, x_key)
    await api("post", "/v1/invitations/{invitation}/accept", 200, x_key, invitation=invited["id"])
    await api("post", "/v1/invitations/{invitation}/accept", 409, x_key, invitation=invited["id"])
    changed = await api(
        "post", "/v1/orgs/{org}/members", 200, me, json={"email": "x@example.com", "role": "viewer"}, org=org
    )
    assert changed["status"] == "member"
    await api("get", "/v1/orgs/{org}/members", 200, me, org=org)
    await api(
        "put", "/v1/orgs/{org}/members/{user_id}", 200, me, json={"role": "admin"}, org=org, user_id=invited["user_id"]
    )
    await api("delete", "/v1/orgs/{org}/members/{user_id}", 200, me, org=org, user_id=invited["user_id"])
    # An invitation withdrawn, and one declined.
    for email in ("y@example.com", "z@example.com"):
        await api("post", "/v1/orgs/{org}/members", 202, me, json={"email": email, "role": "viewer"}, org=org)
    (y, z) = (await api("get", "/v1/orgs/{org}/invitations", 200, me, org=org))["items"]
    await api("delete", "/v1/orgs/{org}/invitations/{invitation}", 200, me, org=org, invitation=y["id"])
    z_key = await world.key(name="z", user=z["user_id"], role="viewer")
    await api("post", "/v1/invitations/{invitation}/decline", 200, z_key, invitation=z["id"])


async def _sessions_and_tokens(api: Api, me: dict[str, Any], org: str) -> None:
    sa = await api("post", "/v1/orgs/{org}/service-accounts", 201, me, json={"name": "web", "role": "admin"}, org=org)
    body = {"name": "issuer", "role": "admin"}
    issuer = await api("post", "/v1/orgs/{org}/service-accounts/{sa}/keys", 201, me, json=body, org=org, sa=sa["id"])

    async def session() -> tuple[dict[str, Any], dict[str, str]]:
        issued = await api("post", "/v1/sessions", 201, issuer, json={"user": me["user_id"], "org": org})
        cookie = issued["cookie"]
        return issued, {"Cookie": f"{cookie['name']}={cookie['value']}", "X-CSRF-Token": issued["csrf"]}

    _, cookie = await session()
    await api("get", "/v1/sessions", 200, None, headers=cookie)
    await api("post", "/v1/session/org", 200, None, json={"org": org}, headers=cookie)
    from_session = await api("post", "/v1/tokens", 200, None, json={}, headers=cookie)
    from_key = await api("post", "/v1/tokens", 200, me, json={"org": org, "role": "viewer", "ttl": "5m"})
    await api("post", "/v1/tokens/refresh", 200, None, json={"refresh_token": from_key["refresh_token"]})
    await api("post", "/v1/tokens/revoke", 200, None, json={"token": from_session["access_token"]})
    other, _ = await session()
    await api("delete", "/v1/sessions/{session_id}", 200, None, headers=cookie, session_id=other["session"]["id"])
    await api("delete", "/v1/session", 200, None, headers=cookie)
    await session()
    await api("delete", "/v1/sessions", 200, me)


async def test_every_success_answer_matches_its_documented_schema(api: Api, world: World) -> None:
    me = await world.key(name="me", role="owner")
    assert (await api("get", "/v1/me", 200, me))["orgs"]
    org = (await api("post", "/v1/orgs", 201, me, json={"name": "Documented"}))["id"]
    await api("get", "/v1/orgs", 200, me)
    await api("get", "/v1/orgs/{org}", 200, me, org=org)
    project = (await api("post", "/v1/orgs/{org}/projects", 201, me, json={"name": "web"}, org=org))["id"]
    await api("get", "/v1/orgs/{org}/projects", 200, me, org=org)
    await api("get", "/v1/orgs/{org}/projects/{project}", 200, me, org=org, project=project)
    await _keys(api, world, me, org, project)
    await _verify(api, me, org)
    await _members(api, world, me, org)
    await _sessions_and_tokens(api, me, org)
    sa = await api("post", "/v1/orgs/{org}/service-accounts", 201, me, json={"name": "ci", "role": "member"}, org=org)
    await api("get", "/v1/orgs/{org}/service-accounts", 200, me, org=org)
    body = {"name": "deploy", "role": "member"}
    await api("post", "/v1/orgs/{org}/service-accounts/{sa}/keys", 201, me, json=body, org=org, sa=sa["id"])
    await api("delete", "/v1/orgs/{org}/projects/{project}", 409, me, org=org, project=project)  # a key names it
    gone = await api(
        "delete", "/v1/orgs/{org}/projects/{project}", 200, me, query="?revoke_keys=true", org=org, project=project
    )
    assert gone["revoked_keys"]
    audit = await api("get", "/v1/orgs/{org}/audit", 200, me, query="?limit=2", org=org)
    assert audit["next_cursor"] is not None
    await api("get", "/v1/orgs/{org}/audit", 200, me, query=f"?cursor={audit['next_cursor']}", org=org)
    assert api.doc.unseen_successes() == set()


# --- what the schemathesis run and the probes beside it found -----------------------------------


def _cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("method", "path", "query", "body", "field"),
    [
        # Text no database holds: a NUL, an unpaired surrogate (JSON escapes both).
        ("post", "/v1/orgs", "", {"name": "\ud800"}, None),
        ("post", "/v1/orgs/{org}/members", "", {"email": "a\x00@example.com", "role": "viewer"}, None),
        ("post", "/v1/orgs/{org}/members", "", {"email": "\udfff@example.com", "role": "viewer"}, None),
        ("post", "/v1/keys", "", {"name": "x", "role": "viewer", "projects": ["\x00"]}, None),
        ("get", "/v1/orgs/{org}/audit", "?type=%00", None, "type"),
        ("get", "/v1/orgs/{org}/audit", "?key_id=%00", None, "key_id"),
        ("get", "/v1/orgs/{org}/audit", "?actor=%00", None, "actor"),
        ("get", "/v1/keys", "?org={org}&owner=%00", None, "owner"),
        # Times that are no year from 1 to 9999 in UTC, as Postgres stores them.
        ("get", "/v1/orgs/{org}/audit", "?since=0001-01-01T00:00:00%2B14:00", None, "since"),
        ("get", "/v1/orgs/{org}/audit", "?until=9999-12-31T23:59:59-14:00", None, "until"),
        ("get", "/v1/keys", "?cursor=" + _cursor(["0001-01-01T00:00:00+14:00", "k"]), None, "cursor"),
    ],
)
async def test_input_the_database_cannot_take_is_a_bad_request_not_a_bug(
    api: Api, world: World, method: str, path: str, query: str, body: Any, field: str | None
) -> None:
    """Before: 500 internal_error, each (Postgres or its driver refused the value as an error of its own)."""
    me = await world.key(role="owner")
    answer = await api(method, path, 400, me, json=body, query=query.format(org=world.org_a), org=world.org_a)
    assert (answer["error"]["code"], answer["error"].get("field")) == ("invalid_request", field)


async def test_a_key_that_is_not_text_is_still_a_verdict(client: Client, world: World) -> None:
    """Review: the NUL check above first ran on every JSON body, so /v1/keys/verify answered 400 where a key
    no database holds is simply not a key (a 200 verdict, as before), and the page's sign-in 400, not 401."""
    k = await world.key()
    for key in (k["key"] + "\x00", "\ud800"):
        r = await client.post("/v1/keys/verify", json={"key": key})
        assert r.status == 200, await r.text()
        assert (await r.json())["valid"] is False
        r = await client.post("/ui/session", json={"key": key})
        assert r.status == 401, await r.text()


async def test_null_orgs_and_projects_are_absent_as_every_null_is(api: Api, world: World) -> None:
    """Before: 400 `orgs must be "all" or a non-empty list` for `"orgs": null`, which the document allows
    and gateway.schemas takes as absent (here: all)."""
    me = await world.key(role="owner")
    body = {"name": "x", "role": "viewer", "orgs": None, "projects": None}
    created = await api("post", "/v1/keys", 201, me, json=body)
    assert (created["orgs"], created["projects"]) == ("all", "all")


@pytest.mark.parametrize(
    ("path", "body", "accepted"),
    [
        ("/v1/keys", {"name": "x", "role": "viewer", "env": None, "scopes": None}, True),
        ("/v1/keys", {"name": None, "role": "viewer"}, False),  # required: present and not null
        ("/v1/keys", {"name": "", "role": "viewer"}, False),
        ("/v1/keys", {"name": "x", "role": "viewer", "orgs": []}, False),  # not "all"
        ("/v1/keys", {"name": "x", "role": "viewer", "projects": ["no id"]}, False),
        ("/v1/orgs", {"name": None}, False),
        ("/v1/keys/verify", {"key": "gw_live_x"}, True),
        ("/v1/keys/verify", {"key": "gw_live_x", "org": None}, False),  # here null is refused
    ],
)
async def test_the_document_accepts_the_bodies_the_api_accepts(
    api: Api, world: World, path: str, body: dict[str, Any], accepted: bool
) -> None:
    """Before, the request schemas let every field be null (required ones and all of /v1/keys/verify's too)
    and let a key's orgs be an empty list: bodies the document called valid were answered 400."""
    me = await world.key(role="owner")
    op = api.doc.doc["paths"][path]["post"]
    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    valid = jsonschema_rs.Draft202012Validator({"$ref": ref, "components": api.doc.doc["components"]}).is_valid(body)
    r = await api.client.post(path, json=body, headers=auth(me))
    assert (valid, r.status != 400) == (accepted, accepted), await r.text()


# Found by the schemathesis run: each was a 500. An expiry past year 9999 in UTC (expires_at with a negative
# offset; expires_in beyond about 2.9 million days) raised OverflowError in key_expiry's datetime arithmetic
# or in asyncpg's encoding; a duration past timedelta's range (999999999w) raised it in parse_duration; a
# rotation's grace Postgres cannot add to now() (999999999d) was its "timestamp out of range". Durations
# are now at most 100 years, and an expiry is converted to UTC while it is parsed.


@pytest.mark.parametrize(
    "extra",
    [{"expires_at": "9999-12-31T23:59:59-14:00"}, {"expires_in": "3000000d"}, {"expires_in": "999999999w"}],
)
async def test_an_expiry_out_of_range_is_a_bad_request(api: Api, world: World, extra: dict[str, str]) -> None:
    me = await world.key(role="owner")
    await api("post", "/v1/keys", 400, me, json={"name": "x", "role": "viewer", **extra})


async def test_a_grace_out_of_range_is_a_bad_request(api: Api, world: World) -> None:
    me = await world.key(role="owner")
    old = await world.key(name="old", role="viewer")
    await api("post", "/v1/keys/{key_id}/rotate", 400, me, json={"grace": "999999999d"}, key_id=old["id"])


# --- schemathesis against a real `gateway serve` -------------------------------------------------

# The run makes some 1,500 calls with one key in one org within seconds: the shipped limits (600/min a key)
# would answer most of them 429, and check nothing else.
_LIMITS = """
rate_limits:
  key: {rate: 1000000/1m, burst: 1000000}
  org: {rate: 1000000/1m, burst: 1000000}
  failures_per_address: {rate: 1000000/1m, burst: 1000000}
  failures_per_key: {rate: 1000000/1m, burst: 1000000}
  failures_per_key_address: {rate: 1000000/1m, burst: 1000000}
"""


@dataclass
class Live:
    """A gateway serving on a port, an owner's key of an org there, and real ids to aim the calls at."""

    gateway: GatewayProcess
    key: str
    org: str
    ids: dict[str, list[str]]


@pytest.fixture
async def live(world: World, services: Services, tmp_path: Path) -> AsyncIterator[Live]:
    d = world.directory
    org = (await d.create_org("Fuzzed"))["id"]
    await d.set_member(org, world.user, "owner")
    caller = await world.key(name="caller", role="owner")
    member = (await d.create_user("member@example.com"))["id"]
    await d.set_member(org, member, "member")
    sa = await d.create_service_account(org, "ci", "member", CLI)
    project = await d.create_project(org, "web")
    invitations = Invitations(d)
    to_org = await invitations.invite(org, "guest@example.com", "viewer", CLI)
    elsewhere = (await d.create_org("Elsewhere"))["id"]
    to_me = await invitations.invite(elsewhere, "owner@example.com", "member", CLI)
    # Never the caller's own key, nor its owner: revoking, rotating or demoting them ends the run early.
    victims = [
        await world.key(name="spare", role="member", orgs=[org]),
        await world.key(name="member's", user=member, role="member", orgs=[org]),
        await world.key(name="service", user=sa["id"], role="member", orgs=[org]),
    ]
    ids = {
        "org": [org],
        "key_id": [k["id"] for k in victims],
        "user_id": [member],
        "invitation": [to_org["id"], to_me["id"]],
        "project": [project["id"]],
        "sa": [sa["id"]],
        "session_id": ["ses_0123456789abcdef01234567"],  # none of the caller's: 404
    }
    gateway = await start_gateway(services, tmp_path, "openapi", "--workers", "1", config_yaml=_LIMITS)
    try:
        yield Live(gateway, caller["key"], org, ids)
    finally:
        gateway.stop()


@pytest.fixture
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32's `from_fixture` reads and renames the test's `Node._nodeid`, which pytest 9.2 no
    longer has (AttributeError before any call is made): give it one to read. A no-op where it exists."""
    if not hasattr(request.node, "_nodeid"):
        request.node.__dict__["_nodeid"] = request.node.nodeid


@pytest.fixture
def api_schema(live: Live, _node_id_for_schemathesis: None) -> schemathesis.BaseSchema:
    """The document as the gateway serves it; every call made with the owner's key. Half the calls that
    name ids name real ones (else nearly every one would be a 404, and no success answer checked)."""
    config = schemathesis.Config.from_dict(
        {
            "base-url": live.gateway.url,
            "auth": {"openapi": {"bearer": {"bearer": live.key}}},
            "generation": {"max-examples": 25, "database": "none", "deterministic": True, "allow-x00": True},
            "checks": {
                "enabled": False,
                "not_a_server_error": {"enabled": True},
                "status_code_conformance": {"enabled": True},
                "content_type_conformance": {"enabled": True},
                "response_schema_conformance": {"enabled": True},
            },
        }
    )
    loaded = schemathesis.openapi.from_url(f"{live.gateway.url}/v1/openapi.json", config=config)

    def flatmap_path_parameters(
        context: schemathesis.HookContext, path_parameters: dict[str, Any] | None
    ) -> st.SearchStrategy[Any]:
        if not path_parameters:
            return st.just(path_parameters)
        real = st.fixed_dictionaries({name: st.sampled_from(live.ids[name]) for name in path_parameters})
        return st.one_of(st.just(path_parameters), real)

    def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
        operation = context.operation
        if operation is None or operation.path != "/v1/keys/verify" or not isinstance(body, dict):
            return st.just(body)
        return st.sampled_from([body, {**body, "key": live.key}, {"key": live.key, "org": live.org}])

    loaded.hook(flatmap_path_parameters)
    loaded.hook(flatmap_body)
    return loaded


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_the_gateway_answers_as_its_document_says(case: schemathesis.Case[Any]) -> None:
    """No 5xx, and every answer's status, content type and body as documented for its operation."""
    case.call_and_validate()
