"""Query parameters -> values or a 4xx ApiError with a clear message (pure, no server)."""

from __future__ import annotations

import pytest
from nodemesh.controlplane.dashboard.params import (
    ApiError,
    check_keys,
    parse_bool,
    parse_tap_filter,
    parse_types,
    parse_window,
)


@pytest.mark.parametrize("text,seconds", [("10s", 10), ("1m", 60), ("90s", 90), ("1m30s", 90), ("0.5m", 30),
                                          ("1h", 3600), ("60", 60), (None, 60), ("", 60), (" 5m ", 300)])
def test_dashboard_window_ok(text: str | None, seconds: int) -> None:
    assert parse_window(text) == seconds


@pytest.mark.parametrize("text,message", [("9s", "too short"), ("2h", "too long: the maximum is 1h"),
                                          ("3601", "too long"), ("1x", "invalid time window"),
                                          ("m1", "invalid time window"), ("-10s", "invalid time window")])
def test_dashboard_window_bad(text: str, message: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_window(text)
    assert err.value.status == 400 and message in err.value.message


def test_dashboard_types_bools_and_keys() -> None:
    assert parse_types("deploy,sts,deployments") == ["deployment", "statefulset"]
    with pytest.raises(ApiError, match="unknown resource type 'widget'"):
        parse_types("deploy,widget")
    assert parse_bool("TRUE", "x") and not parse_bool(None, "x")
    with pytest.raises(ApiError, match="invalid x 'sure'"):
        parse_bool("sure", "x")
    check_keys({"type": "deploy"}, ("type",))
    with pytest.raises(ApiError, match="unknown parameter 'tpye'"):
        check_keys({"tpye": "deploy"}, ("type",))


def test_dashboard_tap_filter_as_the_cli() -> None:
    flt = parse_tap_filter({"namespace": "emojivoto", "type": "deploy", "name": "web", "method": "post",
                            "path": "/api", "authority": "web-svc:8080", "to": "deploy/emoji",
                            "to_namespace": "other", "scheme": "HTTP", "max_rps": "5"}, 100)
    assert (flt.target.namespace, flt.target.type, flt.target.name) == ("emojivoto", "deployment", "web")
    assert (flt.method, flt.path_prefix, flt.authority, flt.scheme, flt.max_rps) == (
        "POST", "/api", "web-svc:8080", "http", 5)
    assert (flt.to.namespace, flt.to.type, flt.to.name) == ("other", "deployment", "emoji")
    # No max_rps: the controller's limit; more than it: capped to it.
    assert parse_tap_filter({"type": "deploy"}, 100).max_rps == 100
    assert parse_tap_filter({"type": "deploy", "max_rps": "1e6"}, 100).max_rps == 100
    for query, message in (({"type": "deploy", "method": "GE T"}, "invalid method"),
                           ({"type": "deploy", "max_rps": "-1"}, "must be positive"),
                           ({"type": "deploy", "max_rps": "fast"}, "invalid max_rps"),
                           ({"type": "deploy", "scheme": "ftp"}, "expected http or https"),
                           ({"type": "deploy", "to_namespace": "x"}, "to_namespace needs to"),
                           ({"type": "deploy", "to": "all"}, "'all' is not a valid resource for to"),
                           ({}, "missing parameter 'type'")):
        with pytest.raises(ApiError, match=message):
            parse_tap_filter(query, 100)
