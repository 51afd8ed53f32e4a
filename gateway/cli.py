"""The `gateway` command line. Errors go to stderr with a non-zero exit and never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from gateway.admin import Admin, KeySpec
from gateway.app import create_app, redis_client
from gateway.cache import REDIS_ERRORS, RedisCache
from gateway.config import Config, load_config, load_roles, redact_url
from gateway.errors import ConfigError, GatewayError
from gateway.keys import KeyFormat, SecretHasher
from gateway.policy import describe, load_policy
from gateway.store import PG_ERRORS, StoreUnavailable, connect_pool, migrate

log = logging.getLogger("gateway")


class CliError(Exception):
    """A failure to report on stderr with exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


class AccessLogger(AbstractAccessLogger):
    """Method, path (never the query string: it may carry a key), status and time."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %s %.1fms', request.remote, request.method, request.path, response.status, time * 1000
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gateway", description="API-key authentication sidecar for reverse proxies")
    p.add_argument("--config", help="config file (else $GATEWAY_CONFIG, else config/gateway.yaml)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("migrate", help="apply database migrations (idempotent)")
    serve = sub.add_parser("serve", help="serve the verify endpoints")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)

    policy = sub.add_parser("policy").add_subparsers(dest="action", required=True, parser_class=_Parser)
    policy.add_parser("check", help="validate a route policy file without serving").add_argument("file")

    orgs = sub.add_parser("orgs").add_subparsers(dest="action", required=True, parser_class=_Parser)
    orgs.add_parser("create").add_argument("name")

    users = sub.add_parser("users").add_subparsers(dest="action", required=True, parser_class=_Parser)
    users.add_parser("create").add_argument("email")

    members = sub.add_parser("members").add_subparsers(dest="action", required=True, parser_class=_Parser)
    ms = members.add_parser("set")
    ms.add_argument("org_id")
    ms.add_argument("user_id")
    ms.add_argument("role")
    mr = members.add_parser("remove")
    mr.add_argument("org_id")
    mr.add_argument("user_id")

    projects = sub.add_parser("projects").add_subparsers(dest="action", required=True, parser_class=_Parser)
    pc = projects.add_parser("create")
    pc.add_argument("org_id")
    pc.add_argument("name")

    audit = sub.add_parser("audit").add_subparsers(dest="action", required=True, parser_class=_Parser)
    al = audit.add_parser("list", help="an org's audit events, newest first")
    al.add_argument("--org", required=True)
    al.add_argument("--type")
    al.add_argument("--key-id")
    al.add_argument("--actor")
    al.add_argument("--since", type=_iso_time)
    al.add_argument("--until", type=_iso_time)
    al.add_argument("--limit", type=_limit, default=100)

    keys = sub.add_parser("keys").add_subparsers(dest="action", required=True, parser_class=_Parser)
    kc = keys.add_parser("create")
    kc.add_argument("--user", required=True)
    kc.add_argument("--name", required=True)
    kc.add_argument("--role", required=True)
    kc.add_argument("--org", action="append", default=[])
    kc.add_argument("--project", action="append", default=[])
    kc.add_argument("--scope", action="append")
    exp = kc.add_mutually_exclusive_group()
    exp.add_argument("--expires-in")
    exp.add_argument("--expires-at")
    kc.add_argument("--env", choices=["live", "test"], default="live")
    kc.add_argument("--allow-ip", action="append")
    kc.add_argument("--rate-limit")
    kl = keys.add_parser("list")
    kl.add_argument("--user")
    kl.add_argument("--org")
    keys.add_parser("show").add_argument("key_id")
    keys.add_parser("revoke").add_argument("key_id")
    kr = keys.add_parser("rotate")
    kr.add_argument("key_id")
    kr.add_argument("--grace")
    return p


def _limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError("must be a whole number from 1 to 1000")
    return int(text)


def _iso_time(text: str) -> datetime:
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _table(data: Any) -> str:
    rows = data if isinstance(data, list) else [data]
    if not rows:
        return "(none)"
    if not isinstance(data, list):
        width = max(len(k) for k in data)
        return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in data.items())
    cols = [c for c in rows[0] if c not in ("scopes", "allowed_ips", "rotated_to", "created_at", "user_id")]
    widths = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in cols}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols)]
    lines += ["  ".join(_cell(r.get(c)).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return str(value)


async def _with_admin(cfg: Config, fn: Callable[[Admin], Awaitable[Any]]) -> Any:
    try:
        pool = await connect_pool(cfg.database)
    except StoreUnavailable as exc:
        raise CliError(str(exc)) from None
    hasher = SecretHasher(cfg.keys.argon2, 1)
    try:
        admin = Admin(pool, KeyFormat(cfg.keys.prefix), hasher, cfg.roles)
        try:
            result = await fn(admin)
        except PG_ERRORS as exc:
            raise CliError(f"database error: {exc.__class__.__name__}") from None
        if admin.invalidated:
            await _invalidate_redis(cfg, admin.invalidated)
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


def _admin_call(args: argparse.Namespace) -> Callable[[Admin], Awaitable[Any]]:
    cmd, action = args.command, getattr(args, "action", None)
    calls: dict[tuple[str, str | None], Callable[[Admin], Awaitable[Any]]] = {
        ("orgs", "create"): lambda a: a.create_org(args.name),
        ("users", "create"): lambda a: a.create_user(args.email),
        ("members", "set"): lambda a: a.set_member(args.org_id, args.user_id, args.role),
        ("members", "remove"): lambda a: a.remove_member(args.org_id, args.user_id),
        ("projects", "create"): lambda a: a.create_project(args.org_id, args.name),
        ("keys", "list"): lambda a: a.list_keys(args.user, args.org),
        ("keys", "show"): lambda a: a.show_key(args.key_id),
        ("keys", "revoke"): lambda a: a.revoke_key(args.key_id),
        ("keys", "rotate"): lambda a: a.rotate_key(args.key_id, args.grace),
        ("audit", "list"): lambda a: a.audit(
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
        return lambda a: a.create_key(spec)
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


def _serve_one(cfg: Config, host: str, port: int, reuse_port: bool) -> None:
    import uvloop

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvloop.install()
    log.info("gateway serving on %s:%d (database %s)", host, port, redact_url(cfg.database.url.get()))
    web.run_app(
        create_app(cfg),
        host=host,
        port=port,
        reuse_port=reuse_port,
        print=None,
        access_log_class=AccessLogger,
        handle_signals=True,
    )


def serve(cfg: Config, args: argparse.Namespace) -> None:
    host = args.host or cfg.server.host
    port = args.port if args.port is not None else cfg.server.port
    workers = args.workers if args.workers is not None else cfg.server.workers
    if workers < 1 or not 0 < port < 65536:
        raise CliError("--workers must be at least 1 and --port between 1 and 65535")
    if workers == 1:
        _serve_one(cfg, host, port, False)
        return
    _serve_workers(cfg, host, port, workers)


def _serve_workers(cfg: Config, host: str, port: int, workers: int) -> None:
    """N processes on one port (SO_REUSEPORT). A signal to the parent stops them all; when one worker
    dies the others are stopped too, so the supervisor (systemd, Kubernetes) restarts the whole unit."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_serve_one, args=(cfg, host, port, True)) for _ in range(workers)]

    stopping = False

    def stop_all() -> None:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        stop_all()

    def forward_hup(_signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, forward_hup)
    for proc in procs:
        proc.start()
    multiprocessing.connection.wait([p.sentinel for p in procs])
    died_alone = not stopping
    stop_all()
    for proc in procs:
        proc.join()
    if died_alone:
        raise CliError(f"a worker exited unexpectedly (exit codes {[p.exitcode for p in procs]})")


def _print(data: Any, as_json: bool) -> None:
    print(json.dumps(data) if as_json else _table(data))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        result = asyncio.run(_with_admin(cfg, _admin_call(args)))
        _print(result, args.json)
        return 0
    except ConfigError as exc:
        print(f"gateway: config error: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"gateway: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except CliError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
