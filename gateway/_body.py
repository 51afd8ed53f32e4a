"""Request bodies: one reader of JSON objects for every endpoint that takes one."""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import InvalidRequest

# Every body we accept is a flat object or one level deeper; anything nested further is refused before
# Python's parser recurses into it (30,000 levels raised RecursionError, answered as an outage).
MAX_DEPTH = 32


def json_object(raw: bytes, *, empty_is_object: bool = False) -> dict[str, Any]:
    """The body as a JSON object, or InvalidRequest (400) for anything else."""
    if empty_is_object and not raw:
        return {}
    if _depth(raw) > MAX_DEPTH:
        raise InvalidRequest(f"the body is nested more than {MAX_DEPTH} levels deep")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidRequest("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


def _depth(raw: bytes) -> int:
    """The deepest nesting of [ and { outside strings (a single pass; no parsing)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest
