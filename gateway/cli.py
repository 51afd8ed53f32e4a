"""The `gateway` command line. Errors go to stderr with a non-zero exit and never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, NoReturn

from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger

from gateway import __version__
from gateway._server import GatewayRunner
from gateway.app import create_app, metrics_app, redis_client
from gateway.audit import CLI, AuditLog
from gateway.authz import pattern_matches
from gateway.backends import PG_ERRORS, REDIS_ERRORS, StoreUnavailable
from gateway.cache import RedisCache
from gateway.config import Config, RolesConfig, WorkerCount, load_config, load_roles, redact_url
from gateway.data.db import Database, connect_pool
from gateway.data.schema import migrate
from gateway.directory import Directory
from gateway.errors import ConfigError, GatewayError
from gateway.formats import PERMISSION_RE, iso, parse_iso
from gateway.grants import Grant, TokenService
from gateway.invitations import Invitations
from gateway.keyring import KeyQuery, Keyring, KeySpec, parse_duration
from gateway.keys import KeyFormat, SecretHasher, redact
from gateway.logs import logging_to_stderr
from gateway.policy import describe, load_policy
from gateway.signing import SigningKeys, SigningUnavailable
from gateway.signing import listing as signing_listing
from gateway.typedefs import CONFIG, HASHER, LIFECYCLE

log = logging.getLogger("gateway")

# After the drain, how long requests in flight may take to finish before they are cancelled.
SHUTDOWN_TIMEOUT_S: Final = 10.0


class CliError(Exception):
    """A failure to report on stderr as one line, with exit status `status`."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


