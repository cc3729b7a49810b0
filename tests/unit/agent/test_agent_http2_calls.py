"""Regression check on the HTTP/2 (gRPC unary) hot path's cost, by count, not time (issue 18).

`tests/bench/http2_micro.py` feeds Http2Mode gRPC unary calls as grpcio writes them in steady state
(one read per direction per call: HEADERS + WINDOW_UPDATE + DATA + WINDOW_UPDATE from the client,
HEADERS + DATA + trailers + WINDOW_UPDATE from the server) through the real WorkerTelemetry and
counts Python and C calls per call with sys.setprofile. Counts do not depend on machine load, so
they can be asserted: a change that adds work per call shows here. The ceilings are the counts
measured when they were set (docs/bench.md "HTTP/2 and gRPC steps"); lower them when a step wins,
raise them only with a reason written there.
"""

from __future__ import annotations

from benchmods import load_bench

PY_CALLS, C_CALLS = 26, 40   # per gRPC unary call, the bench's two calls into Http2Mode included


def test_calls_per_grpc_unary_call() -> None:
    bench = load_bench("http2_micro")
    mode, calls = bench.setup()
    bench.count_calls(mode, calls, 10)               # warm: the first call fills the hpack cache
    counts = bench.count_calls(mode, calls, 200)
    assert round(counts["py_calls"]) <= PY_CALLS, counts
    assert round(counts["c_calls"]) <= C_CALLS, counts


def test_every_call_is_counted_once() -> None:
    """What the counts are of: each call is classified and reaches the metrics exactly once."""
    bench = load_bench("http2_micro")
    mode, calls = bench.setup()
    bench.count_calls(mode, calls, 50)
    metrics = mode.observer.metrics
    assert sum(metrics.request_total.values()) == 50
    (key, count), = metrics.response_total.items()
    assert count == 50
    assert key[-4:] == ("200", "0", "success", ""), key   # status, grpc-status from the trailers
    assert not mode.relay.streams   # every stream ended
