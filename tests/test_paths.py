"""The canonical-path rule (issue 9, item 1): a path is authorised only as every router would read it."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from urllib.parse import unquote

import pytest

from gateway._paths import canonical, segments
from gateway.errors import InvalidRequest

CANONICAL = [
    "/",
    "/a/",
    "/docs/x",
    "/v1/orgs/org_AbC9/projects/prj_xY-z/calls",
    "/.well-known/openid-configuration",
    "/a.b/c~d/e-f_g",
    "/v1/things/a:b@c!$&'()*+,=",
    "/v1/things/urn%3Aisbn%3A1",  # an encoded reserved character stays data everywhere
    "/a%20b",  # a space inside a segment, not at its end
    "/a%7Cb%5B%5D%7B%7D%22%3C%3E%5E%60",
    "/docs/caf%C3%A9",
    "/docs/caf%c3%a9",
    "/docs/%F0%9F%98%80",
    "/docs/%E6%97%A5%E6%9C%AC",
]


@pytest.mark.parametrize("path", CANONICAL)
def test_canonical_paths_pass_unchanged(path: str) -> None:
    assert canonical(path) == path


NOT_CANONICAL = [
    # dot segments, raw or encoded, anywhere
    "/..",
    "/a/..",
    "/a/.",
    "/a/./b",
    "/docs/../v1/x",
    "/docs/%2e%2e/v1/x",
    "/docs/%2E%2E/v1/x",
    "/docs/%2E./v1/x",
    "/docs/.%2e/v1/x",
    "/docs/%2e/v1/x",
    # segments IIS and Windows trim: trailing dots and spaces
    "/v1/orgs./B/things",
    "/v1/orgs../B",
    "/v1/orgs%20/B",
    "/v1/orgs/B%20",
    # path parameters, fragments, repeated and back slashes
    "/v1/orgs;x=1/B/things",
    "/v1/orgs/A/..;/B/things",
    "/docs/..;/v1/orgs/B/things",
    "/v1/things;jsessionid=x",
    "/v1/orgs/B/things#/../../../../docs/x",
    "/docs#x",
    "/a//b",
    "//a",
    "/a\\b",
    "/a%5Cb",
    "/a%5cb",
    "/a%2Fb",
    "/a%2fb",
    # percent-encoded plain characters: Express routes them raw, Starlette decoded
    "/v1/%6Frgs/B/things",
    "/a%41",
    "/a%7E",
    "/a%2D",
    "/a%5F",
    "/a%30",
    # encoded characters some stack decodes twice or splits on (Traefik's default refusals)
    "/a%25",
    "/a%252e%252e",
    "/a%3Bb",
    "/a%3F",
    "/a%23",
    "/a%00",
    "/a%0a",
    "/a%7F",
    # bad percent-encoding, bad UTF-8
    "/a%",
    "/a%4",
    "/a%G1",
    "/a%c0%af",  # overlong /
    "/a%e0%80%ae",  # overlong .
    "/a%ff",
    "/a%C3",
    "/a%C3x",
    "/a%ED%A0%80",  # a surrogate
    "/a%F4%90%80%80",  # above U+10FFFF
    # characters that fold to ASCII or read as space in some stack
    "/v1/%C4%B0tems",  # U+0130, dotted capital I: Java's toLowerCase gives i
    "/v1/%C4%B1tems",  # U+0131, dotless i: Java's equalsIgnoreCase matches I
    "/v1/%C5%BFtuff",  # U+017F, long s: upper-cases to S
    "/v1/%E2%84%AA",  # Kelvin sign lower-cases to k
    "/v1/%EF%BD%8Frgs",  # fullwidth o: NFKC gives o
    "/v1/orgs%C2%A0",  # no-break space
    "/v1/orgs%E2%80%8B",  # zero-width space
    "/v1/orgs%C2%85",  # NEL
    # raw characters that must be encoded
    "/a b",
    "/a\tb",
    "/a\x00",
    "/a|b",
    "/a{b}",
    '/a"b',
    "/caf\u00e9",
    "relative",
    "",
]


@pytest.mark.parametrize("path", NOT_CANONICAL)
def test_non_canonical_paths_are_refused(path: str) -> None:
    with pytest.raises(InvalidRequest):
        canonical(path)


def test_segments() -> None:
    assert segments("/") == [""]
    assert segments("/a") == ["a"]
    assert segments("/a/") == ["a", ""]


# --- router models ---------------------------------------------------------------------------------
# How each mainstream stack turns a raw target into the segments it routes on (decoded, so that they
# compare with what an upstream's params receive). Not run here, except Starlette and nginx, which
# tests/test_deploy_paths.py runs for real; these follow each stack's documented behaviour.


def _dots(segs: list[str]) -> list[str]:
    out: list[str] = []
    for s in segs:
        if s == "..":
            if out:
                out.pop()
        elif s != ".":
            out.append(s)
    return out


def _path(target: str) -> str:
    return target.split("?", 1)[0]


def express(target: str) -> list[str]:
    """Express (parseurl): the path ends at `?` or `#`, segments are matched raw, params decoded."""
    return [unquote(s) for s in re.split(r"[?#]", target, maxsplit=1)[0][1:].split("/")]


def starlette(target: str) -> list[str]:
    """uvicorn + Starlette, Django, Rails: the whole path percent-decoded, nothing resolved."""
    return unquote(_path(target))[1:].split("/")


def tomcat(target: str) -> list[str]:
    """Tomcat/Spring: `;params` cut from each segment, then decoded, `//` merged and dots resolved."""
    segs = [unquote(s.split(";", 1)[0]) for s in _path(target)[1:].split("/")]
    return _dots([s for i, s in enumerate(segs) if s or i == len(segs) - 1])


def iis(target: str) -> list[str]:
    """IIS: decoded, `\\` is `/`, slashes merged, trailing dots and spaces trimmed, dots resolved."""
    segs = unquote(_path(target)).replace("\\", "/")[1:].split("/")
    segs = [s if s in (".", "..") else s.rstrip(". ") for s in segs]
    return _dots([s for i, s in enumerate(segs) if s or i == len(segs) - 1])


def nginx(target: str) -> list[str]:
    """nginx's own location matching: decoded, slashes merged, dots resolved."""
    segs = unquote(_path(target))[1:].split("/")
    return _dots([s for i, s in enumerate(segs) if s or i == len(segs) - 1])


