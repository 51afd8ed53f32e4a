"""The schema: numbered migrations (`gateway/migrations/NNNN_name.sql`), applied in order, once."""

from __future__ import annotations

from importlib import resources

from gateway import constants as C
from gateway.backends import Conn


def migration_files() -> list[tuple[int, str, str]]:
    out = []
    for item in resources.files("gateway.migrations").iterdir():
        if item.name.endswith(".sql"):
            version = int(item.name.split("_", 1)[0])
            out.append((version, item.name, item.read_text(encoding="utf-8")))
    return sorted(out)


async def migrate(conn: Conn) -> list[str]:
    """Apply pending migrations; an advisory lock makes concurrent runs from several replicas safe."""
    applied_now = []
    await conn.execute("SELECT pg_advisory_lock($1)", C.MIGRATION_LOCK_ID)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            applied_now.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", C.MIGRATION_LOCK_ID)
    return applied_now
