"""The shared bits: durations, key=value logs, gRPC server options."""

from __future__ import annotations

import io

import pytest
from nodemesh.demo.emojivoto.runtime import ConfigError, Logger, parse_duration


@pytest.mark.parametrize("text,seconds", [("250ms", 0.25), ("5s", 5.0), ("1m", 60.0), ("2", 2.0),
                                          ("1.5s", 1.5), (" 10ms ", 0.01), ("1h", 3600.0)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "5 sec", "-1s", "1d"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


def test_logger_writes_one_key_value_line_per_event_and_respects_level() -> None:
    out = io.StringIO()
    log = Logger("web", "info", stream=out)
    log.debug("hidden", x=1)
    log.info("listening", port=8080, addr="0.0.0.0", note='say "hi" now', rate=0.123456)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("ts=") and " level=info app=web event=listening port=8080 addr=0.0.0.0 " in line
    assert line.endswith(' note="say \\"hi\\" now" rate=0.1235')
