"""Route matching: host tiers, segment-boundary prefixes, no fall-through; round robin."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtlsproxy.relay.errors import BadRequest, RouteError
from mtlsproxy.relay.routing import (
    RoundRobin,
    Route,
    RouteTable,
    normalize_host,
    route_path,
)


def table(*specs: tuple[str | None, str]) -> RouteTable[str]:
    return RouteTable(
        Route(index=i, payload=f"{host}|{prefix}", host=host, path_prefix=prefix)
        for i, (host, prefix) in enumerate(specs)
    )


def hit(t: RouteTable[str], host: str | bytes | None, target: str | bytes) -> str | None:
    route = t.match(host, target)
    return route.payload if route else None


def test_prefix_matches_on_segment_boundary() -> None:
    t = table((None, "/api"), (None, "/static/"))
    assert hit(t, "a", "/api") == "None|/api"
    assert hit(t, "a", "/api/") == "None|/api"
    assert hit(t, "a", "/api/v1/x") == "None|/api"
    assert hit(t, "a", "/api?x=1") == "None|/api"
    assert hit(t, "a", "/apix") is None
    assert hit(t, "a", "/static/app.js") == "None|/static/"
    assert hit(t, "a", "/static") == "None|/static/"  # covers the path without its last /
    assert hit(t, "a", "/staticx") is None
    assert hit(t, "a", "/") is None


def test_longest_prefix_wins_regardless_of_order() -> None:
    t = table((None, "/"), (None, "/api/v1"), (None, "/api"))
    assert hit(t, "a", "/api/v1/users") == "None|/api/v1"
    assert hit(t, "a", "/api/v2") == "None|/api"
    assert hit(t, "a", "/other") == "None|/"
    assert hit(t, None, "/api/v10") == "None|/api"


def test_host_tiers_exact_then_longest_wildcard_then_any() -> None:
    t = table(
        (None, "/"),
        ("*.example.com", "/"),
        ("*.eu.example.com", "/"),
        ("api.example.com", "/"),
    )
    assert hit(t, "api.example.com", "/") == "api.example.com|/"
    assert hit(t, "API.Example.COM:8443", "/") == "api.example.com|/"
    assert hit(t, "api.example.com.", "/") == "api.example.com|/"
    assert hit(t, "x.example.com", "/") == "*.example.com|/"
    assert hit(t, "a.b.example.com", "/") == "*.example.com|/"  # one or more labels
    assert hit(t, "x.eu.example.com", "/") == "*.eu.example.com|/"
    assert hit(t, "eu.example.com", "/") == "*.example.com|/"
    assert hit(t, "example.com", "/") == "None|/"  # the wildcard needs a label
    assert hit(t, "badexample.com", "/") == "None|/"
    assert hit(t, None, "/") == "None|/"
    assert hit(t, b"x.example.com", b"/") == "*.example.com|/"


def test_no_fall_through_from_a_host_group() -> None:
    t = table((None, "/"), ("admin.example.com", "/admin"))
    assert hit(t, "admin.example.com", "/admin/users") == "admin.example.com|/admin"
    assert hit(t, "admin.example.com", "/") is None
    assert hit(t, "www.example.com", "/admin") == "None|/"


def test_no_route_at_all() -> None:
    t = table(("api.example.com", "/"))
    assert hit(t, "other.example.com", "/") is None
    assert hit(t, None, "/") is None
    assert RouteTable[str]([]).match("a", "/") is None


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/a/b?q=%2F", "/a/b"),
        ("/%61dmin", "/admin"),
        ("//admin///x", "/admin/x"),
        ("/a%2bb", "/a%2Bb"),
        ("/a%7E", "/a~"),
        ("*", "/"),
    ],
)
def test_route_path_normalisation(target: str, path: str) -> None:
    assert route_path(target) == path


def test_encoded_paths_cannot_dodge_a_narrower_route() -> None:
    t = table((None, "/"), (None, "/admin"))
    assert hit(t, "a", "/%61dmin/users") == "None|/admin"
    assert hit(t, "a", "//admin/users") == "None|/admin"
    # Express, ASP.NET and case-insensitive file systems serve /ADMIN as /admin.
    assert hit(t, "a", "/ADMIN") == "None|/admin"
    assert hit(t, "a", "/Admin/x") == "None|/admin"
    with pytest.raises(BadRequest, match="%2F"):
        hit(t, "a", "/admin%2Fusers")


@pytest.mark.parametrize(
    ("host", "normal"),
    [
        ("A.Example.com:443", "a.example.com"),
        ("a.example.com.", "a.example.com"),
        ("[::1]:8443", "[::1]"),
        ("[2001:DB8::1]", "[2001:db8::1]"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("", None),
        (None, None),
    ],
)
def test_normalize_host(host: str | None, normal: str | None) -> None:
    assert normalize_host(host) == normal


def test_ipv6_literal_route() -> None:
    t = table(("[::1]", "/"))
    assert hit(t, "[::1]:8443", "/x") == "[::1]|/"


@pytest.mark.parametrize(
    ("host", "prefix", "reason"),
    [
        ("api.example.com:443", "/", "not a host name"),
        ("*.", "/", "not a host name"),
        ("*.-bad-", "/", "not \\*\\.<domain>"),
        ("a.*.example.com", "/", "not a host name"),
        ("**.example.com", "/", "not a host name"),
        ("bad host", "/", "not a host name"),
        (None, "api", "must be a path"),
        (None, "/a?b", "must be a path"),
        (None, "/a/../b", "dot-segment"),
        (None, "/a;b", "path parameters"),
        (None, "/a%2Fb", "%2F"),
        (None, "//a", "is written '/a'"),
        (None, "/%61", "is written '/a'"),
    ],
)
def test_bad_routes_name_their_index(host: str | None, prefix: str, reason: str) -> None:
    with pytest.raises(RouteError, match=reason) as info:
        table((None, "/ok"), (host, prefix))
    assert info.value.index == 1


def test_duplicate_routes_are_refused() -> None:
    with pytest.raises(RouteError, match="same host and path_prefix as route 0") as info:
        table(("API.example.com", "/a"), ("api.example.com.", "/a"))
    with pytest.raises(RouteError, match="same host and path_prefix"):
        table((None, "/admin"), (None, "/Admin"))  # one route in a case-insensitive match
    assert info.value.index == 1
    with pytest.raises(RouteError):
        table((None, "/a"), ("*", "/a"))
    table(("*.example.com", "/a"), ("example.com", "/a"), (None, "/a"))


def test_round_robin_rotates() -> None:
    rr = RoundRobin(["a", "b", "c"])
    assert rr.order() == ["a", "b", "c"]
    assert rr.order() == ["b", "c", "a"]
    assert rr.order() == ["c", "a", "b"]
    assert rr.order() == ["a", "b", "c"]
    with pytest.raises(ValueError, match="at least one"):
        RoundRobin([])


@given(st.lists(st.integers(), min_size=1, max_size=6), st.integers(0, 20))
def test_round_robin_each_order_is_a_permutation_and_starts_fairly(
    items: list[int], calls: int
) -> None:
    rr = RoundRobin(items)
    firsts = []
    for _ in range(calls):
        order = rr.order()
        assert sorted(order) == sorted(items)
        firsts.append(order[0])
    if calls >= len(items):
        assert firsts[: len(items)] == items


_segment = st.from_regex(r"\A[a-z0-9]{1,4}\Z")
_path = st.lists(_segment, max_size=4).map(lambda s: "/" + "/".join(s))


@given(prefixes=st.lists(_path, min_size=1, max_size=6, unique=True), path=_path)
def test_match_is_the_longest_boundary_prefix(prefixes: list[str], path: str) -> None:
    t = table(*((None, p) for p in prefixes))
    candidates = [
        p for p in prefixes if p == path or path.startswith(p if p.endswith("/") else p + "/")
    ]
    expected = max(candidates, key=len) if candidates else None
    route = t.match("a", path)
    assert (route.path_prefix if route else None) == expected


def test_a_prefix_ending_in_a_slash_covers_the_bare_path() -> None:
    """Review finding: with `/admin/` strict and `/` broad, `/admin` went to `/`, and
    Express or koa (non-strict, their default) serve it from the `/admin/` handler."""
    t = table((None, "/"), (None, "/admin/"))
    assert hit(t, "a", "/admin") == "None|/admin/"
    assert hit(t, "a", "/admin/x") == "None|/admin/"
    assert hit(t, "a", "/adminx") == "None|/"
    with pytest.raises(RouteError, match="same host and path_prefix"):
        table((None, "/admin"), (None, "/admin/"))
