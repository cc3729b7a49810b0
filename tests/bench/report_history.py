"""Report history benchmark: what the agent's ring of per-interval increments costs, and what a
controller restart costs the controller that replays it.

    python3 tests/bench/report_history.py [--series 200] [--seconds 900] [--changing 1.0] [--json OUT]

In process, no root, no network. `--series` peer series (emojivoto-like label values: 9 series per
edge, two of them latency/duration histograms; the open-connections gauge is not kept) of which
`--changing` change every second (1.0: every series every second, the worst case for a busy node).
Each simulated second goes through the agent's own path: NodeStore.add (a worker's increments) ->
ControllerLink._close_interval (take_pending -> Series -> MetricsReport -> zlib -> ReportRing). The
clock is not waited on: report times are stamped one second apart.

Reported: the ring's compressed bytes, the Python heap it holds (entries included),
the CPU per interval closed, and the controller's CPU to ingest the whole ring (a restarted
controller is given all of it) with the real Controller.ingest_report. Numbers, not pass/fail.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from unittest import mock

from nodemesh.agent.config import AgentConfig
from nodemesh.agent.node import NodeTelemetry
from nodemesh.agent.report import ControllerLink
from nodemesh.api.model import LATENCY_BUCKETS_MS
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.controller import AgentSession, Controller

N_HIST = len(LATENCY_BUCKETS_MS) + 2  # buckets, +Inf, sum


def edges(n_series: int) -> list[tuple[str, ...]]:
    """Peer label tuples, 9 reported series each, enough for n_series."""
    out = []
    apps = ["web", "emoji", "voting", "vote-bot", "api", "auth", "cart", "search", "db-proxy", "cache"]
    i = 0
    while len(out) * 9 < n_series:
        src, dst = apps[i % len(apps)], apps[(i * 3 + 1) % len(apps)]
        direction = "outbound" if i % 2 == 0 else "inbound"
        out.append((direction, "emojivoto", "deployment", src, f"{src}-5f7c9d8b6-{i:05x}", "emojivoto", "deployment",
                    dst, f"{dst}-6b8f4c7d9-{i:05x}", f"{dst}-svc.emojivoto", f"{dst}-svc.emojivoto:8080", "http2"))
        i += 1
    return out


def one_second(peers: list[tuple[str, ...]], changing: float, rng: random.Random) -> dict:
    """A worker's increments for one second: the edges that changed."""
    delta: dict[str, dict] = {k: {} for k in ("request_total", "response_total", "response_latency_ms",
                                              "tcp_open_total", "tcp_close_total", "tcp_read_bytes_total",
                                              "tcp_write_bytes_total", "tcp_connection_duration_ms")}
    for key in peers:
        if rng.random() >= changing:
            continue
        n = rng.randint(1, 200)
        fails = n // 10
        delta["request_total"][key] = n
        delta["response_total"][key + ("200", "", "success", "")] = n - fails
        delta["response_total"][key + ("500", "", "failure", "")] = fails
        hist = [0] * N_HIST
        for _ in range(3):
            hist[rng.randrange(0, 12)] += n // 3
        hist[-1] = n * 4.2
        delta["response_latency_ms"][key] = hist
        delta["tcp_open_total"][key] = 1
        delta["tcp_close_total"][key + ("",)] = 1
        delta["tcp_read_bytes_total"][key] = n * 310
        delta["tcp_write_bytes_total"][key] = n * 1220
        dur = [0] * N_HIST
        dur[rng.randrange(10, 20)] = 1
        dur[-1] = 1500.0
        delta["tcp_connection_duration_ms"][key] = dur
    return delta


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--series", type=int, default=200)
    p.add_argument("--seconds", type=int, default=900)
    p.add_argument("--changing", type=float, default=1.0)
    p.add_argument("--json", default="")
    args = p.parse_args()

    rng = random.Random(12)
    peers = edges(args.series)
    cfg = AgentConfig(node="bench", admin_port=0, controller="127.0.0.1:1", workers=1,
                      report_history_s=args.seconds + 10, report_history_max_bytes=1 << 40)
    node = NodeTelemetry(cfg)
    link = ControllerLink(cfg, node)
    clock = [1_800_000_000.0]
    close_s = 0.0
    with mock.patch("nodemesh.agent.report.time.time", lambda: clock[0]):
        for _ in range(args.seconds):
            node.store.add(one_second(peers, args.changing, rng))
            clock[0] += 1.0
            t0 = time.perf_counter()
            link._close_interval()
            close_s += time.perf_counter() - t0
    ring = link.ring
    # The heap of the ring alone: entries (objects + compressed bytes); the store is there anyway.
    heap_ring = sum(sys.getsizeof(e) + sys.getsizeof(e.blob) for e in ring) + sys.getsizeof(ring._entries)
    series_per_entry = round(sum(len(e.report().series) for e in ring) / len(ring))
    raw = sum(len(e.report().SerializeToString()) for e in list(ring)[:20]) / 20

    controller = Controller(ControllerConfig())
    session = AgentSession(agent_id=node.agent_id, node="bench", version="", start_time_ms=node.start_time_ms)
    reports = [e.report() for e in ring]
    t0 = time.perf_counter()
    for r in reports:
        controller.ingest_report(session, r, now=clock[0])
    ingest_s = time.perf_counter() - t0

    result = {
        "series": series_per_entry, "seconds": len(ring), "changing": args.changing,
        "ring_bytes": ring.bytes, "ring_heap_bytes": heap_ring,
        "entry_raw_bytes": round(raw), "entry_compressed_bytes": round(ring.bytes / len(ring)),
        "close_interval_ms": round(close_s / args.seconds * 1000, 3),
        "controller_replay_ingest_s": round(ingest_s, 3),
        "controller_replay_per_entry_ms": round(ingest_s / len(reports) * 1000, 3),
    }
    print(f"{len(peers) * 9} series, {series_per_entry} of them changed a second, {len(ring)} s kept: ring "
          f"{ring.bytes / 2**20:.2f} MiB compressed ({result['entry_raw_bytes']} -> "
          f"{result['entry_compressed_bytes']} bytes a second), heap of the ring {heap_ring / 2**20:.2f} MiB; "
          f"closing an interval "
          f"{result['close_interval_ms']} ms; a restarted controller ingests the whole ring in "
          f"{ingest_s:.2f} s ({result['controller_replay_per_entry_ms']} ms an interval)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
