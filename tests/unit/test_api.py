import filecmp
import tempfile
from pathlib import Path

import pytest
from nodemesh.api import generate
from nodemesh.api.model import Selector, SelectorError, parse_selector


@pytest.mark.parametrize(
    "text,expected",
    [
        ("deploy/web", Selector("deployment", "web")),
        ("deployments", Selector("deployment", "")),
        ("po/voting-7d9f", Selector("pod", "voting-7d9f")),
        ("ns/emojivoto", Selector("namespace", "emojivoto")),
        ("svc", Selector("service", "")),
        ("all", Selector("all", "")),
    ],
)
def test_parse_selector(text: str, expected: Selector) -> None:
    assert parse_selector(text) == expected


@pytest.mark.parametrize("text", ["", "bogus/web", "deploy/", "a/b/c", "all/x"])
def test_parse_selector_rejects(text: str) -> None:
    with pytest.raises(SelectorError):
        parse_selector(text)


def test_generated_code_matches_proto() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        generate.generate(Path(tmp))
        for fresh in Path(tmp).iterdir():
            committed = generate.GEN_DIR / fresh.name
            assert committed.exists(), f"{committed} missing: run python -m nodemesh.api.generate"
            assert filecmp.cmp(fresh, committed, shallow=False), (
                f"{committed.name} is stale: run python -m nodemesh.api.generate"
            )
