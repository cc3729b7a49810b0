"""The route templater (agent/routes.py): tricky paths, the cap, configured rules, the cache."""

from __future__ import annotations

import uuid

import pytest
from nodemesh.agent.routes import (
    DEFAULT_ROUTE,
    OTHER_ROUTE,
    RouteRule,
    RouteTable,
    RouteTables,
    auto_route,
    template_path,
)


@pytest.mark.parametrize(("target", "route"), [
    ("/", "GET /"),
    ("/api/list", "GET /api/list"),
    ("/api/users/42/orders", "GET /api/users/{id}/orders"),
    ("/api/users/42/orders?limit=10&page=3", "GET /api/users/{id}/orders"),
    ("/api/users/42#frag", "GET /api/users/{id}"),
    ("/api/v1/items/1234567890123", "GET /api/v1/items/{id}"),
    ("/v2/things", "GET /v2/things"),
    ("/users/3f2504e0-4f89-11d3-9a0c-0305e82c3301/avatar", "GET /users/{uuid}/avatar"),
    ("/users/3F2504E0-4F89-11D3-9A0C-0305E82C3301", "GET /users/{uuid}"),
    ("/blobs/sha256/e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "GET /blobs/sha256/{hash}"),
    ("/commit/a1b2c3d", "GET /commit/{hash}"),
    ("/objects/507f1f77bcf86cd799439011", "GET /objects/{hash}"),
    ("/reports/2024-01-31", "GET /reports/{date}"),
    ("/reports/2024-01", "GET /reports/{date}"),
    ("/events/2024-01-31T10:00:00Z/x", "GET /events/{date}/x"),
    ("/events/2024-01-31T10:00:00.123+02:00", "GET /events/{date}"),
    ("/reset/aZ3kP9qLmX2vB7nR4tY8wE", "GET /reset/{token}"),
    ("/s/eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N", "GET /s/{token}"),
    ("/users/jane.doe@example.com/settings", "GET /users/{email}/settings"),
    ("/files/42.json", "GET /files/{id}.json"),
    ("/files/readme.txt", "GET /files/readme.txt"),
    ("/cart;jsessionid=ABC123DEF456", "GET /cart"),
    ("/api/getUserPreferences", "GET /api/getUserPreferences"),          # camelCase words stay
    ("/docs/api-v2-documentation", "GET /docs/api-v2-documentation"),   # a slug with one digit stays
    ("/r/order_2024_summary_report", "GET /r/order_2024_summary_report"),
    ("/feed/deadbeef", "GET /feed/deadbeef"),                             # hex letters only: a word
    ("/a//b/", "GET /a//b/"),
    ("http://web-svc.emojivoto/api/vote?choice=:joy:", "GET /api/vote"),  # absolute-form (proxies)
    ("http://web-svc.emojivoto", "GET /"),
    ("/api/²³", "GET /api/²³"),                                           # unicode digits are not ids
])
def test_routes_http_paths_are_templated(target: str, route: str) -> None:
    assert auto_route("GET", target, grpc=False) == route


def test_routes_methods_prefix_and_unknown_methods_fold() -> None:
    assert auto_route("POST", "/api/vote", False) == "POST /api/vote"
    assert auto_route("DELETE", "/items/9", False) == "DELETE /items/{id}"
    assert auto_route("PROPFIND", "/dav/x", False) == "OTHER /dav/x"
    assert auto_route("XYZ\x00", "/a", False) == "OTHER /a"


def test_routes_grpc_is_the_method_path_exactly() -> None:
    path = "/emojivoto.v1.VotingService/VoteDoughnut"
    assert auto_route("POST", path, grpc=True) == path
    # the same path over plain HTTP is templated like any path (it has no data in it)
    assert auto_route("POST", path, grpc=False) == "POST " + path
    # a gRPC request whose path is not /service/method is templated, never taken as is
    assert auto_route("POST", "/a/b/123", grpc=True) == "POST /a/b/{id}"


@pytest.mark.parametrize("target", ["*", "web-svc:443", "", "garbage", "?x=1"])
def test_routes_targets_without_a_path_are_default(target: str) -> None:
    assert auto_route("OPTIONS", target, False) == DEFAULT_ROUTE


def test_routes_overlong_route_is_other() -> None:
    assert auto_route("GET", "/" + "word/" * 100, False) == OTHER_ROUTE


def test_routes_template_path_keeps_segments_count() -> None:
    assert template_path("/a/1/b/2/c") == "/a/{id}/b/{id}/c"


def test_routes_cap_folds_new_routes_into_other_and_counts() -> None:
    table = RouteTable(max_routes=3)
    names = [table.route("GET", f"/section{i}/x", False) for i in range(5)]
    assert names[:3] == ["GET /section0/x", "GET /section1/x", "GET /section2/x"]
    assert names[3:] == [OTHER_ROUTE, OTHER_ROUTE]
    assert len(table.routes) == 3
    assert table.overflowed == 2
    # known routes still resolve, and the templated id path does not take a new place
    assert table.route("GET", "/section1/x?q=2", False) == "GET /section1/x"
    assert table.route("GET", "/section4/x", False) == OTHER_ROUTE  # cached decision
    assert table.overflowed == 3
    # [DEFAULT] never takes a place under the cap
    assert table.route("CONNECT", "host:443", False) == DEFAULT_ROUTE


def test_routes_ten_thousand_ids_make_one_route_and_a_bounded_cache() -> None:
    table = RouteTable(max_routes=100, cache_size=512)
    seen = {table.route("GET", f"/api/users/{i}/orders?i={i}", False) for i in range(10_000)}
    seen |= {table.route("GET", f"/api/items/{uuid.uuid4()}", False) for _ in range(1000)}
    assert seen == {"GET /api/users/{id}/orders", "GET /api/items/{uuid}"}
    assert len(table.cache) <= 512
    assert table.overflowed == 0


def test_routes_user_data_in_a_path_cannot_pass_the_cap() -> None:
    table = RouteTable(max_routes=100)
    names = {table.route("GET", f"/u/{w}x{w}", False) for w in ("alpha", "beta", "gamma") * 1}
    names |= {table.route("GET", f"/search/term{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}q", False)
              for i in range(5000)}
    assert len(names - {OTHER_ROUTE}) == 100
    assert OTHER_ROUTE in names


def test_routes_configured_rules_win_and_unmatched_requests_are_templated() -> None:
    rules = (
        RouteRule(name="vote", method="POST", path="/api/vote", path_type="exact"),
        RouteRule(name="users", path="/api/users", path_type="prefix"),
        RouteRule(name="by-regex", path=r"/r/\d+", path_type="regex"),
        RouteRule(name="doughnut", grpc_only=True, grpc_service="emojivoto.v1.VotingService",
                  grpc_method="VoteDoughnut"),
        RouteRule(name="broken", path="(", path_type="regex"),
    )
    table = RouteTable(rules=rules)
    assert table.route("POST", "/api/vote?choice=x", False) == "vote"
    assert table.route("GET", "/api/vote", False) == "GET /api/vote"   # method differs
    assert table.route("GET", "/api/users/7", False) == "users"
    assert table.route("GET", "/api/users", False) == "users"
    assert table.route("GET", "/api/usersX", False) == "GET /api/usersX"  # prefix is per segment
    assert table.route("GET", "/r/123", False) == "by-regex"
    assert table.route("POST", "/emojivoto.v1.VotingService/VoteDoughnut", True) == "doughnut"
    assert table.route("POST", "/emojivoto.v1.VotingService/VoteJoy", True) == \
        "/emojivoto.v1.VotingService/VoteJoy"
    # new rules clear what the cache decided under the old ones
    table.configure(())
    assert table.route("POST", "/api/vote?choice=x", False) == "POST /api/vote"


def test_routes_tables_per_destination_workload_and_unknown_share_one() -> None:
    tables = RouteTables(max_routes=2)
    web = tables.table("emojivoto", "deployment", "web")
    assert tables.table("emojivoto", "deployment", "web") is web
    assert tables.table("emojivoto", "deployment", "voting") is not web
    assert tables.table("", "unknown", "10.0.0.1") is tables.table("", "unknown", "10.0.0.2")
    tables.configure({("emojivoto", "deployment", "web"): (RouteRule(name="all"),)})
    assert web.route("GET", "/x", False) == "all"
    assert tables.table("emojivoto", "deployment", "voting").route("GET", "/x", False) == "GET /x"
    tables.reset()
    assert tables.table("emojivoto", "deployment", "web") is not web
    assert tables.table("emojivoto", "deployment", "web").route("GET", "/x", False) == "all"
