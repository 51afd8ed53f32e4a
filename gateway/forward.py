"""Forward-auth endpoints: one per proxy, each reading only the headers that proxy sets.

A header one proxy sets is a header a client can forge behind another proxy, so `/auth/traefik` never
looks at `X-Original-URI` and `/auth/nginx` never looks at `X-Forwarded-Uri`.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Sequence
from urllib.parse import unquote, unquote_plus, urlsplit

from aiohttp import web
from multidict import CIMultiDictProxy

from gateway import constants as C
from gateway._answer import Answer, denial, header_block, unexpected
from gateway._paths import canonical
from gateway.audit import FailureAuditor, UsageAuditor
from gateway.authz import acting_org
from gateway.backends import outage
from gateway.config import PROXIES, Config
from gateway.errors import (
    AuthUnavailable,
    CsrfFailed,
    GatewayError,
    InvalidApiKey,
    InvalidRequest,
    MissingCredentials,
    RouteNotAllowed,
)
from gateway.health import Lifecycle
from gateway.keys import KeyFormat
from gateway.logs import DecisionLog, RequestIds
from gateway.metrics import Metrics
from gateway.models import IDENTITY_HEADERS, IP, KeyRecord
from gateway.policy import OriginalRequest, Policy, RouteDecision
from gateway.ratelimit import Decision
from gateway.sessions import SessionStore, check_origin, cookie_value
from gateway.tokens import looks_like_jwt
from gateway.tracing import Tracing
from gateway.verifier import Verifier

log = logging.getLogger("gateway.forward")

Headers = CIMultiDictProxy[str]

METHOD_OVERRIDE_HEADERS = ("X-HTTP-Method-Override", "X-Method-Override", "X-HTTP-Method")
CREDENTIAL_HEADERS = ("authorization", "x-api-key")
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


def one(headers: Headers, name: str) -> str:
    """The single value of a header the proxy must set: missing or repeated is invalid_request. (Its
    text is checked with the rest of the original request, see `Reader`.)"""
    values = headers.getall(name, [])
    if len(values) != 1:
        raise InvalidRequest(f"{name} must be sent exactly once")
    return values[0]


def _token(value: str, name: str) -> str:
    if not _TOKEN_RE.fullmatch(value):  # visible ASCII only, no space
        raise InvalidRequest(f"{name} is not valid")
    return value


def valid_method(value: str) -> str:
    if not _METHOD_RE.fullmatch(value):
        raise InvalidRequest("the original method is not valid")
    return value


def _host(value: str) -> str:
    if not _HOST_RE.fullmatch(value):
        raise InvalidRequest("the original host is not valid")
    return value.lower()


def uri_parts(value: str) -> tuple[str, str]:
    if not value.startswith("/") or value.startswith("//"):
        raise InvalidRequest("the original URI must be an absolute path")
    if "#" in value:
        # nginx passes $request_uri raw: what follows a `#` is dropped by Express, kept by others.
        raise InvalidRequest("the original URI has a #: some routers cut the path there, others keep it")
    path, _, query = value.partition("?")
    return path, query


# Each proxy describes the original request in its own headers. A reader is split in two: `texts` takes
# those headers from a request (each sent exactly once), `build` checks the texts and makes the
# OriginalRequest. A proxy sends the same few texts over and over, so ForwardAuth remembers what `build`
# made of them (see ForwardAuth.original).


def _nginx_texts(request: web.BaseRequest) -> tuple[str, ...]:
    h = request.headers
    return one(h, "X-Original-URI"), one(h, "X-Original-Method"), one(h, "Host")


def _nginx_build(uri: str, method: str, host: str) -> OriginalRequest:
    path, query = uri_parts(_token(uri, "X-Original-URI"))
    return OriginalRequest(valid_method(_token(method, "X-Original-Method")), _host(_token(host, "Host")), path, query)


def _ingress_nginx_texts(request: web.BaseRequest) -> tuple[str, ...]:
    h = request.headers
    return one(h, "X-Original-URL"), one(h, "X-Original-Method")


def _ingress_nginx_build(url: str, method: str) -> OriginalRequest:
    _token(url, "X-Original-URL")
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
    uri_parts(path)
    return OriginalRequest(valid_method(_token(method, "X-Original-Method")), _host(parts.netloc), path, parts.query)


def _traefik_texts(request: web.BaseRequest) -> tuple[str, ...]:
    h = request.headers
    return (
        one(h, "X-Forwarded-Proto"),
        one(h, "X-Forwarded-Uri"),
        one(h, "X-Forwarded-Method"),
        one(h, "X-Forwarded-Host"),
    )


def _traefik_build(proto: str, uri: str, method: str, host: str) -> OriginalRequest:
    if _token(proto, "X-Forwarded-Proto") not in ("http", "https"):
        raise InvalidRequest("X-Forwarded-Proto must be http or https")
    path, query = uri_parts(_token(uri, "X-Forwarded-Uri"))
    method, host = _token(method, "X-Forwarded-Method"), _token(host, "X-Forwarded-Host")
    return OriginalRequest(valid_method(method), _host(host), path, query)


def _caddy_texts(request: web.BaseRequest) -> tuple[str, ...]:
    h = request.headers
    return one(h, "X-Forwarded-Uri"), one(h, "X-Forwarded-Method"), one(h, "Host")


def _caddy_build(uri: str, method: str, host: str) -> OriginalRequest:
    path, query = uri_parts(_token(uri, "X-Forwarded-Uri"))
    return OriginalRequest(valid_method(_token(method, "X-Forwarded-Method")), _host(_token(host, "Host")), path, query)


ENVOY_PREFIX = "/auth/envoy"


def _envoy_texts(request: web.BaseRequest) -> tuple[str, ...]:
    """Envoy's HTTP ext_authz sends the original method, `path_prefix` + the original path and query
    (undecoded: read the raw path), and the original Host."""
    return request.raw_path, request.method, one(request.headers, "Host")


def _envoy_build(raw: str, method: str, host: str) -> OriginalRequest:
    if not raw.startswith(ENVOY_PREFIX + "/"):
        raise InvalidRequest("the original path is missing after /auth/envoy")
    path, query = uri_parts(raw[len(ENVOY_PREFIX) :])
    return OriginalRequest(valid_method(method), _host(_token(host, "Host")), path, query)


@dataclasses.dataclass(frozen=True)
class Reader:
    texts: Callable[[web.BaseRequest], tuple[str, ...]]
    build: Callable[..., OriginalRequest]


READERS: dict[str, Reader] = {
    "envoy": Reader(_envoy_texts, _envoy_build),
    "nginx": Reader(_nginx_texts, _nginx_build),
    "ingress-nginx": Reader(_ingress_nginx_texts, _ingress_nginx_build),
    "traefik": Reader(_traefik_texts, _traefik_build),
    "caddy": Reader(_caddy_texts, _caddy_build),
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


Client = tuple[IP | None, str | None]  # the client's address, and its text (for the audit)
_NO_CLIENT: Client = (None, None)


class Clients:
    """Who a request comes from: the peer, or, when the peer is a trusted proxy, the right-most untrusted
    X-Forwarded-For hop. The same few peers ask on every request: each address text is parsed once (a
    bounded memo; an unparsable text is None, untrusted)."""

    def __init__(self, trusted: Networks) -> None:
        self.trusted = trusted
        self._memo: dict[str, tuple[Client, bool]] = {}

    def address(self, text: str) -> tuple[Client, bool]:
        """The address with its canonical text, and whether it is a trusted proxy's."""
        found = self._memo.get(text)
        if found is None:
            try:
                addr = ipaddress.ip_address(text)
            except ValueError:
                found = (_NO_CLIENT, False)
            else:
                found = ((addr, str(addr)), any(addr in n for n in self.trusted))
            if len(self._memo) >= C.CLIENT_ADDRESS_MEMO:
                self._memo.clear()
            self._memo[text] = found
        return found

    def of(self, peer: str | None, h: Headers) -> Client:
        client, is_trusted = self.address(peer) if peer else (_NO_CLIENT, False)
        if not is_trusted:
            return client
        hops = [x.strip() for v in h.getall("X-Forwarded-For", []) for x in v.split(",")]
        for hop in reversed(hops):
            client, is_trusted = self.address(hop)
            if client[0] is None:
                raise InvalidRequest("X-Forwarded-For is not a list of addresses")
            if not is_trusted:
                break
        return client