class AccessLogger(AbstractAccessLogger):
    """Method, path (never the query string, and nothing key-shaped in the path), status and time."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %s %.1fms', request.remote, request.method, redact(request.path), response.status, time * 1000
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def _workers_arg(text: str) -> WorkerCount:
    try:
        return WorkerCount.parse(text if text == "auto" else int(text))
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number or auto") from None


_JSON = argparse.ArgumentParser(add_help=False)
# SUPPRESS: a subcommand's `--json` sets the flag; its absence leaves the one before the subcommand alone.
_JSON.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON instead of a table")


def _commands(sub: Any, name: str, help_: str) -> Any:
    """A command group such as `keys`, whose actions are its subcommands."""
    group = sub.add_parser(name, help=help_, description=help_)
    return group.add_subparsers(
        dest="action", required=True, parser_class=_Parser, metavar="ACTION", help="what to do (each has --help)"
    )


def _action(group: Any, name: str, help_: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = group.add_parser(name, help=help_, description=help_, parents=[_JSON])
    return parser


def build_parser(roles: Sequence[str] = RolesConfig().order) -> argparse.ArgumentParser:
    """The whole command line; `roles` (the config's `roles.order`) are the choices of every role option."""
    p = _Parser(prog="gateway", description="API-key authentication sidecar for reverse proxies")
    p.add_argument("--config", help="config file (else $GATEWAY_CONFIG, else config/gateway.yaml if it exists)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = p.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="COMMAND", help="what to work on (each has --help)"
    )
    role_help = f"one of {', '.join(roles)} (lowest first)"

    _action(sub, "migrate", "apply database migrations (idempotent; safe from several replicas at once)")
    serve = sub.add_parser("serve", help="serve the verify endpoints", description="serve the verify endpoints")
    serve.add_argument("--host", help="address to listen on (default server.host)")
    serve.add_argument("--port", type=int, help="port to listen on (default server.port)")
    serve.add_argument(
        "--workers", type=_workers_arg, help="processes sharing the port: a number, or auto (one per core)"
    )

    policy = _commands(sub, "policy", "route policy files")
    _action(policy, "check", "validate a route policy file without serving").add_argument(
        "file", help="the policy YAML file"
    )

    orgs = _commands(sub, "orgs", "organisations")
    _action(orgs, "create", "create an org").add_argument("name", help="its display name")
    _action(orgs, "list", "every org, with its member count")

    users = _commands(sub, "users", "people (by email) and service accounts")
    _action(users, "create", "create a person").add_argument("email", help="their email address")
    _action(users, "list", "every user, or the members of one org").add_argument("--org", help="only this org's")

    members = _commands(sub, "members", "who belongs to an org, with which role")
    ms = _action(members, "set", "add a user to an org or change their role")
    ms.add_argument("org_id", help="the org (see `orgs list`)")
    ms.add_argument("user_id", help="the user (see `users list`)")
    ms.add_argument("role", choices=roles, metavar="ROLE", help=role_help)
    mr = _action(members, "remove", "remove a user from an org (their keys stop acting there)")
    mr.add_argument("org_id", help="the org")
    mr.add_argument("user_id", help="the user")
    mi = _action(members, "invite", "invite a user by email: they join once they accept")
    mi.add_argument("org_id", help="the org")
    mi.add_argument("email", help="whom to invite")
    mi.add_argument("role", choices=roles, metavar="ROLE", help=role_help)
    _action(members, "list", "an org's members and their roles").add_argument("org_id", help="the org")

    invitations = _commands(sub, "invitations", "invitations to join an org")
    il = _action(invitations, "list", "open invitations of a user or an org")
    il_by = il.add_mutually_exclusive_group(required=True)
    il_by.add_argument("--user", help="the invited user's id")
    il_by.add_argument("--org", help="the inviting org's id")
    for name, what in (("accept", "accept an invitation for the invited user"),
                       ("decline", "decline an invitation for the invited user"),
                       ("withdraw", "withdraw an org's invitation")):  # fmt: skip
        _action(invitations, name, what).add_argument("invitation_id", help="the invitation (see `invitations list`)")

    projects = _commands(sub, "projects", "an org's projects (keys can be confined to some)")
    pc = _action(projects, "create", "create a project in an org")
    pc.add_argument("org_id", help="the org")
    pc.add_argument("name", help="its name, unique in the org")
    _action(projects, "list", "an org's projects").add_argument("org_id", help="the org")

    accounts = _commands(sub, "service-accounts", "non-human members of one org; their keys are the org's")
    sc = _action(accounts, "create", "create a service account in an org")
    sc.add_argument("org_id", help="the org")
    sc.add_argument("name", help="its name")
    sc.add_argument("--role", required=True, choices=roles, metavar="ROLE", help=role_help)
    _action(accounts, "list", "an org's service accounts").add_argument("org_id", help="the org")

    audit = _commands(sub, "audit", "the audit log")
    al = _action(audit, "list", "an org's audit events, newest first")
    al.add_argument("--org", required=True, help="the org")
    al.add_argument("--type", help="only this event type, such as api_key.revoked")
    al.add_argument("--key-id", help="only events of this key")
    al.add_argument("--actor", help="only events by this actor (a user id, or cli)")
    al.add_argument("--since", type=_iso_time, help="ISO 8601 time: events at or after it")
    al.add_argument("--until", type=_iso_time, help="ISO 8601 time: events before it")
    al.add_argument("--limit", type=_limit, default=100, help="at most this many, 1 to 1000 (default 100)")

    keys = _commands(sub, "keys", "API keys")
    kc = _action(keys, "create", "create a key; its raw value is printed once and never again")
    kc.add_argument("--user", required=True, help="the owner's user id (see `users list`)")
    kc.add_argument("--name", required=True, help="a name to know it by")
    kc.add_argument(
        "--role", required=True, choices=roles, metavar="ROLE", help=f"{role_help}; capped by the owner's membership"
    )
    kc.add_argument("--org", action="append", default=[], help="an org it may act in (repeatable; default: all)")
    kc.add_argument("--project", action="append", default=[], help="a project it may reach (repeatable; default: all)")
    kc.add_argument("--scope", action="append", help="a permission pattern such as calls:read (repeatable)")
    exp = kc.add_mutually_exclusive_group()
    exp.add_argument("--expires-in", help="a lifetime such as 30d, 12h or 2w (default: never expires)")
    exp.add_argument("--expires-at", help="an ISO 8601 time in the future")
    kc.add_argument("--env", choices=["live", "test"], default="live", help="live or test (default live)")
    kc.add_argument("--allow-ip", action="append", help="an address or CIDR it may be used from (repeatable)")
    kc.add_argument("--rate-limit", help="its own limit such as 100/1m, 10/s or 5/min (default rate_limits.key)")
    kl = _action(keys, "list", "keys, oldest first")
    kl.add_argument("--user", help="only this owner's")
    kl.add_argument("--org", help="only those that can act in this org")
    kl.add_argument("--status", choices=["active", "expired", "revoked"], help="only keys in this state")
    _action(keys, "show", "one key (never its secret)").add_argument("key_id", help="the key id")
    _action(keys, "revoke", "revoke a key at once, on every replica").add_argument("key_id", help="the key id")
    kr = _action(keys, "rotate", "a new key with the same settings; the old one ends after --grace")
    kr.add_argument("key_id", help="the key id")
    kr.add_argument("--grace", help="how long the old key keeps working, such as 1h (default: ends now)")

    tokens = _commands(sub, "tokens", "JWT access tokens")
    ti = _action(tokens, "issue", "an access token and refresh token for a member of an org")
    ti.add_argument("--user", required=True, help="the user id (a member of --org)")
    ti.add_argument("--org", required=True, help="the org id the token acts in")
    ti.add_argument(
        "--role", choices=roles, metavar="ROLE", help=f"{role_help}; at most the membership role (the default)"
    )
    ti.add_argument("--scope", action="append", help="a permission pattern (repeatable); default: all the role grants")
    ti.add_argument("--ttl", help="access token lifetime, 1m to 1h (default tokens.access_ttl_s)")
    signing = _commands(sub, "signing-keys", "the keys JWT access tokens are signed with")
    _action(signing, "list", "the JWT signing keys and their state (no private part)")
    _action(signing, "rotate", "next becomes current, current previous (kept until its tokens expire)")
    return p


def _limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError("must be a whole number from 1 to 1000")
    return int(text)


def _iso_time(text: str) -> datetime:
    try:
        return parse_iso(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None


# What a table shows of a listing, where every field would be too wide (--json prints them all).
_COLUMNS: Final[dict[tuple[str, str | None], tuple[str, ...]]] = {
    ("keys", "list"): ("id", "name", "user_id", "role", "env", "status", "orgs", "expires_at", "last_used_at"),
    ("audit", "list"): ("at", "type", "actor", "key_id", "user_id", "ip", "count", "detail"),
}
_CELL_MAX: Final = 40  # longer cells are cut, with an ellipsis (--json has them whole)
_TIME_FIELDS: Final = re.compile(r"(.+_at|at|retire_after|expires)")


def _table(data: Any, columns: Sequence[str] | None = None) -> str:
    """A listing as aligned columns, or one object as `field  value` lines; times in the local zone."""
    if isinstance(data, dict):
        width = max((len(k) for k in data), default=0)
        return "\n".join(f"{k.ljust(width)}  {_cell(k, v, cut=False)}" for k, v in data.items()) or "(none)"
    if not data:
        return "(none)"
    cols = list(columns or data[0])
    cells = [[_cell(c, r.get(c)) for c in cols] for r in data]
    heads = [c.removesuffix("_at").replace("_", " ").upper() for c in cols]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _cell(name: str, value: Any, cut: bool = True) -> str:
    if value is None:
        return "-"
    if isinstance(value, str) and _TIME_FIELDS.fullmatch(name):
        text = _local_time(value)
    elif isinstance(value, list):
        text = ",".join(map(str, value)) or "-"
    elif isinstance(value, dict):
        text = json.dumps(value, separators=(",", ":")) if value else "-"
    else:
        text = str(value)
    text = " ".join(text.split())  # one line per row, whatever a name holds
    return text if not cut or len(text) <= _CELL_MAX else text[: _CELL_MAX - 1] + "…"


def _local_time(text: str) -> str:
    """An ISO time in the local zone to the second, as an operator reads it (`--json` keeps UTC ISO)."""
    try:
        return parse_iso(text).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return text


@dataclass(frozen=True)
class Management:
    """The management rooms a command works in, over one connection pool."""

    keyring: Keyring
    directory: Directory
    audit_log: AuditLog
    signing: SigningKeys
    grants: TokenService

    @property
    def invitations(self) -> Invitations:
        return Invitations(self.directory)


async def with_management(cfg: Config, fn: Callable[[Management], Awaitable[Any]]) -> Any:
    try:
        pool = await connect_pool(cfg.database)
    except StoreUnavailable as exc:
        raise CliError(str(exc)) from None
    hasher = SecretHasher(cfg.keys.argon2, 1)
    try:
        timeout_s = cfg.database.management_timeout_ms / 1000
        invalidated: list[str] = []
        db = Database(pool, timeout_s, invalidated.extend)
        signing = SigningKeys(db, cfg.tokens)
        grants = TokenService(db, signing, cfg.tokens, cfg.pepper.get().encode(), cfg.keys.prefix)
        rooms = Management(
            Keyring(db, KeyFormat(cfg.keys.prefix), hasher, cfg.roles),
            Directory(db, cfg.roles),
            AuditLog(db),
            signing,
            grants,
        )
        try:
            result = await fn(rooms)
        except PG_ERRORS as exc:
            raise CliError(f"database error: {exc.__class__.__name__}") from None
        except SigningUnavailable as exc:  # nothing was changed: the transaction rolled back
            raise CliError(f"cannot sign: {exc} (set GATEWAY_SIGNING_SECRET)") from None
        if invalidated:
            await _invalidate_redis(cfg, invalidated)
        return result
    finally:
        hasher.close()
        await pool.close()


async def _invalidate_redis(cfg: Config, key_ids: list[str]) -> None:
    """Running gateways do this on the NOTIFY too; doing it here covers a fleet that is down."""
    client = redis_client(cfg)
    try:
        await RedisCache(client, 0, 0, 0).invalidate(key_ids)
    except REDIS_ERRORS:
        print("warning: Redis unreachable; running gateways will invalidate their caches themselves", file=sys.stderr)
    finally:
        await client.aclose()


async def _issue_token(m: Management, args: argparse.Namespace, roles: RolesConfig) -> dict[str, Any]:
    """The operator's token for a member: at most the membership's role, and what that role grants."""
    member = await m.directory.role_of(args.org, args.user)
    if member is None:
        raise CliError(f"{args.user} is not a member of {args.org}")
    role = roles.named(args.role) if args.role else member
    if roles.rank(role) > roles.rank(member):
        raise CliError(f"--role {role} exceeds the user's membership role {member}")
    allowed = roles.permissions[role]
    scopes = tuple(args.scope) if args.scope else allowed
    for pattern in scopes:
        if not PERMISSION_RE.fullmatch(pattern) or not any(pattern_matches(a, pattern) for a in allowed):
            raise CliError(f"--scope {pattern} is not a permission pattern the role {role} grants")
    ttl = parse_duration(args.ttl, "ttl").total_seconds() if args.ttl else None
    if ttl is not None and not 60 <= ttl <= 3600:
        raise CliError("--ttl must be between 1m and 1h")
    await m.signing.load()
    return await m.grants.issue(Grant(args.user, args.org, role, tuple(sorted(set(scopes))), None, None), CLI, ttl)


async def _signing_keys(m: Management) -> list[dict[str, Any]]:
    return [
        {"kid": k.kid, "alg": k.alg, "state": k.state, "created_at": iso(k.created_at),
         "retire_after": iso(k.retire_after)}
        for k in await signing_listing(m.signing.db)
    ]  # fmt: skip


async def _in_org(
    m: Management, org_id: str, listing: Callable[[str], Awaitable[list[dict[str, Any]]]]
) -> list[dict[str, Any]]:
    await m.directory.require_org(org_id)  # an unknown org is `not_found`, not an empty table
    return await listing(org_id)


def _management_call(args: argparse.Namespace, cfg_roles: RolesConfig) -> Callable[[Management], Awaitable[Any]]:
    cmd, action = args.command, getattr(args, "action", None)
    calls: dict[tuple[str, str | None], Callable[[Management], Awaitable[Any]]] = {
        ("orgs", "create"): lambda m: m.directory.create_org(args.name),
        ("orgs", "list"): lambda m: m.directory.all_orgs(),
        ("users", "create"): lambda m: m.directory.create_user(args.email),
        ("users", "list"): lambda m: m.directory.all_users(args.org),
        ("members", "list"): lambda m: _in_org(m, args.org_id, m.directory.members),
        ("members", "set"): lambda m: m.directory.set_member(args.org_id, args.user_id, args.role),
        ("members", "remove"): lambda m: m.directory.remove_member(args.org_id, args.user_id),
        ("members", "invite"): lambda m: m.invitations.invite(args.org_id, args.email, args.role, CLI),
        ("invitations", "list"): lambda m: (
            m.invitations.for_user(args.user) if args.user else m.invitations.for_org(args.org)
        ),
        ("invitations", "accept"): lambda m: m.invitations.decide(args.invitation_id, None, True),
        ("invitations", "decline"): lambda m: m.invitations.decide(args.invitation_id, None, False),
        ("invitations", "withdraw"): lambda m: m.invitations.withdraw(None, args.invitation_id, CLI),
        ("projects", "create"): lambda m: m.directory.create_project(args.org_id, args.name),
        ("projects", "list"): lambda m: _in_org(m, args.org_id, m.directory.projects),
        ("service-accounts", "create"): lambda m: m.directory.create_service_account(
            args.org_id, args.name, args.role, CLI
        ),
        ("service-accounts", "list"): lambda m: _in_org(m, args.org_id, m.directory.service_accounts),
        ("keys", "list"): lambda m: m.keyring.list_keys(KeyQuery(args.user, args.org, args.status)),
        ("keys", "show"): lambda m: m.keyring.show_key(args.key_id),
        ("keys", "revoke"): lambda m: m.keyring.revoke_key(args.key_id),
        ("keys", "rotate"): lambda m: m.keyring.rotate_key(args.key_id, args.grace),
        ("tokens", "issue"): lambda m: _issue_token(m, args, cfg_roles),
        ("signing-keys", "list"): lambda m: _signing_keys(m),
        ("signing-keys", "rotate"): lambda m: m.signing.rotate(),
        ("audit", "list"): lambda m: m.audit_log.events(
            args.org,
            type_=args.type,
            key_id=args.key_id,
            actor=args.actor,
            since=args.since,
            until=args.until,
            limit=args.limit,
        ),
    }
    if (cmd, action) == ("keys", "create"):
        spec = KeySpec(
            user_id=args.user,
            name=args.name,
            role=args.role,
            orgs=args.org,
            projects=args.project,
            scopes=args.scope,
            env=args.env,
            expires_in=args.expires_in,
            expires_at=args.expires_at,
            allow_ips=args.allow_ip,
            rate_limit=args.rate_limit,
        )
        return lambda m: m.keyring.create_key(spec)
    return calls[(cmd, action)]


async def _migrate(cfg: Config) -> list[str]:
    try:
        pool = await connect_pool(cfg.database)
    except StoreUnavailable as exc:
        raise CliError(str(exc)) from None
    try:
        async with pool.acquire() as conn:
            return await migrate(conn)
    finally:
        await pool.close()


def _listen_error(exc: OSError) -> str:
    """`address already in use`, not uvloop's `[Errno 98] error while attempting to bind on ...`."""
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno).lower()
    return (exc.strerror or str(exc)).lower()  # getaddrinfo: "name or service not known"


class _StopSignals:
    """SIGTERM asks for a drain, and a second one cuts it short; SIGINT (Ctrl-C) stops at once."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.now = asyncio.Event()

    def terminate(self) -> None:
        if self.requested.is_set():
            self.now.set()
        self.requested.set()

    def interrupt(self) -> None:
        self.now.set()
        self.requested.set()


async def _close_when_draining(request: web.Request, response: web.StreamResponse) -> None:
    """While draining, every answer asks the client to close its connection, so a proxy's keep-alive
    connections move to other replicas before the listener closes."""
    if request.config_dict[LIFECYCLE].draining:
        response.force_close()  # closes it after this answer; the header is already computed, so say it too
        response.headers[hdrs.CONNECTION] = "close"


async def _start_up(
    runner: web.AppRunner, host: str, port: int, reuse_port: bool, metrics: web.AppRunner | None
) -> None:
    try:
        await runner.setup()  # the app's cleanup_ctx start-up: Postgres, Redis, the listener
    except StoreUnavailable as exc:
        raise CliError(str(exc)) from None
    await _listen(runner, host, port, reuse_port, "")
    if metrics is not None:
        cfg = runner.app[CONFIG]
        await metrics.setup()
        await _listen(metrics, cfg.metrics.host or host, cfg.metrics.port, reuse_port, " (metrics.port)")


async def _listen(runner: web.AppRunner, host: str, port: int, reuse_port: bool, what: str) -> None:
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port).start()
    except OSError as exc:
        raise CliError(f"cannot listen on {host}:{port}{what}: {_listen_error(exc)}") from None


async def _started(
    runner: web.AppRunner, host: str, port: int, reuse_port: bool, stop: _StopSignals, metrics: web.AppRunner | None
) -> bool:
    """Start up and bind; False when a stop signal came first (start-up is then abandoned)."""
    starting = asyncio.ensure_future(_start_up(runner, host, port, reuse_port, metrics))
    stopped = asyncio.ensure_future(stop.requested.wait())
    try:
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return False
    starting.result()  # re-raises a start-up failure
    return True


async def _serve_until_stopped(app: web.Application, stop: _StopSignals, drain_s: float) -> None:
    await stop.requested.wait()
    if not stop.now.is_set():
        app[LIFECYCLE].draining = True
        log.info(
            "SIGTERM: draining for %.1f s (/readyz answers 503, requests are still served), then stopping; "
            "SIGINT or a second SIGTERM stops at once",
            drain_s,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.now.wait(), drain_s)
    log.info("stopping: closing the listener, finishing the requests in flight")


async def _serve_async(cfg: Config, host: str, port: int, reuse_port: bool, on_bound: Callable[[], None]) -> None:
    """Start up, bind, call `on_bound`, serve until a signal; nothing started outlives a failure."""
    loop = asyncio.get_running_loop()
    stop = _StopSignals()
    handlers = {signal.SIGTERM: stop.terminate, signal.SIGINT: stop.interrupt}
    for signum, handler in handlers.items():
        loop.add_signal_handler(signum, handler)
    try:
        try:
            app = create_app(cfg)  # loads the route policy
        except ConfigError as exc:  # part of starting, like the port and Postgres: exit status 1
            raise CliError(f"config error: {exc}") from None
        app.on_response_prepare.append(_close_when_draining)
        logging_kwargs: dict[str, Any] = {"access_log_class": AccessLogger} if cfg.log.access else {"access_log": None}
        runner = GatewayRunner(
            app, head_timeout_s=cfg.server.header_timeout_s, shutdown_timeout=SHUTDOWN_TIMEOUT_S, **logging_kwargs
        )
        metrics = web.AppRunner(metrics_app(app), access_log=None) if cfg.metrics.port else None
        try:
            if await _started(runner, host, port, reuse_port, stop, metrics):
                # What start-up made (modules, config, pools) lives as long as the process: out of the
                # collector's sight, so the full collections that per-request garbage triggers skip it.
                gc.freeze()
                on_bound()
                hasher = app[HASHER]
                log.info(
                    "argon2: %d verification thread(s) in this process, %d more may wait", hasher.threads, hasher.queue
                )
                await _serve_until_stopped(app, stop, cfg.server.drain_s)
        finally:
            if metrics is not None:
                await metrics.cleanup()
            await runner.cleanup()  # closes the listener, waits for requests in flight, runs cleanup_ctx
    finally:
        for signum in handlers:
            loop.remove_signal_handler(signum)


def _serve_one(cfg: Config, host: str, port: int, reuse_port: bool, on_bound: Callable[[], None] | None = None) -> None:
    """One serving process. Raises CliError (or ConfigError) when it cannot start, before saying "serving"."""
    import uvloop

    def serving() -> None:
        log.info("gateway serving on %s:%d (database %s)", host, port, redact_url(cfg.database.url.get()))
        if cfg.metrics.port:
            log.info("metrics on %s:%d/metrics", cfg.metrics.host or host, cfg.metrics.port)

    with logging_to_stderr(cfg):
        uvloop.run(_serve_async(cfg, host, port, reuse_port, on_bound or serving))


def serve(cfg: Config, args: argparse.Namespace) -> None:
    host = args.host or cfg.server.host
    port = args.port if args.port is not None else cfg.server.port
    workers = args.workers if args.workers is not None else cfg.server.workers
    if workers < 1 or not 0 < port < 65536:
        raise CliError("--workers must be at least 1 and --port between 1 and 65535")
    # Each process sizes its share of the machine (argon2 threads) by the count actually started.
    cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, workers=WorkerCount(workers)))
    if workers == 1:
        _serve_one(cfg, host, port, False)
        return
    _serve_workers(cfg, host, port, workers)


_BOUND: Final = (0, "")  # a worker's report once it listens; else (exit status, the error line)


def _worker(cfg: Config, host: str, port: int, report: multiprocessing.connection.Connection) -> None:
    """One of `serve --workers N`, in its own process: reports to the parent once bound, or why not."""
    try:
        _serve_one(cfg, host, port, True, lambda: report.send(_BOUND))
    except (ConfigError, GatewayError, CliError) as exc:
        status, message = _failure(exc)
        report.send((status, message))
        raise SystemExit(status) from None


def _read_report(conn: multiprocessing.connection.Connection) -> tuple[int, str] | None:
    """A worker's report, or None when it exited without one."""
    try:
        got: tuple[int, str] | None = conn.recv() if conn.poll() else None
    except EOFError:
        return None
    return got


class _Workers:
    """The parent of `serve --workers N`: starts them, forwards signals, watches their start-up."""

    def __init__(self, cfg: Config, host: str, port: int, n: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        pipes = [ctx.Pipe(duplex=False) for _ in range(n)]
        self.reports = [recv for recv, _ in pipes]
        self._senders = [send for _, send in pipes]
        self.procs = [ctx.Process(target=_worker, args=(cfg, host, port, send)) for send in self._senders]
        self.bound: set[int] = set()
        self.stopping = False

    def start(self) -> None:
        for proc in self.procs:
            proc.start()
        for send in self._senders:
            send.close()  # the workers hold theirs: EOF on a report means that worker is gone
        if self.stopping:  # a signal came while they were being started
            self.send(signal.SIGTERM)

    def on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = self.stopping or signum != signal.SIGHUP
        self.send(signum)

    def send(self, signum: int) -> None:
        """Signal every live worker. One still starting gets SIGTERM for SIGINT (both stop a start-up, and a
        worker too young to have its handlers would die of SIGINT with a traceback) and no SIGHUP (it reads
        the policy as it starts, and SIGHUP would kill it)."""
        for i, proc in enumerate(self.procs):
            sig = signum
            if i not in self.bound and signum == signal.SIGINT:
                sig = signal.SIGTERM
            if (i in self.bound or sig != signal.SIGHUP) and proc.pid is not None and proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    def await_start(self) -> tuple[int, str] | None:
        """None once every worker listens (or was stopped while starting, as asked); else the first
        failure: (exit status, error line)."""
        starting = set(range(len(self.procs)))
        while starting:
            watched = [self.reports[i] for i in starting] + [self.procs[i].sentinel for i in starting]
            ready = multiprocessing.connection.wait(watched)
            for i in sorted(starting):
                report, proc = self.reports[i], self.procs[i]
                if report not in ready and proc.sentinel not in ready:
                    continue
                got = _read_report(report)
                if got == _BOUND:
                    self.bound.add(i)
                elif got is not None:
                    return got
                elif not self.stopping:
                    proc.join()
                    return 1, f"a worker exited during start-up (exit code {proc.exitcode})"
                starting.discard(i)
        return None

    def join(self) -> None:
        for proc in self.procs:
            proc.join()


def _serve_workers(cfg: Config, host: str, port: int, n: int) -> None:
    """N processes on one port (SO_REUSEPORT). "Serving" is said once every one listens; a start-up failure
    of any stops the others and is reported as one line. SIGTERM drains them all, SIGINT stops them, SIGHUP
    reaches each. When one worker dies the others are stopped too (after their drain), so the supervisor
    (systemd, Kubernetes) restarts the whole unit."""
    with logging_to_stderr(cfg):
        _supervise_workers(cfg, host, port, n)


def _supervise_workers(cfg: Config, host: str, port: int, n: int) -> None:
    workers = _Workers(cfg, host, port, n)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, workers.on_signal)
    workers.start()
    failure = workers.await_start()
    if failure is not None:
        workers.send(signal.SIGINT)
        workers.join()
        raise CliError(failure[1], status=failure[0])
    if not workers.stopping:
        database = redact_url(cfg.database.url.get())
        for proc in workers.procs:
            log.info("gateway serving on %s:%d (worker pid %s, database %s)", host, port, proc.pid, database)
    multiprocessing.connection.wait([p.sentinel for p in workers.procs])
    died_alone = not workers.stopping
    if died_alone:
        workers.send(signal.SIGTERM)  # the others drain, then stop
    workers.join()
    if died_alone:
        raise CliError(f"a worker exited unexpectedly (exit codes {[p.exitcode for p in workers.procs]})")


def _failure(exc: ConfigError | GatewayError | CliError) -> tuple[int, str]:
    """The exit status and the error line (after `gateway: `): 2 for a bad config, else 1."""
    if isinstance(exc, ConfigError):
        return 2, f"config error: {exc}"
    if isinstance(exc, GatewayError):
        return 1, f"{exc.code}: {exc.message}"
    return exc.status, str(exc)


def _print(data: Any, as_json: bool, columns: Sequence[str] | None = None) -> None:
    print(json.dumps(data) if as_json else _table(data, columns))


def _configured_roles(argv: Sequence[str] | None) -> Sequence[str]:
    """The roles of the config file the command line names (for the role options' choices); the
    defaults when it has none or cannot be read (the command then reports the config error itself)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    try:
        return load_roles(known.config, os.environ).order
    except ConfigError:
        return RolesConfig().order


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(_configured_roles(argv)).parse_args(argv)
    try:
        if args.command == "policy":
            policy = load_policy(args.file, load_roles(args.config, os.environ))
            _print(describe(policy), args.json)
            return 0
        cfg = load_config(args.config, os.environ)
        if args.command == "serve":
            serve(cfg, args)
            return 0
        if args.command == "migrate":
            applied = asyncio.run(_migrate(cfg))
            _print({"applied": applied}, args.json)
            return 0
        result = asyncio.run(with_management(cfg, _management_call(args, cfg.roles)))
        _print(result, args.json, _COLUMNS.get((args.command, getattr(args, "action", None))))
        return 0
    except (ConfigError, GatewayError, CliError) as exc:
        status, message = _failure(exc)
        print(f"gateway: {message}", file=sys.stderr)
        return status
    except KeyboardInterrupt:
        return 130
