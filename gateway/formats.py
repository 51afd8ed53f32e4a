"""The textual forms of values the contract shares across modules, each defined once: permission
patterns, time units, ISO 8601 times, names and emails."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from gateway.errors import InvalidRequest

# A permission (`calls:read`) or a pattern of them (`*:read`, `projects:*`), or `*` for everything: lower
# case, two to four `:`-separated parts. Key scopes, role permissions and route requirements alike.
# An id as a request may name one: in a path, a header, a query or a body (orgs, projects, keys, users).
ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
PERMISSION_RE = re.compile(r"\*|[a-z0-9_.*-]{1,64}(:[a-z0-9_.*-]{1,64}){1,3}")

# Seconds per unit, for durations (`30d`, `12h`) and rates (`100/1m`).
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def iso(value: datetime | float | None) -> str | None:
    """A time as the API writes it: ISO 8601 in UTC with `Z` (a datetime, or a Unix timestamp)."""
    if value is None:
        return None
    t = datetime.fromtimestamp(value, UTC) if isinstance(value, int | float) else value.astimezone(UTC)
    return t.isoformat().replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    """An ISO 8601 time as the API reads it (`Z` or an offset; none means UTC). ValueError if it is not one."""
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


MAX_NAME = 200  # characters of an org's, a project's, a key's or a service account's name
_EMAIL_RE = re.compile(r"[^@\s]{1,64}@[^@\s]{1,255}")


def valid_name(value: str, what: str = "name") -> str:
    """A name as stored: trimmed, 1 to MAX_NAME characters, no control characters."""
    value = value.strip()
    if not value or len(value) > MAX_NAME or any(ord(c) < 0x20 for c in value):
        raise InvalidRequest(f"{what} must be 1-{MAX_NAME} printable characters", field=what)
    return value


def valid_email(value: str) -> str:
    """An email as stored: trimmed and lower case."""
    email = value.strip().lower()
    if not _EMAIL_RE.fullmatch(email):
        raise InvalidRequest("email is not a valid address", field="email")
    return email