def client_address(peer: str | None, h: Headers, trusted: Networks) -> IP | None:
    """`Clients.of` for one request (management calls: no memo)."""
    return Clients(trusted).of(peer, h)[0]


ENDPOINTS = (*PROXIES, "verify")  # each at /auth/<name>; envoy below


class _Trail:
    """What a decision learnt before it was refused, for the audit: the key (when it exists) and the org
    it acts in (so the org's own audit shows denials of keys that act in it)."""

    __slots__ = ("key_id", "method", "org", "route", "used")

    def __init__(self) -> None:
        self.key_id: str | None = None
        self.org: str | None = None
        self.used = False  # an API key allowed: counted in api_key.used
        self.method: str | None = None  # how the caller authenticated (api_key, jwt, session, anonymous)
        self.route: str | None = None  # the original request's method and canonical path, once checked


class ForwardAuth:
    """The proxy endpoints (`/auth/<proxy>`) and `POST /v1/keys/verify`, bound once at start-up to what a
    decision needs. `gateway serve` calls `handle` straight from the HTTP server for `/auth/*` (see
    `gateway._server`); the app's routes call it too, for the test client and unusual spellings."""

    def __init__(
        self,
        cfg: Config,
        fmt: KeyFormat,
        policy: Policy,
        verifier: Verifier,
        auditor: FailureAuditor,
        metrics: Metrics,
        trusted: Networks,
        lifecycle: Lifecycle,
        sessions: SessionStore,
        usage: UsageAuditor,
        request_ids: RequestIds,
        tracing: Tracing | None = None,
    ) -> None:
        self.tracing = tracing
        self.fmt = fmt
        self.request_ids = request_ids
        self.decisions = DecisionLog(cfg.log.decisions, log)
        self.usage = usage
        self.policy = policy
        self.verifier = verifier
        self.auditor = auditor
        self.metrics = metrics
        self.clients = Clients(trusted)
        self.lifecycle = lifecycle
        self.query_names = cfg.forward_auth.query_credential_params
        self.body_timeout_s = cfg.server.body_timeout_s
        self.sessions = sessions
        self.cookie = cfg.sessions.cookie
        self.allowed_origins = cfg.sessions.allowed_origins
        self.readers = {**READERS, "verify": READERS[cfg.forward_auth.proxy]}
        self.paths = {f"/auth/{name}": name for name in ENDPOINTS}
        # What each proxy's texts were found to describe: checked, canonical and key-free (a bounded memo),
        # and the paths found canonical and key-free, for the same path with another query or host.
        self._originals: dict[tuple[str, tuple[str, ...]], OriginalRequest] = {}
        self._good_paths: set[str] = set()

    def endpoint(self, target: str) -> str | None:
        """The endpoint a raw request target names exactly (`/auth/nginx?...`, `/auth/envoy/...`), or None."""
        path = target.partition("?")[0]
        if path.startswith(ENVOY_PREFIX + "/"):
            return "envoy"
        return self.paths.get(path)

    async def handle(self, request: web.BaseRequest, endpoint: str) -> web.StreamResponse:
        """One proxy's call: 200 with the identity headers, or the denial (never an exception)."""
        if self.tracing is None:
            return await self._handle(request, endpoint)
        with self.tracing.verify_span(endpoint, request.headers) as span:
            response = await self._handle(request, endpoint)
            span.set_attribute("http.response.status_code", response.status)
            return response

    async def _handle(self, request: web.BaseRequest, endpoint: str) -> Answer:
        started = time.perf_counter()
        client_ip, address = _NO_CLIENT
        trail = _Trail()
        peer = request.remote
        rid = self.request_ids.begin(
            request.headers.get("X-Request-Id"), peer is not None and self.clients.address(peer)[1]
        )
        try:
            client_ip, address = self.clients.of(peer, request.headers)
            original = self.original(request, endpoint)
            trail.route = f"{original.method} {original.path}"
            response = await self._decide(request, original, client_ip, trail)
            code = "ok"
            if trail.used and trail.key_id is not None:
                self.usage.record(trail.key_id, trail.org, address, original.method, original.path)
        except GatewayError as err:
            code = err.code
            # Only a caller whose secret verified learns that its key expired or was revoked: those
            # errors are raised after verification, so nothing to hide here. The key is named only when
            # it exists: made-up ids are counted per address, not a row each.
            self.auditor.record(code, trail.key_id, address, trail.org, endpoint)
            response = denial(err)
        except Exception as exc:
            if outage(exc):  # a store's outage that escaped its mapping: still an outage
                log.warning("%s on %s: answered 503", type(exc).__name__, endpoint)
                code = AuthUnavailable.code
                response = denial(AuthUnavailable())
            else:  # a bug: answered like the app's error middleware, never a traceback to the proxy
                bug = unexpected(request)
                code = bug.code
                response = denial(bug)
        if self.lifecycle.draining:  # ask the proxy to move its keep-alive connection to another replica
            response.force_close()  # says `Connection: close` too
        elapsed = time.perf_counter() - started
        self.metrics.decisions.inc(endpoint, code)
        self.metrics.latency.observe(endpoint, elapsed)
        if self.decisions.wanted(code == "ok"):
            self.decisions.write(
                code,
                {
                    "endpoint": endpoint,
                    "auth": trail.method,
                    "key_id": trail.key_id,
                    "org": trail.org,
                    "route": trail.route,
                    "client": address,
                    "latency_ms": round(elapsed * 1000, 3),
                },
            )
        return response.with_request_id(rid)

    async def _decide(
        self, request: web.BaseRequest, original: OriginalRequest, client_ip: IP | None, trail: _Trail
    ) -> Answer:
        """Everything a forward-auth answer depends on. Raises a GatewayError on denial."""
        fmt, h = self.fmt, request.headers
        refuse_tricks(h)
        refuse_query_keys(request.query_string, fmt, self.query_names)
        decision = self.policy.decide(original, h)
        if decision.auth == "deny":
            raise RouteNotAllowed("no rule allows this route")
        raw = credential(h)
        verifier = self.verifier
        if raw is None:
            record = await self._session(h, original.method, decision, client_ip, trail)
            if record is None:
                trail.method = "anonymous"
                spent = await verifier.charge_anonymous(client_ip)
                return _answer(_anonymous_head(decision.project), spent)
            if decision.org is None:  # the route names no org: the session's active one
                decision = dataclasses.replace(decision, org=trail.org)
            return await self._identify(record, decision, client_ip, trail)
        if looks_like_jwt(raw):
            trail.method = "jwt"
            return await self._identify(await verifier.token_record(raw, client_ip), decision, client_ip, trail)
        trail.method = "api_key"
        parsed = verifier.parse(raw)
        try:
            record = await verifier.authenticate(parsed, client_ip)
        except InvalidApiKey as err:
            if not err.unknown_key:
                trail.key_id = parsed.key_id  # a real key: named in the audit (a made-up id is not)
            raise
        trail.key_id = parsed.key_id
        return await self._identify(record, decision, client_ip, trail)

    async def _identify(
        self, record: KeyRecord, decision: RouteDecision, client_ip: IP | None, trail: _Trail
    ) -> Answer:
        verifier = self.verifier
        trail.method = record.method
        try:
            identity = await verifier.authorize(record, decision, client_ip)
        except GatewayError:
            trail.org = acting_org(record, decision, verifier.roles)
            raise
        trail.org = identity.org  # a refusal by a limit is shown in the org's audit too
        answer = _answer(identity.head, await verifier.charge(identity, identity.org))
        trail.used = record.method == "api_key"
        return answer

    async def _session(
        self, h: Headers, method: str, decision: RouteDecision, client_ip: IP | None, trail: _Trail
    ) -> KeyRecord | None:
        """The session the cookie names, as a record (its active org in `trail.org`); None: no cookie on a
        public route, or one that cannot identify there (ended, or from a page not allowed). On any other
        route those are refused: missing_credentials, or 403 csrf_failed."""
        public = decision.auth == "public"
        session_id = cookie_value(h.getall("Cookie", []), self.cookie) if "Cookie" in h else None
        if session_id is None:
            if public:
                return None
            raise MissingCredentials("send an API key as Authorization: Bearer <key> or X-API-Key, or sign in")
        trail.method = "session"
        try:
            check_origin(h, method, self.allowed_origins)
        except CsrfFailed:
            if public:
                return None
            raise
        session = await self.sessions.load(session_id)
        if session is None:
            if public:
                return None
            raise MissingCredentials("the session has ended: sign in again")
        trail.key_id = session.key_id
        trail.org = session.active_org
        return await self.verifier.session_principal(session, client_ip)

    def original(self, request: web.BaseRequest, endpoint: str) -> OriginalRequest:
        """The original request the proxy describes. Only a path every router reads alike is authorised
        (see _paths), and none carrying a key in its path or query: it would sit in every access log on
        its way (the proxy's, the upstream's)."""
        reader = self.readers[endpoint]
        texts = reader.texts(request)
        found = self._originals.get((endpoint, texts))
        if found is not None:
            return found
        found = reader.build(*texts)
        path = found.path
        if path not in self._good_paths:
            canonical(path)
            if self.fmt.key_marker.search(unquote(path, errors="replace")):
                raise InvalidRequest("API keys are not accepted in the path")
            _remember(self._good_paths, path)
        refuse_query_keys(found.query, self.fmt, self.query_names)
        if sum(map(len, texts)) <= C.MEMO_TEXT_MAX:  # a long URI is checked each time, not kept
            if len(self._originals) >= C.ORIGINALS_MEMO:
                self._originals.clear()
            self._originals[endpoint, texts] = found
        return found


def _remember(memo: set[str], text: str) -> None:
    """Add to a bounded memo: emptied when full, so a stream of distinct texts costs what it did without
    it. Long texts are not kept."""
    if len(text) > C.MEMO_TEXT_MAX:
        return
    if len(memo) >= C.ORIGINALS_MEMO:
        memo.clear()
    memo.add(text)


_NO_STORE = b"Cache-Control: no-store\r\n"


def _answer(identity: bytes, spent: Decision | None) -> Answer:
    """The 200 to a proxy: the identity headers, and where the limit stands (when one was charged)."""
    if spent is None:
        return Answer(200, identity + _NO_STORE)
    limits = b"RateLimit-Limit: %d\r\nRateLimit-Remaining: %d\r\nRateLimit-Reset: %d\r\n" % (
        spent.limit.burst,
        max(spent.remaining, 0),
        spent.reset_s,
    )
    return Answer(200, identity + limits + _NO_STORE)


@functools.lru_cache(maxsize=1024)
def _anonymous_head(project: str | None) -> bytes:
    return header_block(zip(IDENTITY_HEADERS, ("", "", "", "", "", project or "", "", "anonymous"), strict=True))
