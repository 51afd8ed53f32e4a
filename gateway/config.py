"""Typed configuration loaded from YAML, validated once at start-up.

Every error names the offending field (`cache.local_ttl_s: expected a number`). Secrets (the pepper,
passwords inside URLs) are wrapped in `Secret` so they never show up in a repr or a log line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from gateway import constants as C
from gateway.errors import ConfigError, InvalidRequest
from gateway.formats import UNIT_S

# Proxies whose headers /auth/verify can read (Envoy has its own path-based endpoint).
PROXIES = ("nginx", "ingress-nginx", "traefik", "caddy")
DEFAULT_CONFIG_PATH = "config/gateway.yaml"


class Secret:
    """A string that does not print itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class WorkerCount(int):
    """A number of worker processes, written as a whole number or `auto`."""

    @classmethod
    def parse(cls, value: object) -> WorkerCount:
        if value == "auto":
            return cls(cores())
        return cls(int(value))  # type: ignore[call-overload]


CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def cores(cpu_max: Path = CPU_MAX) -> int:
    """The cores this process may use: its CPU affinity (`taskset`, a cpuset), capped by its cgroup's CPU
    limit rounded up (a container's `limits.cpu`: the affinity mask counts every core of the node)."""
    n = len(os.sched_getaffinity(0)) or 1
    try:
        quota, period = cpu_max.read_text().split()
        limit = math.ceil(int(quota) / int(period))
    except (OSError, ValueError, ZeroDivisionError):  # no cgroup v2 limit ("max"), or none readable
        return n
    return max(1, min(n, limit))


