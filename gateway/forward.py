"""Forward-auth endpoints: one per proxy, each reading only the headers that proxy sets.

A header one proxy sets is a header a client can forge behind another proxy, so `/auth/traefik` never
looks at `X-Original-URI` and `/auth/nginx` never looks at `X-Forwarded-Uri`.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import unquote, unquote_plus, urlsplit

from aiohttp import web
from aiohttp.helpers import ChainMapProxy
from multidict import CIMultiDict, CIMultiDictProxy

from gateway._body import json_object, read_raw
from gateway._paths import canonical
from gateway.authz import IP, Identity, acting_org
from gateway.errors import (
    GatewayError,
    InvalidApiKey,
    InvalidRequest,
    MissingCredentials,
    RouteNotAllowed,
)
from gateway.keys import KeyFormat, redact
from gateway.policy import ORG_HEADER, OriginalRequest, RouteDecision, checked_id
from gateway.ratelimit import Decision
from gateway.typedefs import (
    AUDIT_ORG,
    AUDITOR,
    CONFIG,
    KEY_FORMAT,
    KEY_ID,
    METRICS,
    POLICY,
    TRUSTED,
    VERIFIER,
)

log = logging.getLogger("gateway.forward")

Headers = CIMultiDictProxy[str]
# An app, or a sub-app's view of its parents' state (request.config_dict).
AppState = web.Application | ChainMapProxy

METHOD_OVERRIDE_HEADERS = ("X-HTTP-Method-Override", "X-Method-Override", "X-HTTP-Method")
CREDENTIAL_HEADERS = ("authorization", "x-api-key")
IDENTITY_HEADERS = (
    "X-Org",
    "X-Role",
    "X-User",
    "X-Key-Id",
    "X-Scopes",
    "X-Project",
    "X-Key-Env",
    "X-Auth-Method",
)
ALIASED_HEADERS = frozenset([*CREDENTIAL_HEADERS, *(h.lower() for h in IDENTITY_HEADERS), "x-org-id"])
# Headers that may not be named in `Connection:` (a hop-by-hop trick to strip them before us).
PROTECTED_HEADERS = frozenset(
    h.lower()
    for h in (
        *CREDENTIAL_HEADERS,
        *IDENTITY_HEADERS,
        "X-Org-Id",
        "X-Forwarded-For",
        "X-Original-Method",
        "X-Original-URI",
        "X-Original-URL",
        "X-Forwarded-Method",
        "X-Forwarded-Uri",
        "X-Forwarded-Host",
        "X-Forwarded-Proto",
        "Host",
    )
)
_METHOD_RE = re.compile(r"[A-Z]{1,20}")
# `_` too: names with underscores exist (and org ids have them), and nginx sends its catch-all server name
# `_` as the Host of an HTTP/1.0 request that had none. No host rule of a policy matches such a host.
_HOST_RE = re.compile(r"[A-Za-z0-9._\-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")
_QUERY_SEPARATORS = re.compile(r"[&;]")

Proxy = Literal["nginx", "ingress-nginx", "traefik", "caddy", "verify"]


def one(headers: Headers, name: str) -> str:
    """The single value of a header the proxy must set: missing or repeated is invalid_request."""
    values = headers.getall(name, [])
    if len(values) != 1:
        raise InvalidRequest(f"{name} must be sent exactly once")
    value = values[0]
    if not _TOKEN_RE.fullmatch(value):  # visible ASCII only, no space
        raise InvalidRequest(f"{name} is not valid")
    return value


def _method(value: str) -> str:
    if not _METHOD_RE.fullmatch(value):
        raise InvalidRequest("the original method is not valid")
    return value


def _host(value: str) -> str:
    if not _HOST_RE.fullmatch(value):
        raise InvalidRequest("the original host is not valid")
    return value.lower()


def _uri(value: str) -> tuple[str, str]:
    if not value.startswith("/") or value.startswith("//"):
        raise InvalidRequest("the original URI must be an absolute path")
    if "#" in value:
        # nginx passes $request_uri raw: what follows a `#` is dropped by Express, kept by others.
        raise InvalidRequest("the original URI has a #: some routers cut the path there, others keep it")
    path, _, query = value.partition("?")
    return path, query


def original_nginx(request: web.Request) -> OriginalRequest:
    h = request.headers
    path, query = _uri(one(h, "X-Original-URI"))
    return OriginalRequest(_method(one(h, "X-Original-Method")), _host(one(h, "Host")), path, query)


def original_ingress_nginx(request: web.Request) -> OriginalRequest:
    h = request.headers
    url = one(h, "X-Original-URL")
    if "#" in url:
        raise InvalidRequest("the original URI has a #: some routers cut the path there, others keep it")
    # The authority is the client's Host, as sent: `host:1?/path` must not split into a public `/` path.
    _host(url.partition("://")[2].partition("/")[0])
    try:
        parts = urlsplit(url)
    except ValueError:
        raise InvalidRequest("X-Original-URL is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidRequest("X-Original-URL must be an absolute http(s) URL")
    path = parts.path or "/"
    _uri(path)
    return OriginalRequest(_method(one(h, "X-Original-Method")), _host(parts.netloc), path, parts.query)


def original_traefik(request: web.Request) -> OriginalRequest:
    h = request.headers
    if one(h, "X-Forwarded-Proto") not in ("http", "https"):
        raise InvalidRequest("X-Forwarded-Proto must be http or https")
    path, query = _uri(one(h, "X-Forwarded-Uri"))
    return OriginalRequest(_method(one(h, "X-Forwarded-Method")), _host(one(h, "X-Forwarded-Host")), path, query)


def original_caddy(request: web.Request) -> OriginalRequest:
    h = request.headers
    path, query = _uri(one(h, "X-Forwarded-Uri"))
    return OriginalRequest(_method(one(h, "X-Forwarded-Method")), _host(one(h, "Host")), path, query)


ENVOY_PREFIX = "/auth/envoy"


def original_envoy(request: web.Request) -> OriginalRequest:
    """Envoy's HTTP ext_authz sends the original method, `path_prefix` + the original path and query
    (undecoded: read the raw path), and the original Host."""
    raw = request.raw_path
    if not raw.startswith(ENVOY_PREFIX + "/"):
        raise InvalidRequest("the original path is missing after /auth/envoy")
    path, query = _uri(raw[len(ENVOY_PREFIX) :])
    return OriginalRequest(_method(request.method), _host(one(request.headers, "Host")), path, query)


READERS: dict[str, Callable[[web.Request], OriginalRequest]] = {
    "envoy": original_envoy,
    "nginx": original_nginx,
    "ingress-nginx": original_ingress_nginx,
    "traefik": original_traefik,
    "caddy": original_caddy,
}


def refuse_tricks(h: Headers) -> None:
    """Headers that only serve to confuse a proxy or the upstream are refused outright."""
    for name in METHOD_OVERRIDE_HEADERS:
        if name in h:
            raise InvalidRequest(f"{name} is not accepted")
    for name in h:
        # Some upstream stacks (CGI, WSGI, PHP) read `X_Org` as `X-Org`: no alias gets past us. (Only a
        # name with `_` or `.` can be an alias; the others are skipped without folding.)
        if ("_" in name or "." in name) and name.lower().replace("_", "-").replace(".", "-") in ALIASED_HEADERS:
            raise InvalidRequest("underscore or dot aliases of credential or identity headers are not accepted")
    for value in h.getall("Connection", []):
        named = {t.strip().lower() for t in value.split(",")}
        if named & PROTECTED_HEADERS:
            raise InvalidRequest("Connection may not name credential or identity headers")


def credential(h: Headers) -> str | None:
    """The API key sent by the client, or None. Two credentials or a repeated header are refused."""
    bearer = h.getall("Authorization", [])
    keys = h.getall("X-API-Key", [])
    if len(bearer) > 1 or len(keys) > 1 or (bearer and keys):
        raise InvalidRequest("send exactly one credential")
    if keys:
        return keys[0].strip()
    if bearer:
        scheme, _, token = bearer[0].strip().partition(" ")
        if scheme.lower() != "bearer":
            raise InvalidRequest("Authorization must use the Bearer scheme")
        return token.strip()
    return None


def refuse_query_keys(query: str, fmt: KeyFormat, names: Sequence[str]) -> None:
    """Refuse a query carrying a credential, whatever separates its parameters (`&`, `;` for some
    frameworks, or nothing we know of): any key-shaped text in it counts, decoded or not."""
    if not query:
        return
    decoded = unquote_plus(query, errors="replace")
    if fmt.key_marker.search(query) or fmt.key_marker.search(decoded):
        raise InvalidRequest("API keys are not accepted in the query string")
    for part in _QUERY_SEPARATORS.split(decoded):
        name = part.partition("=")[0].strip().lower()
        if name in names:
            raise InvalidRequest("API keys are not accepted in the query string")


Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


@functools.lru_cache(maxsize=4096)
def _address(text: str, trusted: Networks) -> tuple[IP | None, bool]:
    """An address and whether it is a trusted proxy's. Pure, and asked for the same few peers on every
    request: parsed once (a bounded memo; an unparsable text is None, untrusted)."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None, False
    return addr, any(addr in n for n in trusted)


