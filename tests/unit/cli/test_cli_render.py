"""Number and address formats shared by every output."""

from __future__ import annotations

import pytest
from nodemesh.cli.render import (
    Column,
    fmt_ms,
    fmt_percent,
    fmt_rps,
    format_addr,
    format_table,
    go_duration,
    grpc_code_name,
)


@pytest.mark.parametrize(("us", "text"), [
    (0, "0µs"), (523, "523µs"), (999, "999µs"), (1000, "1ms"), (12_400, "12ms"), (999_499, "999ms"),
    (1_600_000, "2s"), (90_000_000, "1m30s"), (3_723_000_000, "1h2m3s")])
def test_cli_render_go_duration(us: int, text: str) -> None:
    assert go_duration(us) == text


def test_cli_render_numbers() -> None:
    assert (fmt_ms(0), fmt_ms(0.44), fmt_ms(1.4), fmt_ms(9.6), fmt_ms(950)) == ("0ms", "0.4ms", "1ms", "10ms",
                                                                                "950ms")
    assert (fmt_percent(1), fmt_percent(0.99501), fmt_percent(None)) == ("100.00%", "99.50%", "-")
    assert fmt_rps(2.05) in ("2.0rps", "2.1rps") and fmt_rps(0) == "0.0rps"


def test_cli_render_addresses_and_codes() -> None:
    assert format_addr("10.0.0.1", 80) == "10.0.0.1:80"
    assert format_addr("fd00::1", 8080) == "[fd00::1]:8080"
    assert format_addr("not-an-ip", 1) == "not-an-ip:1"
    assert [grpc_code_name(c) for c in (0, 1, 14, 16, 17, 666)] == [
        "OK", "Canceled", "Unavailable", "Unauthenticated", "Code(17)", "Code(666)"]


def test_cli_render_table_alignment() -> None:
    out = format_table([Column("NAME"), Column("N", right=True)], [["a", "1"], ["long-name", "100"]])
    assert out == "NAME          N\na             1\nlong-name   100\n"
