"""Regression check on the HTTP/1.1 hot path's cost, by count, not time (issue 18).

`tests/bench/http1_micro.py` feeds Http1Mode a keep-alive request and its response (5+5 headers)
through the real WorkerTelemetry and counts Python and C calls per request with sys.setprofile.
Counts do not depend on machine load, so they can be asserted: a change that adds work per request
shows here. The ceilings are the counts measured when they were set (docs/bench.md "Hot path
steps"); lower them when a step wins, raise them only with a reason written there.
"""

from __future__ import annotations

import uvloop
from benchmods import load_bench

NO_TAP_PY, NO_TAP_C = 27, 37     # no tap open: headers neither decoded nor collected
TAP_PY_MAX = 39                  # a tap open (matching no request): every header collected
RELAY_PY = 23                    # end to end on loopback, from the transports' callbacks on


def test_calls_per_request_without_a_tap() -> None:
    bench = load_bench("http1_micro")
    mode = bench.setup(tap=False)
    bench.count_calls(mode, 10)                 # warm: first request, caches
    counts = bench.count_calls(mode, 200)
    assert round(counts["py_calls"]) <= NO_TAP_PY, counts   # (sys.setprofile itself: 1 per run)
    assert round(counts["c_calls"]) <= NO_TAP_C, counts


def test_calls_per_request_with_a_tap_open_still_collect_headers() -> None:
    bench = load_bench("http1_micro")
    mode = bench.setup(tap=True)
    bench.count_calls(mode, 10)
    counts = bench.count_calls(mode, 200)
    # More than without (the headers are decoded, 10 on_header calls at least), bounded above.
    assert NO_TAP_PY < round(counts["py_calls"]) <= TAP_PY_MAX, counts


def test_agent_calls_per_request_through_the_relay() -> None:
    # tests/bench/http1_relay_calls.py: a real loopback connection (relay, HTTP/1 readers, mode,
    # telemetry), counting only the agent's own functions; the relay's share shows here only.
    counts = uvloop.run(load_bench("http1_relay_calls").measure(200))
    assert counts["agent_py_calls_per_request"] <= RELAY_PY, counts