def client_address(peer: str | None, h: Headers, trusted: Networks) -> IP | None:
    """The peer, or, when the peer is a trusted proxy, the right-most untrusted X-Forwarded-For hop."""
    addr, is_trusted = _address(peer, trusted) if peer else (None, False)
    if not is_trusted:
        return addr
    hops = [x.strip() for v in h.getall("X-Forwarded-For", []) for x in v.split(",")]
    for hop in reversed(hops):
        hop_addr, is_trusted = _address(hop, trusted)
        if hop_addr is None:
            raise InvalidRequest("X-Forwarded-For is not a list of addresses")
        addr = hop_addr
        if not is_trusted:
            break
    return addr


@dataclass(slots=True)  # made per request: a frozen init costs a setattr per field
class Outcome:
    identity: Identity | None  # None: anonymous on a public route
    decision: RouteDecision
    ratelimit: Decision | None = None


async def check(request: web.Request, original: OriginalRequest, client_ip: IP | None) -> Outcome:
    """Everything a forward-auth answer depends on. Raises a GatewayError on denial."""
    app = request.app
    cfg = app[CONFIG]
    fmt = app[KEY_FORMAT]
    h = request.headers
    refuse_tricks(h)
    refuse_query_keys(original.query, fmt, cfg.forward_auth.query_credential_params)
    refuse_query_keys(request.query_string, fmt, cfg.forward_auth.query_credential_params)
    # The proxy forwards the raw target: only a path every router reads alike is authorised (see _paths).
    canonical(original.path)
    if fmt.key_marker.search(unquote(original.path, errors="replace")):
        # It would sit in every access log on its way (the proxy's, the upstream's).
        raise InvalidRequest("API keys are not accepted in the path")
    decision = app[POLICY].decide(original, h)
    if decision.auth == "deny":
        raise RouteNotAllowed("no rule allows this route")
    raw = credential(h)
    verifier = app[VERIFIER]
    if raw is None:
        if decision.auth == "public":
            return Outcome(None, decision, await verifier.charge_anonymous(client_ip))
        raise MissingCredentials("send an API key as Authorization: Bearer <key> or X-API-Key")
    parsed = verifier.parse(raw)
    try:
        record = await verifier.authenticate(parsed, client_ip)
    except InvalidApiKey as err:
        if not err.unknown_key:
            request[KEY_ID] = parsed.key_id  # a real key: named in the audit (a made-up id is not)
        raise
    request[KEY_ID] = parsed.key_id
    try:
        identity = await verifier.authorize(record, decision, client_ip)
    except GatewayError:
        org = acting_org(record, decision, cfg.roles)
        if org is not None:
            request[AUDIT_ORG] = org  # the org's own audit shows denials of keys that act in it
        raise
    request[AUDIT_ORG] = identity.org  # a refusal by a limit is shown in the org's audit too
    return Outcome(identity, decision, await verifier.charge(identity, identity.org))