class ThreadCount(int):
    """argon2 threads per worker process, written as a whole number or `auto` (held as 0): the process's
    share of the cores, `cores() // (workers * parallelism)` (each hash keeps `parallelism` lanes busy),
    at least 1."""

    @classmethod
    def parse(cls, value: object) -> ThreadCount:
        return cls(0) if value == "auto" else cls(int(value))  # type: ignore[call-overload]

    def per_process(self, workers: int, parallelism: int = 1) -> int:
        return int(self) if self else max(1, cores() // max(workers * parallelism, 1))


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # Processes sharing the port (SO_REUSEPORT); `auto`: one per core this process may run on.
    workers: WorkerCount = field(default_factory=lambda: WorkerCount(1))
    # After SIGTERM: /readyz answers 503 and requests are still served this long, so the proxy or
    # Kubernetes stops routing here before the listener closes. SIGINT stops at once.
    drain_s: float = C.DEFAULT_DRAIN_S
    # A client trickling a request holds a connection: the head must arrive within header_timeout_s of its
    # first byte (else the connection is closed), a JSON body within body_timeout_s (else 408).
    header_timeout_s: float = C.DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = C.DEFAULT_BODY_TIMEOUT_S


@dataclass(frozen=True)
class DatabaseConfig:
    url: Secret = field(default_factory=lambda: Secret(""))
    pool_min: int = 1
    pool_max: int = 10
    timeout_ms: int = C.DEFAULT_DB_TIMEOUT_MS
    # The bound on one management call's database work (see constants); timeout_ms bounds each lookup.
    management_timeout_ms: int = C.DEFAULT_MANAGEMENT_TIMEOUT_MS
    connect_retries: int = 5
    # A streaming replica (hot standby) of `url`: the hot path's reads on cache misses (keys, memberships,
    # projects) go there while it has replayed every change this process was told of; writes, LISTEN and
    # everything else stay on `url`. Empty: everything on `url`. See gateway/store.py.
    replica_url: Secret = field(default_factory=lambda: Secret(""))


@dataclass(frozen=True)
class SentinelConfig:
    master: str = ""  # the name the sentinels monitor the master by (`sentinel monitor <master> ...`)
    addresses: tuple[str, ...] = ()  # host:port of each sentinel
    password: Secret = field(default_factory=lambda: Secret(""))  # the sentinels' own, if they require one


@dataclass(frozen=True)
class ClusterConfig:
    addresses: tuple[str, ...] = ()  # host:port of some of the cluster's nodes; the rest are discovered


@dataclass(frozen=True)
class RedisConfig:
    # One of three modes: `url` (one server), `sentinel` (the master that Sentinel names, followed through
    # failovers) or `cluster` (Redis Cluster).
    url: Secret = field(default_factory=lambda: Secret(""))
    sentinel: SentinelConfig = field(default_factory=SentinelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # The data nodes' credentials and TLS in the sentinel and cluster modes (a `url` carries its own).
    username: str = ""
    password: Secret = field(default_factory=lambda: Secret(""))
    tls: bool = False
    timeout_ms: int = C.DEFAULT_REDIS_TIMEOUT_MS
    # Connections per process; past it a call waits up to timeout_ms for a free one, then falls back.
    max_connections: int = C.DEFAULT_REDIS_MAX_CONNECTIONS


@dataclass(frozen=True)
class Argon2Config:
    memory_kib: int = 19456
    time_cost: int = 2
    parallelism: int = 1


@dataclass(frozen=True)
class KeysConfig:
    prefix: str = "gw"
    argon2: Argon2Config = field(default_factory=Argon2Config)
    # argon2 threads per worker process. More than the process's share of the cores adds no throughput,
    # only preemptions of the event loop (see SecretHasher): `auto` is that share.
    verify_threads: ThreadCount = field(default_factory=lambda: ThreadCount(0))
    # Verifications that may wait for a free thread; past it a request is refused with 503 at once.
    verify_queue: int = C.DEFAULT_VERIFY_QUEUE


@dataclass(frozen=True)
class CacheConfig:
    local_max_entries: int = C.DEFAULT_LOCAL_MAX_ENTRIES
    local_ttl_s: float = C.DEFAULT_LOCAL_TTL_S
    redis_ttl_s: float = C.DEFAULT_REDIS_TTL_S
    negative_ttl_s: float = C.DEFAULT_NEGATIVE_TTL_S
    # How long a cached key keeps working past its TTL while Postgres is unreachable.
    stale_if_error_s: float = C.DEFAULT_STALE_IF_ERROR_S


@dataclass(frozen=True)
class ForwardAuthConfig:
    # The proxy `/auth/verify` reads its headers for.
    proxy: str = "nginx"
    trusted_proxies: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
    # Query parameters that carry credentials: refused in the original URI, as is any parameter whose
    # value looks like one of our keys. Generic names (`key`, `token`) are left to the upstream.
    query_credential_params: tuple[str, ...] = ("api_key", "apikey", "api-key", "x-api-key", "access_token")


@dataclass(frozen=True)
class AuditConfig:
    flush_interval_s: float = C.DEFAULT_AUDIT_FLUSH_S
    # auth.failed rows written per flush; the rest are counted as dropped, never queued without bound.
    failed_max_per_flush: int = C.DEFAULT_AUDIT_FAILED_MAX_PER_FLUSH


@dataclass(frozen=True)
class LimitConfig:
    rate: str = "60/1m"  # N/PERIOD: the sustained rate
    burst: int = 20  # how many may arrive at once
    on_redis_error: str = "local"  # local (in-process GCRA) | open | closed
    exact: bool = False  # one Redis round trip per request, no leases (see gateway/leases.py)


@dataclass(frozen=True)
class RateLimitsConfig:
    enabled: bool = True
    # Send the decisions of all requests in one event-loop tick as one Redis round trip.
    pipeline: bool = True
    anonymous: LimitConfig = field(default_factory=lambda: LimitConfig("60/1m", 20))  # per client address
    key: LimitConfig = field(default_factory=lambda: LimitConfig("600/1m", 100))  # per key (or its override)
    org: LimitConfig = field(default_factory=lambda: LimitConfig("3000/1m", 500))  # shared by an org's keys
    # Failed verifications (unknown key, wrong secret), per client address; argon2 runs per key id.
    failures_per_address: LimitConfig = field(default_factory=lambda: LimitConfig("30/1m", 10))
    failures_per_key: LimitConfig = field(default_factory=lambda: LimitConfig("30/1m", 10))
    # Once a key id's budget is spent: argon2 runs per (key id, client address), so the key's holder at
    # an address it has not verified from yet is not locked out by a flood of guesses from elsewhere.
    failures_per_key_address: LimitConfig = field(default_factory=lambda: LimitConfig("3/1h", 3))
    # Web-page sign-ins per client address (each also spends one request of the key's own limit).
    sign_in: LimitConfig = field(default_factory=lambda: LimitConfig("10/1m", 5))


@dataclass(frozen=True)
class SessionsConfig:
    """Browser sessions (the web page's, and those issued by POST /v1/sessions), kept in Redis."""

    cookie: str = "gw_session"  # the cookie's name, on /ui/, /v1/ and every /auth/* endpoint
    idle_ttl_s: float = 2 * 3600  # a session unused this long ends
    absolute_ttl_s: float = 8 * 3600  # and every session ends this long after it began, however busy
    # Origins (`https://app.example.com`) whose pages may send a cookie-only request with an unsafe method
    # through forward auth; `Sec-Fetch-Site: same-origin` is accepted too. Anything else: 403 csrf_failed.
    allowed_origins: tuple[str, ...] = ()
    touch_interval_s: float = 60  # last-seen (and the idle deadline) is refreshed at most this often
    # Open sessions per user: one more ends the oldest.
    max_per_user: int = 10


@dataclass(frozen=True)
class TokensConfig:
    """JWT access tokens and their refresh tokens (see gateway.tokens)."""

    issuer: str = "gateway"  # `iss`
    audience: str = "gateway"  # `aud`
    algorithm: str = "EdDSA"  # of new signing keys: EdDSA (Ed25519) or ES256
    access_ttl_s: float = 900  # default lifetime of an access token; at most one hour
    refresh_ttl_s: float = 30 * 86400  # a refresh family ends this long after it began
    refresh_idle_s: float = 7 * 86400  # or when no refresh came for this long
    reuse_grace_s: float = 10  # the previous refresh token still works this long after a rotation (a retry)
    leeway_s: float = 10  # clock skew allowed on `exp` and `nbf`
    # Encrypts signing keys' private parts in Postgres; set GATEWAY_SIGNING_SECRET instead. Without it this
    # process verifies tokens (public keys suffice) but issues and refreshes none.
    signing_secret: Secret = field(default_factory=lambda: Secret(""))


@dataclass(frozen=True)
class RolesConfig:
    order: tuple[str, ...] = ("viewer", "member", "admin", "owner")
    permissions: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "viewer": ("*:read",),
            "member": ("*:read", "*:write"),
            "admin": ("*",),
            "owner": ("*",),
        }
    )

    # The least role that administers an org: sees all of its keys, members, invitations, projects,
    # service accounts and audit, and changes them (within what its permissions grant).
    admin: str = "admin"

    def rank(self, role: str) -> int:
        return self.order.index(role)

    def administers(self, role: str) -> bool:
        return self.rank(role) >= self.rank(self.admin)

    def named(self, role: str) -> str:
        """`role`, if this gateway knows it; else InvalidRequest naming the field."""
        if role not in self.order:
            raise InvalidRequest(f"role must be one of {', '.join(self.order)}", field="role")
        return role

    def lower(self, a: str, b: str) -> str:
        return a if self.rank(a) <= self.rank(b) else b


