"""Prometheus metrics about the controller itself (served on the web port's /metrics).

Each Controller owns its own CollectorRegistry, so several controllers in one process (tests)
never collide on metric names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ControllerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connected_agents = Gauge("nodemesh_controller_connected_agents", "Agents with an open stream.",
                                      registry=r)
        self.reports_received = Counter("nodemesh_controller_reports_received",
                                        "MetricsReports received from agents.", registry=r)
        self.reports_replayed = Counter("nodemesh_controller_reports_replayed",
                                        "Increment reports an agent sent again from its history (after a "
                                        "reconnect or a controller restart).", registry=r)
        self.reports_duplicate = Counter("nodemesh_controller_reports_duplicate",
                                         "Increment reports dropped because their seq was already stored.",
                                         registry=r)
        self.report_gaps = Counter("nodemesh_controller_report_gaps",
                                   "Increment reports missing between two an agent sent (its history "
                                   "no longer held them).", registry=r)
        self.series_tracked = Gauge("nodemesh_controller_series_tracked",
                                    "Label sets with traffic in the retention window.", registry=r)
        self.stat_latency = Histogram("nodemesh_controller_stat_request_seconds",
                                      "Time to answer a StatSummary.", registry=r,
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
        self.loop_lag = Histogram("nodemesh_controller_loop_lag_seconds",
                                  "How late the controller's event loop ran a timer due every 100 ms "
                                  "(every request and report waits as long).", registry=r,
                                  buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self.gc_pause = Histogram("nodemesh_controller_gc_pause_seconds",
                                  "Pauses of Python's cyclic garbage collector (the whole process "
                                  "stops), by generation.", ["generation"], registry=r,
                                  buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self.identity_snapshots = Counter("nodemesh_controller_identity_snapshots",
                                          "Full identity snapshots sent to agents (stream start, resync).",
                                          registry=r)
        self.identity_deltas = Counter("nodemesh_controller_identity_deltas",
                                       "Identity deltas sent to agents after cluster changes.", registry=r)
        self.open_taps = Gauge("nodemesh_controller_open_taps", "Taps currently open.", registry=r)
        self.tap_events = Counter("nodemesh_controller_tap_events_forwarded",
                                  "Tap events forwarded to callers.", registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
