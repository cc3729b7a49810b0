"""Per-request CPU of the agent's HTTP/2 (gRPC unary) path, in-process: bytes in, observer events out.

    python3 tests/bench/http2_micro.py                      # the tree `nodemesh` imports from
    python3 tests/bench/http2_micro.py --trees OLD NEW      # two source trees, runs interleaved

The HTTP/2 counterpart of tests/bench/http1_micro.py. Each iteration feeds http2_relay.Http2Mode
one gRPC unary call as grpcio writes it in steady state (captured through a relay at 300 rps: the
client's read is HEADERS + WINDOW_UPDATE + DATA(END_STREAM) + WINDOW_UPDATE, the server's
HEADERS + DATA + HEADERS(trailers, END_STREAM) + WINDOW_UPDATE, one read per direction per call)
through the real WorkerTelemetry; header blocks are grpcio's (the same fields, hpack-encoded by one
encoder per direction, so after the first call every block is indexed and repeats byte for byte,
as grpcio's do). The transports are no-op writers: what is measured is the agent's Python work per
call (frame walk, header blocks, stream state, observer calls, metrics), not the wake-ups.

It also counts Python-level and C calls per call with sys.setprofile: counts do not depend on
load (tests/unit/agent/test_agent_http2_calls.py asserts them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import microkit  # beside this file: the line above finds it

REQUEST_HEADERS = [(":path", "/bench.Echo/Unary"), (":authority", "10.244.2.7:9090"), (":method", "POST"),
                   (":scheme", "http"), ("content-type", "application/grpc"), ("te", "trailers"),
                   ("grpc-accept-encoding", "identity, deflate, gzip"), ("grpc-timeout", "10S"),
                   ("user-agent", "grpc-python-asyncio/1.85.3 grpc-c/58.0.0 (linux; chttp2)")]
RESPONSE_HEADERS = [(":status", "200"), ("content-type", "application/grpc"),
                    ("grpc-accept-encoding", "identity, deflate, gzip")]
TRAILERS = [("grpc-status", "0"), ("grpc-message", "")]
MESSAGE = b"\x00" + struct.pack(">L", 64) + b"q" * 64    # a gRPC message: flag, length, 64 bytes
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">L", len(payload))[1:] + bytes((ftype, flags)) + struct.pack(">L", sid) + payload


class Calls:
    """The reads of a gRPC unary connection: the opening, then (client, server) per call."""

    def __init__(self) -> None:
        from hpack import Encoder
        self.enc_c, self.enc_s = Encoder(), Encoder()
        self.sid = -1
        self.opening = (PREFACE + _frame(4, 0, 0, b""), _frame(4, 0, 0, b"") + _frame(4, 1, 0, b""))

    def next(self) -> tuple[bytes, bytes]:
        self.sid += 2
        sid, wu = self.sid, _frame(8, 0, 0, struct.pack(">L", 69))
        client = (_frame(1, 0x4, sid, self.enc_c.encode(REQUEST_HEADERS)) + wu
                  + _frame(0, 0x1, sid, MESSAGE) + wu)
        server = (_frame(1, 0x4, sid, self.enc_s.encode(RESPONSE_HEADERS)) + _frame(0, 0, sid, MESSAGE)
                  + _frame(1, 0x5, sid, self.enc_s.encode(TRAILERS)) + wu)
        return client, server


def setup() -> tuple[Any, Calls]:
    """An Http2Mode on a fake connection (no-op transports) reporting to a real WorkerTelemetry."""
    from types import SimpleNamespace

    from nodemesh.agent.config import AgentConfig
    from nodemesh.agent.http2_relay import Http2Mode
    from nodemesh.agent.observe import ConnectionMeta
    from nodemesh.agent.telemetry import WorkerTelemetry

    tel = WorkerTelemetry(AgentConfig(node="node-1", workers=1))

    def write(data: bytes) -> None:
        pass

    conn = SimpleNamespace(
        observer=tel, send_upstream=write, send_client=write, write_client=write, close_both=lambda: None,
        read_bytes=0, write_bytes=0,
        obs=tel.connection_open(ConnectionMeta(1, "outbound", ("10.244.1.5", 41000), ("10.244.2.7", 9090),
                                               ("10.244.2.7", 9090), "http2", started=time.monotonic())))
    mode = Http2Mode(conn)  # type: ignore[arg-type]
    calls = Calls()
    mode.client_data(calls.opening[0])
    mode.upstream_data(calls.opening[1])
    return mode, calls


def one_run(n: int) -> dict[str, float]:
    mode, calls = setup()
    client, upstream = mode.client_data, mode.upstream_data
    for _ in range(2000):
        c, s = calls.next()
        client(c)
        upstream(s)
    reads = [calls.next() for _ in range(n)]
    t0 = time.process_time()
    for c, s in reads:
        client(c)
        upstream(s)
    us = (time.process_time() - t0) / n * 1e6
    return {"us": us, **count_calls(mode, calls)}


def count_calls(mode: Any, calls: Calls, n: int = 100) -> dict[str, float]:
    """Python-level and C calls per gRPC call (microkit.count_calls over the next `n` calls)."""
    return microkit.count_calls(mode, [calls.next() for _ in range(n)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trees", nargs="*", default=None, help="source trees to compare (interleaved runs)")
    p.add_argument("--runs", type=int, default=7, help="runs per tree")
    p.add_argument("-n", type=int, default=20000, help="gRPC calls per run")
    p.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one_run(a.one)))
        return
    trees: list[str | None] = list(a.trees) if a.trees else [None]
    results = microkit.compare_trees(__file__, trees, a.runs, ["--one", str(a.n)])
    for i, tree in enumerate(trees):
        us = [r["us"] for r in results[i]]
        last = results[i][-1]
        print(f"{tree or 'PYTHONPATH'}: us/call min {min(us):.2f} median {statistics.median(us):.2f} "
              f"(runs {len(us)} x {a.n}); per call: {last['py_calls']:.0f} Python calls, "
              f"{last['c_calls']:.0f} C calls")


if __name__ == "__main__":
    main()
