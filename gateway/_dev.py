"""`make run`: a working gateway on a fresh machine.

Starts local Postgres and Redis under `.local/` (git-ignored) unless GATEWAY_DATABASE_URL /
GATEWAY_REDIS_URL are set, migrates, creates a demo org, user and key once (printing the key that one
time), then serves.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
from pathlib import Path

from gateway._services import Postgres, Redis, free_port
from gateway.cli import CliError, Management, _migrate, _serve_one, with_management
from gateway.config import load_config
from gateway.keyring import KeySpec

LOCAL = Path(".local")


def _ports() -> dict[str, int]:
    path = LOCAL / "ports.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    ports = {"postgres": free_port(), "redis": free_port()}
    path.write_text(json.dumps(ports))
    return ports


def _pepper(name: str = "pepper") -> str:
    """A secret made once for this checkout (`.local/<name>`, readable by its owner only)."""
    path = LOCAL / name
    if not path.exists():
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


async def _demo(config_path: str | None) -> None:
    marker = LOCAL / "demo.json"
    if marker.exists():
        ids = json.loads(marker.read_text())
        print(f"demo data exists (org {ids['org']}, key {ids['key_id']}); its key was printed when created.")
        print(f"another one: .venv/bin/gateway keys create --user {ids['user']} --name demo --role admin")
        return
    cfg = load_config(config_path)

    async def setup(m: Management):  # type: ignore[no-untyped-def]
        org = await m.directory.create_org("Demo")
        user = await m.directory.create_user(f"demo-{secrets.token_hex(3)}@example.com")
        await m.directory.set_member(org["id"], user["id"], "owner")
        key = await m.keyring.create_key(
            KeySpec(user_id=user["id"], name="demo", role="admin", orgs=[], projects=[], scopes=None)
        )
        return org, user, key

    org, user, key = await with_management(cfg, setup)
    marker.write_text(json.dumps({"org": org["id"], "user": user["id"], "key_id": key["id"]}))
    port = cfg.server.port
    print("\n  Demo API key (shown this once, keep it):\n")
    print(f"    {key['key']}\n")
    print("  Try it:\n")
    print(
        f"    curl -i -H 'Authorization: Bearer {key['key']}' -H 'X-Original-Method: GET' "
        f"-H 'X-Original-URI: /v1/things' http://127.0.0.1:{port}/auth/nginx\n"
    )


def main() -> int:
    LOCAL.mkdir(exist_ok=True)
    config_path = os.environ.get("GATEWAY_CONFIG") or "config/gateway.yaml"
    services: list[Postgres | Redis] = []
    try:
        if not os.environ.get("GATEWAY_DATABASE_URL"):
            pg = Postgres((LOCAL / "pg").resolve(), _ports()["postgres"])
            pg.init()
            pg.start()
            services.append(pg)
            os.environ["GATEWAY_DATABASE_URL"] = pg.url
            print(f"local postgres on 127.0.0.1:{pg.port} (data in {pg.datadir})")
        if not os.environ.get("GATEWAY_REDIS_URL"):
            rd = Redis((LOCAL / "redis").resolve(), _ports()["redis"])
            rd.start()
            services.append(rd)
            os.environ["GATEWAY_REDIS_URL"] = rd.url
            print(f"local redis on 127.0.0.1:{rd.port}")
        os.environ.setdefault("GATEWAY_PEPPER", _pepper())
        os.environ.setdefault("GATEWAY_SIGNING_SECRET", _pepper("signing-secret"))
        cfg = load_config(config_path)
        applied = asyncio.run(_migrate(cfg))
        print(f"migrations applied: {applied or 'none pending'}")
        asyncio.run(_demo(config_path))
        print("to use the CLI against this instance, in another shell:")
        print(
            f"  export GATEWAY_DATABASE_URL={os.environ['GATEWAY_DATABASE_URL']}"
            f" GATEWAY_REDIS_URL={os.environ['GATEWAY_REDIS_URL']} GATEWAY_PEPPER=$(cat .local/pepper)"
            " GATEWAY_SIGNING_SECRET=$(cat .local/signing-secret)"
        )

        def listening() -> None:  # said once bound, never before
            print(f"gateway listening on http://{cfg.server.host}:{cfg.server.port} (Ctrl-C to stop)", flush=True)

        try:
            _serve_one(cfg, cfg.server.host, cfg.server.port, False, listening)
        except CliError as exc:
            print(f"gateway: {exc}", file=sys.stderr)
            return 1
        return 0
    finally:
        for svc in reversed(services):
            svc.stop()


if __name__ == "__main__":
    raise SystemExit(main())