@dataclass(frozen=True)
class DecisionLogConfig:
    """One line per forward-auth decision: outcome, code, key, org, route, latency (never key material)."""

    level: str = "INFO"  # DEBUG, INFO or WARNING; OFF for none
    # The share of allowed decisions logged (0 to 1). A line for each halves a cached decision's rate
    # (make bench, row 2: 0.60x the bare responder without, 0.32x with) and the proxy logs every request
    # already: 1 % by default. Denials are all logged.
    sample_allowed: float = 0.01
    sample_denied: float = 1.0  # the share of denials logged


@dataclass(frozen=True)
class TracingConfig:
    # OpenTelemetry spans over OTLP/HTTP; needs the `tracing` extra (pip install 'gateway[tracing]').
    enabled: bool = False
    endpoint: str = "http://127.0.0.1:4318/v1/traces"  # the collector's OTLP/HTTP traces URL
    service_name: str = "gateway"
    sample_ratio: float = 1.0  # of traces started here; a proxy's sampled traceparent is followed


@dataclass(frozen=True)
class MetricsConfig:
    # 0: /metrics on the public port. Else /metrics only here (and 404 on the public port), on
    # `host` (default server.host): keep it off the network the proxies and clients reach.
    port: int = 0
    host: str = ""


@dataclass(frozen=True)
class LogConfig:
    # json, text, or auto: JSON lines unless stderr is a terminal (so JSON under a supervisor or in a pod).
    format: str = "auto"
    # One line per request (client, method, path, status, time). Off by default: the proxy in front logs
    # every request already; the decision lines say what the gateway decided and why.
    access: bool = False
    decisions: DecisionLogConfig = field(default_factory=DecisionLogConfig)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    pepper: Secret = field(default_factory=lambda: Secret(""))
    keys: KeysConfig = field(default_factory=KeysConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    forward_auth: ForwardAuthConfig = field(default_factory=ForwardAuthConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    rate_limits: RateLimitsConfig = field(default_factory=RateLimitsConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    # Route policy YAML; relative to the config file. Empty: every route needs a valid key, org from X-Org-Id.
    policy_file: str = ""
    last_used_flush_s: float = C.DEFAULT_LAST_USED_FLUSH_S
    log_level: str = "INFO"
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)

    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.forward_auth.trusted_proxies)


# --- loading -------------------------------------------------------------------------------------


# Scalar field types: (accepts, what the error calls it, converter).
_SCALARS: dict[Any, tuple[Any, str, Any]] = {
    Secret: (lambda v: isinstance(v, str), "a string", Secret),
    bool: (lambda v: isinstance(v, bool), "true or false", bool),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number", int),
    float: (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number", float),
    str: (lambda v: isinstance(v, str), "a string", str),
    WorkerCount: (
        lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool)),
        "a whole number or auto",
        WorkerCount.parse,
    ),
    ThreadCount: (
        lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
        "a whole number of at least 1, or auto",
        ThreadCount.parse,
    ),
}


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build(tp, value, where)
    if tp in _SCALARS:
        accepts, what, conv = _SCALARS[tp]
        if not accepts(value):
            raise ConfigError(f"{where}: expected {what}")
        return conv(value)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        k_tp, v_tp = typing.get_args(tp)
        return {_convert(k, k_tp, where): _convert(v, v_tp, f"{where}.{k}") for k, v in value.items()}
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # pragma: no cover - no such fields


