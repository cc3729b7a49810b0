"""Flags and selectors -> StatRequest / EdgesRequest / TapRequest, without any server."""

from __future__ import annotations

import pytest
from nodemesh.cli.client import CliError
from nodemesh.cli.query import (
    build_edges_request,
    build_stat_requests,
    build_tap_request,
    check_label_selector,
    parse_resources,
    parse_window,
)


@pytest.mark.parametrize(("text", "seconds"), [
    ("10s", 10), ("1m", 60), ("90s", 90), ("1m30s", 90), ("1h", 3600), ("0.5m", 30), ("15m", 900)])
def test_cli_query_window_ok(text: str, seconds: int) -> None:
    assert parse_window(text) == seconds


@pytest.mark.parametrize(("text", "message"), [
    ("9s", "too short"), ("1h1s", "too long"), ("2h", "too long"), ("60", "invalid time window"),
    ("1x", "invalid time window"), ("", "invalid time window"), ("m1", "invalid time window"),
    ("1m 5s", "invalid time window")])
def test_cli_query_window_bad(text: str, message: str) -> None:
    with pytest.raises(CliError, match=message):
        parse_window(text)


def test_cli_query_resource_forms() -> None:
    assert [str(s) for s in parse_resources(["deployments"])] == ["deploy"]
    assert [str(s) for s in parse_resources(["deploy", "web", "emoji"])] == ["deploy/web", "deploy/emoji"]
    assert [str(s) for s in parse_resources(["deploy/web", "po/x"])] == ["deploy/web", "po/x"]
    for bad, message in [
        ([], "must specify"), (["foo"], "unknown resource type 'foo'"), (["deploy/"], "empty name"),
        (["deploy/a/b"], "invalid resource selector"), (["deploy", "po/x"], "no need"),
        (["deploy/a", "web"], "mixed arguments"), (["all", "x"], "takes no names"),
    ]:
        with pytest.raises(CliError, match=message):
            parse_resources(bad)


def test_cli_query_stat_request_fields() -> None:
    [req] = build_stat_requests(["deploy/web"], namespace="emojivoto", to="svc/emoji-svc", to_namespace="other",
                                window="10m", label_selector="app=web,tier in (a, b)")
    assert (req.selector.namespace, req.selector.type, req.selector.name) == ("emojivoto", "deployment", "web")
    assert (req.to.namespace, req.to.type, req.to.name) == ("other", "service", "emoji-svc")
    assert not req.HasField("from")
    assert req.window_seconds == 600 and req.label_selector == "app=web,tier in (a, b)"
    assert not req.all_namespaces


def test_cli_query_stat_from_defaults_to_namespace_and_all_namespaces() -> None:
    [req] = build_stat_requests(["po"], namespace="emojivoto", all_namespaces=True, from_="deploy/web")
    src = getattr(req, "from")
    assert (src.namespace, src.type, src.name) == ("emojivoto", "deployment", "web")
    assert req.all_namespaces and req.selector.namespace == "" and req.window_seconds == 60


def test_cli_query_stat_namespace_rows_have_no_namespace() -> None:
    [req] = build_stat_requests(["ns/emojivoto"], namespace="default")
    assert (req.selector.namespace, req.selector.type, req.selector.name) == ("", "namespace", "emojivoto")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"from_": "deploy/a", "to": "deploy/b"}, "mutually exclusive"),
    ({"from_namespace": "x"}, "needs --from"),
    ({"to_namespace": "x"}, "needs --to"),
    ({"from_": "all"}, "does not accept 'all'"),
    ({"from_": "bogus/x"}, "unknown resource type"),
    ({"label_selector": "app=="}, None),
    ({"label_selector": "=web"}, "invalid label selector"),
    ({"label_selector": "app in (a"}, "invalid label selector"),
    ({"window": "5s"}, "too short"),
])
def test_cli_query_stat_bad_flags(kwargs: dict, message: str | None) -> None:
    if message is None:  # `app==` is valid kubectl syntax (empty value)
        build_stat_requests(["deploy"], **kwargs)
        return
    with pytest.raises(CliError, match=message):
        build_stat_requests(["deploy"], **kwargs)


def test_cli_query_stat_all_with_from_is_refused() -> None:
    with pytest.raises(CliError, match="'all' cannot be combined with --from or --to"):
        build_stat_requests(["all"], from_="deploy/web")


@pytest.mark.parametrize("sel", ["app", "!app", "app=web", "app!=web", "a.b/c-d==x_y", "env notin (a,b)",
                                 "app=web,!legacy"])
def test_cli_query_label_selector_valid(sel: str) -> None:
    assert check_label_selector(sel) == sel


def test_cli_query_tap_request() -> None:
    req = build_tap_request(["po/web-1"], namespace="ns1", method="post", path="/a", scheme="HTTPS",
                            authority="x:80", max_rps=2.5)
    f = req.filter
    assert (f.target.namespace, f.target.type, f.target.name) == ("ns1", "pod", "web-1")
    assert (f.method, f.path_prefix, f.scheme, f.authority, f.max_rps) == ("POST", "/a", "https", "x:80", 2.5)
    assert not f.HasField("to")
    assert build_tap_request(["deploy"]).filter.max_rps == 100


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    (["all"], {}, "tap does not accept 'all'"),
    (["deploy/a", "deploy/b"], {}, "one resource"),
    (["deploy"], {"max_rps": 0}, "--max-rps must be positive"),
    (["deploy"], {"path": "api"}, "starts with '/'"),
    (["deploy"], {"scheme": "ftp"}, "expected http or https"),
    (["deploy"], {"method": "GE T"}, "invalid --method"),
    (["deploy"], {"to_namespace": "x"}, "needs --to"),
])
def test_cli_query_tap_bad(args: list[str], kwargs: dict, message: str) -> None:
    with pytest.raises(CliError, match=message):
        build_tap_request(args, **kwargs)


def test_cli_query_edges_request() -> None:
    req = build_edges_request("po", namespace="x", window="30s")
    assert (req.selector.type, req.selector.namespace, req.window_seconds) == ("pod", "x", 30)
    with pytest.raises(CliError, match="not 'all'"):
        build_edges_request("all")
    with pytest.raises(CliError, match="resource type only"):
        build_edges_request("deploy/web")
