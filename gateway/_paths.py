"""Path normalisation before route matching, refusing what is ambiguous rather than guessing.

Percent-encoded unreserved characters are decoded (`%7E` -> `~`, `%2e` -> `.`), other escapes are kept
with upper-case hex, repeated `/` are folded, `.` and `..` segments resolved. Refused: an encoded `/` or
`\\`, a raw `\\`, NUL or control character, invalid percent-encoding, `..` above the root, and `..`
after a repeated `/` (servers disagree on what that means).
"""

from __future__ import annotations

import string

from gateway.errors import InvalidRequest

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_HEX = frozenset(string.hexdigits)


def _decode_segment(seg: str) -> str:
    if "%" not in seg:
        return seg
    out = []
    i = 0
    while i < len(seg):
        c = seg[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        pair = seg[i + 1 : i + 3]
        if len(pair) != 2 or not set(pair) <= _HEX:
            raise InvalidRequest("the path has invalid percent-encoding")
        ch = chr(int(pair, 16))
        if ch in "/\\" or ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise InvalidRequest("the path has an encoded slash, backslash or control character")
        out.append(ch if ch in _UNRESERVED else "%" + pair.upper())
        i += 3
    return "".join(out)


def normalise(path: str) -> str:
    """The normalised absolute path, or InvalidRequest."""
    if not path.startswith("/"):
        raise InvalidRequest("the path must be absolute")
    if any(ord(c) < 0x21 or ord(c) == 0x7F or c == "\\" for c in path):
        raise InvalidRequest("the path has a backslash, space or control character")
    out: list[str] = []
    segments = path[1:].split("/")
    folded = False
    for i, raw in enumerate(segments):
        seg = _decode_segment(raw)
        last = i == len(segments) - 1
        if seg == "" and not last:
            folded = True  # repeated slash
            continue
        if seg == ".." and folded:
            # `/a//../b` is `/b` to a server that folds slashes first (nginx, Envoy) and `/a/b` to one
            # that resolves dots first (RFC 3986): which one the upstream is, we cannot know.
            raise InvalidRequest("the path has .. after a repeated slash: ambiguous")
        if seg == ".":
            if last:
                out.append("")
            continue
        if seg == "..":
            if not out:
                raise InvalidRequest("the path climbs above the root")
            out.pop()
            if last:
                out.append("")
            continue
        out.append(seg)
    return "/" + "/".join(out)


def segments(normalised: str) -> list[str]:
    """`/` -> [''], `/a` -> ['a'], `/a/` -> ['a', '']."""
    return normalised[1:].split("/")
