"""gateway/data is the only code that speaks SQL (its package docstring says so; this keeps it true)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import gateway

PACKAGE = Path(gateway.__file__).parent
# Statements as this code base writes them (keywords in capitals), not prose that starts with "Insert".
_SQL = re.compile(
    r"\s*(SELECT\s|INSERT\s+INTO\s|UPDATE\s+\w+(\s+\w+)?\s+SET\s|DELETE\s+FROM\s|WITH\s+\w+\s+AS\s"
    r"|(CREATE|ALTER|DROP)\s+(TABLE|INDEX|ROLE)\s|LISTEN\s|NOTIFY\s)"
)
_ASYNCPG_CALLS = {"fetch", "fetchrow", "fetchval", "executemany", "copy_records_to_table", "copy_to_table"}


def sql_outside(tree: ast.AST) -> list[str]:
    """Statements in string constants, and asyncpg query calls (a Redis pipeline's bare execute() is not one)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _SQL.match(node.value):
            found.append(f"line {node.lineno}: {node.value[:40]!r}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            if name in _ASYNCPG_CALLS or (name == "execute" and node.args):
                found.append(f"line {node.lineno}: .{name}(...)")
    return found


def test_no_sql_outside_the_data_layer() -> None:
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "data" or path.parent.name == "migrations":
            continue
        found = sql_outside(ast.parse(path.read_text(encoding="utf-8")))
        if found:
            offenders[str(path.relative_to(PACKAGE))] = found
    assert offenders == {}


def test_the_check_finds_sql() -> None:
    """Issue 11: SQL lived in admin.py, store.py, api.py and ui.py; any of those lines is caught."""
    samples = [
        'await conn.fetchval("SELECT org_id FROM projects WHERE id = $1", project)',
        "rows = await conn.fetch(query)",
        'await conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", key_id)',
        'q = "  INSERT INTO audit_events (type) VALUES ($1)"',
        'q = "UPDATE api_keys k SET revoked_at = now()"',
    ]
    for sample in samples:
        assert sql_outside(ast.parse(sample)), sample
    assert sql_outside(ast.parse("await pipe.execute()")) == []
    assert sql_outside(ast.parse('log.info("Selected %s", x)')) == []
