"""One check per input, in api/, called by the CLI, the dashboard and the controller (the authority).

Label selectors (api/labelselector.py): the CLI and the controller used to parse `-l` with two
regexes that disagreed (`env in(a,b)` passed the CLI and failed the controller; `-x=y` the other way
round). Cases follow apimachinery's labels.Parse: what it accepts, what it refuses, what each
requirement matches. Tap filter fields (api/tapfilter.py): the controller checked neither method
nor path.
"""

from __future__ import annotations

import re

import pytest
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.labelselector import LabelSelectorError, Requirement, parse
from nodemesh.api.tapfilter import TapFilterError, check_fields
from nodemesh.cli.client import CliError
from nodemesh.cli.query import build_tap_request, check_label_selector
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.controller import Controller
from nodemesh.controlplane.stat import StatError, parse_label_selector

ACCEPTED = [
    ("app", [Requirement("app", "exists")]),
    ("!app", [Requirement("app", "!exists")]),
    ("app=web", [Requirement("app", "=", ("web",))]),
    ("app==web", [Requirement("app", "=", ("web",))]),
    ("app!=web", [Requirement("app", "!=", ("web",))]),
    ("app=", [Requirement("app", "=", ("",))]),
    ("app==", [Requirement("app", "=", ("",))]),
    ("env in(a,b)", [Requirement("env", "in", ("a", "b"))]),
    ("env in ( a , b )", [Requirement("env", "in", ("a", "b"))]),
    ("env notin (a)", [Requirement("env", "notin", ("a",))]),
    ("env in (a,)", [Requirement("env", "in", ("a", ""))]),
    ("a.b/c-d==x_y", [Requirement("a.b/c-d", "=", ("x_y",))]),
    ("replicas>2", [Requirement("replicas", ">", ("2",))]),
    ("replicas<10", [Requirement("replicas", "<", ("10",))]),
    ("app=web, !legacy ,tier in (fe,be)", [Requirement("app", "=", ("web",)), Requirement("legacy", "!exists"),
                                           Requirement("tier", "in", ("fe", "be"))]),
    ("", []),
]

REFUSED = [
    ("-x=y", "invalid label key '-x'"),
    ("=web", "found '=', expected: a label key or '!'"),
    ("app in (a", "found the end, expected: a value, ',' or ')'"),
    ("((", "found '(', expected: a label key or '!'"),
    ("app in ()", "'in' needs at least one value"),
    ("app in a", "expected: '(' after 'in'"),
    ("x>y", "'>' needs an integer value"),
    ("a b", "expected: in, notin, =, ==, !=, >, <"),
    ("a=b=c", "found '=', expected: ',' or the end"),
    ("a,", "found the end, expected: a label key or '!'"),
    ("!", "expected: a label key after '!'"),
    ("Example.com/x=y", "the prefix must be a DNS subdomain"),
    ("app=" + "v" * 64, "invalid label value"),
    ("app=-web", "invalid label value '-web'"),
]


@pytest.mark.parametrize(("text", "want"), ACCEPTED)
def test_api_labelselector_accepts_what_kubernetes_accepts(text: str, want: list[Requirement]) -> None:
    assert parse(text) == want
    assert parse_label_selector(text) == want          # the controller: the same parse
    assert check_label_selector(text) == text.strip()  # the CLI lets it through unchanged


@pytest.mark.parametrize(("text", "message"), REFUSED)
def test_api_labelselector_refuses_with_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(LabelSelectorError, match="^invalid label selector .*" + re.escape(message)):
        parse(text)
    with pytest.raises(StatError, match=re.escape(message)):
        parse_label_selector(text)
    with pytest.raises(CliError, match=re.escape(message)):
        check_label_selector(text)


@pytest.mark.parametrize(("text", "labels", "matches"), [
    ("app=web", {"app": "web"}, True),
    ("app=web", {"app": "api"}, False),
    ("app!=web", {}, True),                 # absent keys match != and notin, as in Kubernetes
    ("env notin (a,b)", {"env": "a"}, False),
    ("env notin (a,b)", {}, True),
    ("env in (a,b)", {}, False),
    ("app", {"app": ""}, True),
    ("!app", {"app": ""}, False),
    ("app=", {"app": ""}, True),
    ("replicas>2", {"replicas": "3"}, True),
    ("replicas>2", {"replicas": "2"}, False),
    ("replicas>2", {"replicas": "many"}, False),
    ("replicas<2", {}, False),
])
def test_api_labelselector_matches(text: str, labels: dict[str, str], matches: bool) -> None:
    assert all(r.matches(labels) for r in parse(text)) is matches


# ---------------------------------------------------------------------------- tap filter fields

@pytest.mark.parametrize(("fields", "message"), [
    ({"method": "GE T"}, "invalid method 'GE T'"),
    ({"path_prefix": "api"}, "invalid path 'api': a path prefix starts with '/'"),
    ({"scheme": "ftp"}, "invalid scheme 'ftp'"),
    ({"max_rps": -1.0}, "max_rps must be positive"),
    ({"max_rps": float("nan")}, "max_rps must be positive"),
])
def test_api_tapfilter_the_controller_refuses_what_the_cli_refuses(fields: dict, message: str) -> None:
    """The controller used to check neither method nor path: a filter sent by any client is checked."""
    flt = pb.TapFilter(target=pb.Resource(namespace="emojivoto", type="namespace", name="emojivoto"), **fields)
    with pytest.raises(TapFilterError, match=re.escape(message)):
        check_fields(pb.TapFilter(**fields))
    with pytest.raises(StatError, match=re.escape(message)):
        Controller(ControllerConfig()).validate_tap(flt)
    cli = {"method": "method", "path_prefix": "path", "scheme": "scheme"}
    if set(fields) <= set(cli):
        flag = {cli[k]: v for k, v in fields.items()}
        with pytest.raises(CliError, match=re.escape(message.replace("invalid ", "invalid --", 1))):
            build_tap_request(["ns/emojivoto"], **flag)


def test_api_tapfilter_accepts_method_tokens_and_normalises() -> None:
    flt = check_fields(pb.TapFilter(method="m-search", scheme="HTTPS", path_prefix="/x"))
    assert (flt.method, flt.scheme, flt.path_prefix) == ("M-SEARCH", "https", "/x")
