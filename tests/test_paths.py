from __future__ import annotations

import pytest

from gateway._paths import normalise, segments
from gateway.errors import InvalidRequest


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/", "/"),
        ("/a//b", "/a/b"),
        ("//a", "/a"),
        ("/a/./b/../c", "/a/c"),
        ("/docs/../v1/x", "/v1/x"),
        ("/docs/%2e%2e/v1/x", "/v1/x"),
        ("/docs/%2E%2E/v1/x", "/v1/x"),
        ("/docs/.%2e/v1", "/v1"),
        ("/a/%7euser", "/a/~user"),
        ("/a/%41", "/a/A"),
        ("/a%20b", "/a%20b"),
        ("/a%3fb", "/a%3Fb"),
        ("/a/", "/a/"),
        ("/a/..", "/"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
    ],
)
def test_normalise(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "/a%2Fb",
        "/a%2fb",
        "/a%5Cb",
        "/a\\b",
        "/a%00",
        "/a%0a",
        "/a%G1",
        "/a%",
        "/a%4",
        "/..",
        "/a/../../b",
        "/%2e%2e/x",
        "relative",
        "/a b",
        "/a\tb",
        "/a\x00",
    ],
)
def test_ambiguous_paths_are_refused(raw: str) -> None:
    with pytest.raises(InvalidRequest):
        normalise(raw)


def test_segments() -> None:
    assert segments("/") == [""]
    assert segments("/a") == ["a"]
    assert segments("/a/") == ["a", ""]
