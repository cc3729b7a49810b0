"""Per-request CPU of the agent's HTTP/1.1 path, in-process: bytes in, observer events out.

    python3 tests/bench/http1_micro.py                      # the tree `nodemesh` imports from
    python3 tests/bench/http1_micro.py --trees OLD NEW      # two source trees, runs interleaved
    python3 tests/bench/http1_micro.py --tap                # a tap open (matching no request here)

Each iteration feeds http1_relay.Http1Mode one keep-alive request (5 headers) and its response
(5 headers, 2-byte body) through the real WorkerTelemetry, as the relay does per read; the
transports are no-op writers, so what is measured is the agent's own Python work per request:
classification (httptools), the observer calls, metrics. No sockets, so the number holds on a
loaded machine far better than tests/bench/run.py; still it is CPU time of a shared machine: the
runs are repeated and interleaved and the min and median reported.

It also counts Python-level calls and C calls per request with sys.setprofile (the issue-18
metric): a count does not depend on load, so it shows a step's effect however busy the machine.

A tree is a directory holding the nodemesh sources (a worktree, or a `git archive` of a commit);
each run is a subprocess importing `nodemesh` from it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import microkit  # beside this file: the line above finds it

REQ = (b"GET /api/vote?choice=1 HTTP/1.1\r\nHost: voting\r\nUser-Agent: wrk\r\nAccept: */*\r\n"
       b"Accept-Encoding: gzip\r\nX-Request-Id: 4b1f2c\r\n\r\n")
RESP = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Thu, 03 Dec 2026 09:40:00 GMT\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")


def setup(tap: bool) -> Any:
    """An Http1Mode on a fake connection (no-op transports) reporting to a real WorkerTelemetry."""
    from types import SimpleNamespace

    from nodemesh.agent.config import AgentConfig
    from nodemesh.agent.http1_relay import Http1Mode
    from nodemesh.agent.observe import ConnectionMeta
    from nodemesh.agent.telemetry import WorkerTelemetry

    tel = WorkerTelemetry(AgentConfig(node="node-1", workers=1))
    if tap:
        from nodemesh.api.gen import nodemesh_pb2 as pb
        tel.taps.open("bench", pb.TapFilter())

    def write(data: bytes) -> None:
        pass

    def at_boundary() -> None:
        pass

    conn = SimpleNamespace(
        observer=tel, send_upstream=write, send_client=write, write_client=write, slow=False, frozen=False,
        read_bytes=0, write_bytes=0, header_timeout_s=10.0, at_boundary=at_boundary,
        obs=tel.connection_open(ConnectionMeta(1, "outbound", ("10.244.1.5", 41000), ("10.244.2.7", 80),
                                               ("10.244.2.7", 80), "http1", started=time.monotonic())))
    return Http1Mode(conn)  # type: ignore[arg-type]


def one_run(n: int, tap: bool) -> dict[str, float]:
    mode = setup(tap)
    client, upstream = mode.client_data, mode.upstream_data
    for _ in range(2000):
        client(REQ)
        upstream(RESP)
    t0 = time.process_time()
    for _ in range(n):
        client(REQ)
        upstream(RESP)
    us = (time.process_time() - t0) / n * 1e6
    return {"us": us, **count_calls(mode)}


def count_calls(mode: Any, n: int = 100) -> dict[str, float]:
    """Python-level and C calls per request (microkit.count_calls over `n` requests)."""
    return microkit.count_calls(mode, [(REQ, RESP)] * n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trees", nargs="*", default=None, help="source trees to compare (interleaved runs)")
    p.add_argument("--runs", type=int, default=7, help="runs per tree")
    p.add_argument("-n", type=int, default=20000, help="requests per run")
    p.add_argument("--tap", action="store_true", help="a tap open (matching every request)")
    p.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one_run(a.one, a.tap)))
        return
    trees: list[str | None] = list(a.trees) if a.trees else [None]
    results = microkit.compare_trees(__file__, trees, a.runs, ["--one", str(a.n)] + (["--tap"] if a.tap else []))
    for i, tree in enumerate(trees):
        us = [r["us"] for r in results[i]]
        last = results[i][-1]
        print(f"{tree or 'PYTHONPATH'}: us/request min {min(us):.2f} median {statistics.median(us):.2f} "
              f"(runs {len(us)} x {a.n}); per request: {last['py_calls']:.0f} Python calls, "
              f"{last['c_calls']:.0f} C calls{' [tap open]' if a.tap else ''}")


if __name__ == "__main__":
    main()
