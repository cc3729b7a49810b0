"""Review regressions: user mistakes the CLI let through to the controller."""

from __future__ import annotations

import pytest
from nodemesh.cli.client import CliError
from nodemesh.cli.query import build_tap_request


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_cli_review_tap_max_rps_must_be_a_finite_positive_number(value: float) -> None:
    # nan passed `max_rps <= 0` and the controller silently used its default; inf disabled the limit.
    with pytest.raises(CliError, match="--max-rps must be positive"):
        build_tap_request(["deploy/web"], max_rps=value)