def go(target: str) -> list[str]:
    """Go net/http ServeMux: the decoded path cleaned (a trailing slash kept)."""
    p = unquote(_path(target))
    cleaned = posixpath.normpath(p).replace("//", "/")
    if p.endswith("/") and cleaned != "/":
        cleaned += "/"
    return cleaned[1:].split("/")


ROUTERS: list[Callable[[str], list[str]]] = [express, starlette, tomcat, iis, nginx, go]


def test_router_models_reproduce_the_issue() -> None:
    # What made item 1 an issue: each of these reaches org B on some router.
    b = ["v1", "orgs", "B", "things"]
    assert tomcat("/v1/orgs;x=1/B/things") == b
    assert tomcat("/v1/orgs/A/..;/B/things") == b
    assert tomcat("/docs/..;/v1/orgs/B/things") == b
    assert iis("/v1/orgs./B/things") == b
    assert express("/v1/orgs/B/things#/../../../../docs/x") == b
    assert nginx("/v1/orgs/B/../A/things") == ["v1", "orgs", "A", "things"] != starlette("/v1/orgs/B/../A/things")


@pytest.mark.parametrize("target", CANONICAL + NOT_CANONICAL)
def test_every_router_reads_an_allowed_path_as_the_gateway_does(target: str) -> None:
    """Whatever the gateway lets through, every router model splits into the same segments, decoded the
    same way, as the gateway matched (literal case aside: the policy ignores it, see test_policy)."""
    try:
        path = canonical(_path(target))
    except InvalidRequest:
        return
    gateway = [unquote(s) for s in segments(path)]
    for router in ROUTERS:
        assert router(target) == gateway, router.__name__