def _build(cls: type[Any], data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    def check(ok: bool, where: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{where}: {why}")

    check(0 < cfg.server.port < 65536, "server.port", "must be between 1 and 65535")
    check(cfg.server.workers >= 1, "server.workers", "must be at least 1")
    check(0 <= cfg.server.drain_s <= 600, "server.drain_s", "must be between 0 and 600 seconds")
    check(0 < cfg.server.header_timeout_s <= 300, "server.header_timeout_s", "must be above 0 and at most 300 seconds")
    check(0 < cfg.server.body_timeout_s <= 300, "server.body_timeout_s", "must be above 0 and at most 300 seconds")
    check(bool(cfg.database.url.get()), "database.url", "is required (or set GATEWAY_DATABASE_URL)")
    check(
        0 < cfg.database.management_timeout_ms <= 600_000,
        "database.management_timeout_ms",
        "must be above 0 and at most 600000 (10 minutes)",
    )
    check(
        cfg.database.url.get().startswith(("postgres://", "postgresql://")),
        "database.url",
        "must be a postgresql:// URL",
    )
    check(1 <= cfg.database.pool_min <= cfg.database.pool_max, "database.pool_min", "must be 1..pool_max")
    check(cfg.database.timeout_ms > 0, "database.timeout_ms", "must be positive")
    _validate_redis(cfg.redis)
    if cfg.database.replica_url.get():
        check(
            cfg.database.replica_url.get().startswith(("postgres://", "postgresql://")),
            "database.replica_url",
            "must be a postgresql:// URL",
        )
    check(cfg.redis.timeout_ms > 0, "redis.timeout_ms", "must be positive")
    check(cfg.redis.max_connections >= 1, "redis.max_connections", "must be at least 1")
    check(len(cfg.pepper.get()) >= 32, "pepper", "must be at least 32 characters (or set GATEWAY_PEPPER)")
    prefix = cfg.keys.prefix
    check(
        prefix.isascii() and prefix.isalnum() and 1 <= len(prefix) <= 16,
        "keys.prefix",
        "must be 1-16 ASCII letters or digits",
    )
    a = cfg.keys.argon2
    check(a.memory_kib >= 8 * a.parallelism, "keys.argon2.memory_kib", "too small for the parallelism")
    check(a.time_cost >= 1, "keys.argon2.time_cost", "must be at least 1")
    check(a.parallelism >= 1, "keys.argon2.parallelism", "must be at least 1")
    check(cfg.keys.verify_queue >= 0, "keys.verify_queue", "must not be negative")
    for name in ("local_ttl_s", "redis_ttl_s", "negative_ttl_s", "stale_if_error_s"):
        check(getattr(cfg.cache, name) >= 0, f"cache.{name}", "must not be negative")
    check(cfg.cache.local_max_entries >= 1, "cache.local_max_entries", "must be at least 1")
    check(cfg.forward_auth.proxy in PROXIES, "forward_auth.proxy", f"must be one of {', '.join(PROXIES)}")
    for i, net in enumerate(cfg.forward_auth.trusted_proxies):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"forward_auth.trusted_proxies[{i}]: not an IP network: {net!r}") from None
    check(cfg.audit.flush_interval_s > 0, "audit.flush_interval_s", "must be positive")
    check(cfg.audit.failed_max_per_flush >= 0, "audit.failed_max_per_flush", "must not be negative")
    _validate_roles(cfg.roles)
    _validate_limits(cfg.rate_limits)
    check(cfg.last_used_flush_s > 0, "last_used_flush_s", "must be positive")
    _validate_sessions(cfg.sessions)
    _validate_tokens(cfg.tokens)
    check(
        cfg.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
        "log_level",
        "must be DEBUG, INFO, WARNING or ERROR",
    )
    check(cfg.log.format in ("auto", "json", "text"), "log.format", "must be auto, json or text")
    _validate_tracing(cfg.tracing)
    check(0 <= cfg.metrics.port < 65536, "metrics.port", "must be between 1 and 65535, or 0 (the public port)")
    check(
        cfg.metrics.port == 0 or cfg.metrics.port != cfg.server.port,
        "metrics.port",
        "must differ from server.port (0 serves /metrics on the public port)",
    )
    d = cfg.log.decisions
    check(
        d.level.upper() in ("DEBUG", "INFO", "WARNING", "OFF"),
        "log.decisions.level",
        "must be DEBUG, INFO, WARNING or OFF",
    )
    for name in ("sample_allowed", "sample_denied"):
        check(0 <= getattr(d, name) <= 1, f"log.decisions.{name}", "must be between 0 and 1")


def _validate_tracing(t: TracingConfig) -> None:
    if not 0 <= t.sample_ratio <= 1:
        raise ConfigError("tracing.sample_ratio: must be between 0 and 1")
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", t.endpoint):
        raise ConfigError("tracing.endpoint: must be an http(s) URL, such as http://collector:4318/v1/traces")
    if t.enabled and importlib.util.find_spec("opentelemetry.sdk") is None:
        raise ConfigError("tracing.enabled: needs the tracing extra: pip install 'gateway[tracing]'")


_RATE_RE = re.compile(r"([1-9][0-9]{0,8})/([1-9][0-9]{0,5})?(s|sec|second|m|min|minute|h|hour|d|day)")


def rate_of(text: str) -> tuple[int, int] | None:
    """`100/1m`, `10/s`, `5000/1h`, `5/min`, `100/hour` -> (count, period in ms); None if not a rate."""
    m = _RATE_RE.fullmatch(text.strip())
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2) or 1) * UNIT_S[m.group(3)[0]] * 1000


