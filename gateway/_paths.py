"""The canonical-path rule: the gateway authorises only a path that every mainstream router reads the same way.

Proxies (nginx, Caddy, ingress-nginx) forward the client's raw target to the upstream, and routers differ
on everything beyond plain segments: Tomcat/Spring strip `;params` and resolve `..`, IIS trims trailing dots
and spaces, Express matches the raw path case-insensitively and drops what follows `#`, Starlette and Django
percent-decode before matching, nginx and Go clean the path. Resolving any of that ourselves would authorise
one reading while the upstream picked another, so a path that is not already canonical is refused as
`invalid_request`, never normalised:

- only RFC 3986 path characters, ASCII, minus `;` (`#`, `\\`, spaces, controls and `"<>[]^`{|}` are not);
- no empty segment but a trailing one (no `//`), no segment ending in `.` or a space (so no `.`/`..`);
- `%XX` with two hex digits, never for a character that has a plain form (letters, digits, `-._~`), a
  separator or something some stack decodes twice or splits on (`/ \\ ; % ? #`, NUL, controls);
- percent-encoded bytes above 0x7F are UTF-8 (strict: no overlong forms, no surrogates), and never a
  control, format or space character, nor one that a case mapping or NFKC folds to ASCII (U+0130 and
  U+0131, the dotted and dotless i; U+017F, the long s; the Kelvin sign; ligatures; fullwidth forms), which
  some routers would then match against a route's ASCII literal.

Policy literals are plain (`[A-Za-z0-9._~-]`, see policy.py) and match case-insensitively, so an allowed
escape can never turn a segment into a literal for one router and not for another.
"""

from __future__ import annotations

import functools
import string
import unicodedata

from gateway.errors import InvalidRequest

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# RFC 3986 pchar without `;` (Tomcat and Spring cut a segment at it) and without `%` (checked apart).
_RAW_OK = _UNRESERVED | frozenset("!$&'()*+,=:@/")
_HEX = frozenset(string.hexdigits)
# Encoded ASCII that stays data everywhere: characters with no plain form in a path.
_ENCODED_OK = frozenset(" \"<>[]^`{|}!$&'()*+,=:@")


def _refuse_raw(c: str) -> None:
    if c == "#":
        raise InvalidRequest("the original URI has a #: some routers cut the path there, others keep it")
    if c == ";":
        raise InvalidRequest("the path has a ;: Tomcat and Spring read it as path parameters")
    if c == "\\":
        raise InvalidRequest("the path has a backslash: some servers read it as /")
    if ord(c) <= 0x20 or ord(c) == 0x7F:
        raise InvalidRequest("the path has a space or control character")
    if not c.isascii():
        raise InvalidRequest("the path has a raw non-ASCII character: percent-encode it as UTF-8")
    raise InvalidRequest(f"the path has {c!r}, which must be percent-encoded")


@functools.lru_cache(maxsize=1024)
def _unicode_ok(ch: str) -> bool:
    if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zs", "Zl", "Zp"):
        return False  # invisible or trimmed as whitespace by some stacks
    folded = ch.upper() + ch.lower() + ch.casefold() + unicodedata.normalize("NFKC", ch)
    return not any(c.isascii() for c in folded)


def _decode_segment(seg: str) -> str:
    """The segment with its escapes decoded, or InvalidRequest if one of them is not canonical."""
    out: list[str] = []
    pending = bytearray()  # a run of escaped bytes above 0x7F, decoded together as UTF-8
    i = 0
    while i < len(seg):
        c = seg[i]
        if c == "%":
            pair = seg[i + 1 : i + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                raise InvalidRequest("the path has a % that is not followed by two hex digits")
            byte = int(pair, 16)
            i += 3
            if byte >= 0x80:
                pending.append(byte)
                continue
            c = chr(byte)
            if c in _UNRESERVED:
                raise InvalidRequest("the path percent-encodes a letter, digit or -._~: routers disagree on it")
            if c not in _ENCODED_OK:
                raise InvalidRequest("the path has an encoded /, \\, ;, %, ?, #, NUL or control character")
        else:
            i += 1
        if pending:
            out.append(_utf8(bytes(pending)))
            pending.clear()
        out.append(c)
    if pending:
        out.append(_utf8(bytes(pending)))
    return "".join(out)


def _utf8(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")  # strict: refuses overlong forms (%c0%af), surrogates and stray bytes
    except UnicodeDecodeError:
        raise InvalidRequest("the path's percent-encoding is not valid UTF-8") from None
    if not all(_unicode_ok(ch) for ch in text):
        raise InvalidRequest("the path encodes a character that some servers fold to ASCII or treat as space")
    return text


def canonical(path: str) -> str:
    """`path` itself (the part of the target before `?`) if it is canonical, else InvalidRequest."""
    if not path.startswith("/"):
        raise InvalidRequest("the path must be absolute")
    for c in path:
        if c not in _RAW_OK and c != "%":
            _refuse_raw(c)
    segs = path[1:].split("/")
    for i, seg in enumerate(segs):
        if seg == "":
            if i < len(segs) - 1:
                raise InvalidRequest("the path has an empty segment (//): servers disagree on folding it")
            continue
        decoded = _decode_segment(seg) if "%" in seg else seg
        if decoded.endswith((".", " ")):
            # `.` and `..` segments, and `orgs.` or `orgs ` that IIS and Windows read as `orgs`.
            raise InvalidRequest("the path has a segment ending in a dot or space")
    return path


def segments(path: str) -> list[str]:
    """`/` -> [''], `/a` -> ['a'], `/a/` -> ['a', '']."""
    return path[1:].split("/")
