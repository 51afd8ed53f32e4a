"""Request bodies: one reader of JSON objects for every endpoint that takes one."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.errors import InvalidRequest, RequestTimeout
from gateway.schemas import Body, read
from gateway.typedefs import CONFIG

# Every body we accept is a flat object or one level deeper; anything nested further is refused before
# Python's parser recurses into it (30,000 levels raised RecursionError, answered as an outage).
MAX_DEPTH = 32


async def read_raw(request: web.Request, timeout_s: float) -> bytes:
    """The whole body, within `timeout_s` (`server.body_timeout_s`; else 408, and the connection is closed).
    A body the parser refuses (bad chunking) is 400; a client that left mid-body raises ConnectionResetError,
    which the errors middleware passes to aiohttp, which drops it quietly: nobody is left to answer."""
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout_s:g} s", headers={"Connection": "close"}
        ) from None
    except HttpProcessingError:
        raise InvalidRequest("the request body is malformed", headers={"Connection": "close"}) from None


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


def storable(body: dict[str, Any]) -> dict[str, Any]:
    """`body`, if every string in it can be stored; else InvalidRequest (400). For bodies whose values
    reach Postgres: /v1/keys/verify and the page's sign-in answer such a key with their own refusal."""
    if not _text(body):
        raise InvalidRequest("the body holds a string with a NUL or an unpaired surrogate: not text")
    return body


# JSON may escape them (\u0000, a lone \ud800), but no text holds them: Postgres refused them as an error
# of its own (a NUL in an email, a surrogate in an org's name), answered 500.
_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")


def _text(value: Any) -> bool:
    """Whether every string in `value`, keys included, is text (nested at most MAX_DEPTH levels)."""
    if isinstance(value, str):
        return _NOT_TEXT.search(value) is None
    if isinstance(value, dict):
        return all(_text(k) and _text(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_text(v) for v in value)
    return True


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


async def read_body(request: web.Request, model: type[Body]) -> dict[str, Any]:
    """A `/v1/` JSON object holding only `model`'s fields, each of its type (see gateway.schemas)."""
    raw = await read_raw(request, request.config_dict[CONFIG].server.body_timeout_s)
    return read(model, storable(json_object(raw, empty_is_object=True)))