def _validate_limits(limits: RateLimitsConfig) -> None:
    for f in dataclasses.fields(limits):
        limit = getattr(limits, f.name)
        if not isinstance(limit, LimitConfig):
            continue
        where = f"rate_limits.{f.name}"
        if rate_of(limit.rate) is None:
            raise ConfigError(f"{where}.rate: expected N/PERIOD such as 60/1m or 10/s")
        if limit.burst < 1:
            raise ConfigError(f"{where}.burst: must be at least 1")
        if limit.on_redis_error not in ("local", "open", "closed"):
            raise ConfigError(f"{where}.on_redis_error: must be local, open or closed")


_COOKIE_NAME_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_ORIGIN_RE = re.compile(r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def _validate_sessions(s: SessionsConfig) -> None:
    if not _COOKIE_NAME_RE.fullmatch(s.cookie):
        raise ConfigError("sessions.cookie: must be 1-64 letters, digits, '_' or '-'")
    if not 60 <= s.absolute_ttl_s <= 30 * 86400:
        raise ConfigError("sessions.absolute_ttl_s: must be between 60 s and 30 days")
    if not 60 <= s.idle_ttl_s <= s.absolute_ttl_s:
        raise ConfigError("sessions.idle_ttl_s: must be at least 60 s and at most absolute_ttl_s")
    if not 1 <= s.touch_interval_s <= s.idle_ttl_s / 2:
        raise ConfigError("sessions.touch_interval_s: must be at least 1 s and at most half of idle_ttl_s")
    if not 1 <= s.max_per_user <= 1000:
        raise ConfigError("sessions.max_per_user: must be between 1 and 1000")
    for i, origin in enumerate(s.allowed_origins):
        if not _ORIGIN_RE.fullmatch(origin):
            raise ConfigError(f"sessions.allowed_origins[{i}]: must be scheme://host[:port], as browsers send Origin")


def _validate_tokens(t: TokensConfig) -> None:
    if t.algorithm not in ("EdDSA", "ES256"):
        raise ConfigError("tokens.algorithm: must be EdDSA or ES256")
    if not 60 <= t.access_ttl_s <= 3600:
        raise ConfigError("tokens.access_ttl_s: must be between 60 s and one hour")
    if not 60 <= t.refresh_idle_s <= t.refresh_ttl_s <= 365 * 86400:
        raise ConfigError("tokens.refresh_idle_s: must be at least 60 s and at most refresh_ttl_s (at most a year)")
    if not 0 <= t.reuse_grace_s <= 60:
        raise ConfigError("tokens.reuse_grace_s: must be between 0 and 60 seconds")
    if not 0 <= t.leeway_s <= 120:
        raise ConfigError("tokens.leeway_s: must be between 0 and 120 seconds")
    if not (t.issuer and t.audience):
        raise ConfigError("tokens.issuer: issuer and audience must not be empty")
    secret = t.signing_secret.get()
    if secret and len(secret) < 32:
        raise ConfigError("tokens.signing_secret: must be at least 32 characters (or set GATEWAY_SIGNING_SECRET)")


def _validate_roles(roles: RolesConfig) -> None:
    if not roles.order or len(set(roles.order)) != len(roles.order):
        raise ConfigError("roles.order: must list distinct role names")
    for role in roles.permissions:
        if role not in roles.order:
            raise ConfigError(f"roles.permissions.{role}: is not a role in roles.order")
    for role in roles.order:
        if role not in roles.permissions:
            raise ConfigError(f"roles.permissions.{role}: is missing")
    if roles.admin not in roles.order:
        raise ConfigError(
            f"roles.admin: {roles.admin!r} is not a role in roles.order (name the least role that administers an org)"
        )


def redis_mode(cfg: RedisConfig) -> str:
    """single, sentinel or cluster."""
    if cfg.cluster.addresses:
        return "cluster"
    return "sentinel" if cfg.sentinel.addresses or cfg.sentinel.master else "single"


def host_port(address: str, where: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port`, as the sentinel and cluster addresses are written."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: expected host:port, got {address!r}")
    return host, int(port)


def _validate_redis(cfg: RedisConfig) -> None:
    mode = redis_mode(cfg)
    if mode == "single":
        _validate_redis_url(cfg)
        return
    if cfg.url.get():
        raise ConfigError(f"redis.url: set either redis.url or redis.{mode}, not both (GATEWAY_REDIS_URL counts)")
    if mode == "cluster" and (cfg.sentinel.addresses or cfg.sentinel.master):
        raise ConfigError("redis.sentinel: set either redis.sentinel or redis.cluster, not both")
    if mode == "sentinel" and not cfg.sentinel.master:
        raise ConfigError("redis.sentinel.master: is required (the name the sentinels monitor)")
    if mode == "sentinel" and not cfg.sentinel.addresses:
        raise ConfigError("redis.sentinel.addresses: name at least one sentinel (host:port)")
    addresses = cfg.sentinel.addresses if mode == "sentinel" else cfg.cluster.addresses
    for i, address in enumerate(addresses):
        host_port(address, f"redis.{mode}.addresses[{i}]")


def _validate_redis_url(cfg: RedisConfig) -> None:
    if not cfg.url.get():
        raise ConfigError(
            "redis.url: is required (or set GATEWAY_REDIS_URL, or configure redis.sentinel or redis.cluster)"
        )
    if not cfg.url.get().startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("redis.url: must be a redis://, rediss:// or unix:// URL")
    extras = {"username": bool(cfg.username), "password": bool(cfg.password.get()), "tls": cfg.tls}
    for name, given in extras.items():
        if given:
            raise ConfigError(f"redis.{name}: only for redis.sentinel and redis.cluster (a redis.url carries its own)")


def config_from_mapping(data: Any, env: Mapping[str, str] | None = None) -> Config:
    """Build and validate a Config from parsed YAML, applying environment overrides."""
    env = os.environ if env is None else env
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config: the file must hold a mapping at the top level")
    cfg: Config = _build(Config, data, "")
    if env.get("GATEWAY_DATABASE_URL"):
        cfg = dataclasses.replace(
            cfg, database=dataclasses.replace(cfg.database, url=Secret(env["GATEWAY_DATABASE_URL"]))
        )
    if env.get("GATEWAY_REDIS_URL"):
        cfg = dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, url=Secret(env["GATEWAY_REDIS_URL"])))
    if env.get("GATEWAY_REDIS_PASSWORD"):
        cfg = dataclasses.replace(
            cfg, redis=dataclasses.replace(cfg.redis, password=Secret(env["GATEWAY_REDIS_PASSWORD"]))
        )
    if env.get("GATEWAY_DATABASE_REPLICA_URL"):
        replica = Secret(env["GATEWAY_DATABASE_REPLICA_URL"])
        cfg = dataclasses.replace(cfg, database=dataclasses.replace(cfg.database, replica_url=replica))
    if env.get("GATEWAY_PEPPER"):
        cfg = dataclasses.replace(cfg, pepper=Secret(env["GATEWAY_PEPPER"]))
    if env.get("GATEWAY_SIGNING_SECRET"):
        tokens = dataclasses.replace(cfg.tokens, signing_secret=Secret(env["GATEWAY_SIGNING_SECRET"]))
        cfg = dataclasses.replace(cfg, tokens=tokens)
    _validate(cfg)
    return cfg


def resolve_path(path: str | None, env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(path or env.get("GATEWAY_CONFIG") or DEFAULT_CONFIG_PATH)


def load_roles(path: str | None = None, env: Mapping[str, str] | None = None) -> RolesConfig:
    """Only the roles of the config file (defaults if there is none): enough to check a policy offline."""
    file = resolve_path(path, env)
    if not file.exists():
        return RolesConfig()
    data = read_yaml(file, "config file") or {}
    roles: RolesConfig = _build(RolesConfig, data.get("roles") if isinstance(data, dict) else None, "roles")
    _validate_roles(roles)
    return roles


def read_yaml(file: Path, what: str) -> Any:
    """The parsed YAML file; a missing, unreadable or malformed file is a ConfigError saying where."""
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {file}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {file}: {exc.__class__.__name__}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{file}: not valid YAML{where}") from None


def load_config(path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load the YAML file (`--config`, else $GATEWAY_CONFIG, else config/gateway.yaml). Without a file
    named and without the default one, the defaults and the environment make the whole config (a
    container given GATEWAY_DATABASE_URL, GATEWAY_REDIS_URL and GATEWAY_PEPPER needs no file)."""
    env = os.environ if env is None else env
    file = resolve_path(path, env)
    named = bool(path or env.get("GATEWAY_CONFIG"))
    data = read_yaml(file, "config file") if named or file.exists() else None
    cfg = config_from_mapping(data, env)
    if cfg.policy_file and not Path(cfg.policy_file).is_absolute():
        cfg = dataclasses.replace(cfg, policy_file=str(file.parent / cfg.policy_file))
    return cfg