def identity_headers(outcome: Outcome) -> dict[str, str]:
    i = outcome.identity
    if i is None:
        return {
            "X-Org": "",
            "X-Role": "",
            "X-User": "",
            "X-Key-Id": "",
            "X-Scopes": "",
            "X-Project": outcome.decision.project or "",
            "X-Key-Env": "",
            "X-Auth-Method": "anonymous",
        }
    return {
        "X-Org": i.org,
        "X-Role": i.role,
        "X-User": i.user_id,
        "X-Key-Id": i.key_id,
        "X-Scopes": ",".join(i.scopes),
        "X-Project": i.project or "",
        "X-Key-Env": i.env,
        "X-Auth-Method": "api_key",
    }


JSON = "application/json"


@functools.lru_cache(maxsize=1024)
def _error_body(code: str, message: str, field: str | None) -> str:
    """The JSON body of a denial: the same few for every junk key, so made once each (a bounded memo)."""
    # A message may quote the caller's input (a field name, an id): nothing key-shaped is echoed back.
    body: dict[str, str] = {"code": code, "message": redact(message)}
    if field is not None:
        body["field"] = redact(field)
    return json.dumps({"error": body})


def error_response(err: GatewayError, *, to_proxy: bool = False) -> web.Response:
    """The contract's JSON denial. To a proxy a 400 is a 401: nginx's auth_request and Traefik only
    deny on 401/403, and would turn a 400 into a 500 or pass it through as if it were the upstream's."""
    status = 401 if to_proxy and err.status == 400 else err.status
    headers = {**err.headers, "X-Auth-Error": err.code, "Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = f'Bearer error="{err.code}"'
    response = web.Response(
        text=_error_body(err.code, err.message, err.field), status=status, headers=headers, content_type=JSON
    )
    if headers.get("Connection") == "close":
        response.force_close()
    return response


def forward_handler(proxy: str) -> Callable[[web.Request], object]:
    async def handle(request: web.Request) -> web.StreamResponse:
        app = request.app
        name = app[CONFIG].forward_auth.proxy if proxy == "verify" else proxy
        endpoint = proxy
        started = time.perf_counter()
        client_ip: IP | None = None
        try:
            client_ip = client_address(request.remote, request.headers, app[TRUSTED])
            original = READERS[name](request)
            outcome = await check(request, original, client_ip)
        except GatewayError as err:
            code = err.code
            # Only a caller whose secret verified learns that its key expired or was revoked:
            # those errors are raised after verification, so nothing to hide here.
            # Named only when the key exists (see identify): made-up ids are counted per address, not a row each.
            address = str(client_ip) if client_ip else None
            app[AUDITOR].record(code, request.get(KEY_ID), address, request.get(AUDIT_ORG), endpoint)
            response = error_response(err, to_proxy=True)
            log.info("denied %s %s key=%s from %s", endpoint, code, request.get(KEY_ID, "-"), address or "-")
        else:
            code = "ok"
            rl = outcome.ratelimit.headers() if outcome.ratelimit is not None else {}
            response = web.Response(
                status=200, headers={**identity_headers(outcome), **rl, "Cache-Control": "no-store"}
            )
        metrics = app[METRICS]
        metrics.decisions.inc(endpoint, code)
        metrics.latency.observe(endpoint, time.perf_counter() - started)
        return response

    return handle


# --- POST /v1/keys/verify ----------------------------------------------------------------------

_VERIFY_FIELDS = {"key", "org", "permission", "method", "path"}


def _verify_body(raw: bytes) -> dict[str, str]:
    body = json_object(raw)
    unknown = sorted(set(body) - _VERIFY_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]}", field=unknown[0])
    for name in _VERIFY_FIELDS:
        if name in body and not isinstance(body[name], str):
            raise InvalidRequest(f"{name} must be a string", field=name)
    if "key" not in body:
        raise InvalidRequest("key is required", field="key")
    return body


def _verify_route(app: web.Application, body: dict[str, str]) -> RouteDecision:
    """With `path` (and `method`), the route policy decides as it would for a proxy."""
    org = checked_id(body["org"], "org") if "org" in body else None
    if "path" not in body:
        return RouteDecision(org=org)
    path, query = _uri(body["path"])
    original = OriginalRequest(_method(body.get("method", "GET")), "", canonical(path), query)
    headers = CIMultiDictProxy(CIMultiDict({ORG_HEADER: org} if org else {}))
    decision = app[POLICY].decide(original, headers)
    return dataclasses.replace(decision, org=decision.org or org)


async def keys_verify(request: web.Request) -> web.Response:
    """In-process verification for services: 200 with the verdict in the body (400 for a malformed
    body, 503 for an outage)."""
    app = request.app
    body = _verify_body(await read_raw(request, app[CONFIG].server.body_timeout_s))
    decision = _verify_route(app, body)
    result: dict[str, object] = {
        "valid": False,
        "code": "",
        "key_id": None,
        "org": None,
        "role": None,
        "scopes": [],
        "env": None,
        "expires_at": None,
        "ratelimit": None,
    }
    try:
        if decision.auth == "deny":
            raise RouteNotAllowed("no rule allows this route")
        verifier = app[VERIFIER]
        parsed = verifier.parse(body["key"])
        result["key_id"] = parsed.key_id
        # The key's own client is not known here: an allowlisted key is refused (client None). Failures
        # count against the calling service's address, never against a budget shared by every caller.
        caller = client_address(request.remote, request.headers, app[TRUSTED])
        record = await verifier.authenticate(parsed, caller)
        identity = await verifier.authorize(record, decision, None, body.get("permission"))
        ratelimit = await verifier.charge(identity, identity.org)
    except GatewayError as err:
        if err.status == 503:
            raise
        result["code"] = err.code.upper()
        return web.json_response(result)
    result.update(
        valid=True,
        code="VALID",
        org=identity.org,
        role=identity.role,
        scopes=list(identity.scopes),
        env=identity.env,
        expires_at=_iso(identity.expires_at),
        ratelimit=None
        if ratelimit is None
        else {"limit": ratelimit.limit.burst, "remaining": ratelimit.remaining, "reset": ratelimit.reset_s},
    )
    return web.json_response(result)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
