"""RouteTable: prefix -> service on path-segment boundaries, longest prefix first."""

from __future__ import annotations

import pytest

from gateway_breaker import RouteTable


@pytest.mark.parametrize("path", ["/sona", "/sona/", "/sona/x", "/sona/x/y/z", "/sona//x"])
def test_prefix_matches_itself_and_paths_below_it(path: str) -> None:
    assert RouteTable({"/sona": "sona"}).match(path) == "sona"


@pytest.mark.parametrize("path", ["/sonar", "/sonar/x", "/son", "/", "/Sona", "/x/sona", "/sona.x"])
def test_prefix_never_matches_across_a_segment_boundary(path: str) -> None:
    assert RouteTable({"/sona": "sona"}).match(path) is None


def test_discoveryx_is_not_discovery() -> None:
    table = RouteTable({"/discovery": "discovery"})
    assert table.match("/discoveryx") is None
    assert table.match("/discoveryx/health") is None
    assert table.match("/discovery/health") == "discovery"


def test_longest_prefix_wins() -> None:
    table = RouteTable({"/api": "api", "/api/v2": "v2", "/api/v2/users": "users"})
    assert table.match("/api") == "api"
    assert table.match("/api/v1/things") == "api"
    assert table.match("/api/v2") == "v2"
    assert table.match("/api/v2/") == "v2"
    assert table.match("/api/v2/items") == "v2"
    assert table.match("/api/v2x") == "api"
    assert table.match("/api/v2/users") == "users"
    assert table.match("/api/v2/users/7") == "users"
    assert table.match("/api/v2/usersx") == "v2"
    assert table.match("/apix") is None


def test_longest_prefix_wins_whatever_the_insertion_order() -> None:
    table = RouteTable({"/api/v2/users": "users", "/api/v2": "v2", "/api": "api"})
    assert table.match("/api/v2/users/7") == "users"
    assert table.match("/api/v2/items") == "v2"
    assert table.match("/api/other") == "api"


def test_deep_prefix_alone_does_not_match_shallower_paths() -> None:
    table = RouteTable({"/a/b/c": "deep"})
    assert table.match("/a") is None
    assert table.match("/a/b") is None
    assert table.match("/a/b/c") == "deep"
    assert table.match("/a/b/c/d/e/f") == "deep"


def test_root_prefix_catches_everything_else() -> None:
    table = RouteTable({"/": "root", "/sona": "sona"})
    assert table.match("/") == "root"
    assert table.match("/sonar") == "root"
    assert table.match("/anything/at/all") == "root"
    assert table.match("/sona/x") == "sona"


def test_root_prefix_alone() -> None:
    table = RouteTable({"/": "root"})
    assert table.match("/") == "root"
    assert table.match("/x/y") == "root"


def test_trailing_slash_in_a_prefix_is_ignored() -> None:
    table = RouteTable({"/sona/": "sona"})
    assert table.match("/sona") == "sona"
    assert table.match("/sona/x") == "sona"
    assert table.match("/sonar") is None


@pytest.mark.parametrize("path", ["/", "/other", "/other/sona", ""])
def test_unmatched_paths_give_none(path: str) -> None:
    table = RouteTable({"/sona": "sona", "/api/v2": "v2"})
    assert table.match(path) is None


def test_empty_table_matches_nothing() -> None:
    table = RouteTable({})
    assert len(table) == 0
    assert table.match("/anything") is None
    assert table.services() == set()


def test_services_and_len() -> None:
    table = RouteTable({"/": "root", "/a": "a", "/b": "b", "/c": "a"})
    assert len(table) == 4
    assert table.services() == {"root", "a", "b"}


@pytest.mark.parametrize("prefix", ["sona", "", "api/v2"])
def test_prefix_must_start_with_a_slash(prefix: str) -> None:
    with pytest.raises(ValueError, match="must start with '/'"):
        RouteTable({prefix: "svc"})


def test_special_characters_are_matched_literally() -> None:
    table = RouteTable({"/caf%C3%A9": "pct", "/café": "utf8", "/a..b": "dots"})
    assert table.match("/caf%C3%A9/menu") == "pct"
    assert table.match("/café/menu") == "utf8"
    assert table.match("/cafe") is None
    assert table.match("/a..b/x") == "dots"
    assert table.match("/a..bx") is None
