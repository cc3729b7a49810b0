"""Label selectors: Kubernetes' grammar, parsed once (api/labelselector.py) for CLI, dashboard and controller.

The CLI and the controller used to parse `-l` with two regexes that disagreed (`env in(a,b)` passed
the CLI and failed the controller; `-x=y` the other way round). Cases follow apimachinery's
labels.Parse: what it accepts, what it refuses, and what each requirement matches.
"""

from __future__ import annotations

import re

import pytest
from nodemesh.api.labelselector import LabelSelectorError, Requirement, parse
from nodemesh.cli.client import CliError
from nodemesh.cli.query import check_label_selector
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
