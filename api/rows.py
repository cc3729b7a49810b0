"""Rows the controller answers, as JSON: one definition for every place that prints them.

`nodemesh stat -o json` / `nodemesh routes -o json` (cli/render.py) and the dashboard's API
(controlplane/dashboard) show the same rows; neither room may import the other, so the JSON form
lives here, beside the messages it reads.
"""

from __future__ import annotations

from typing import Any

from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import KIND_OF_TYPE


def json_number(value: float) -> float | int:
    """Whole numbers as ints, the rest to 6 places (what `-o json` has always printed)."""
    return int(value) if float(value).is_integer() else round(value, 6)


def success_fraction(row: pb.StatRow) -> float | None:
    total = row.success_count + row.failure_count
    return row.success_count / total if total else None


def stat_has_requests(row: pb.StatRow) -> bool:
    """HTTP/gRPC columns (success, rps, latency) come from responses seen in the window."""
    return row.has_traffic and (row.success_count + row.failure_count) > 0


def stat_has_tcp(row: pb.StatRow) -> bool:
    """TCP columns also stand alone: an opaque-TCP workload has connections but no responses."""
    return row.has_tcp or row.has_traffic


def stat_row_json(row: pb.StatRow) -> dict[str, Any]:
    """Linkerd's JSON row: metrics are null when the row saw no traffic of their kind."""
    requests = stat_has_requests(row)
    tcp = stat_has_tcp(row)

    def num(value: float, present: bool) -> float | int | None:
        return json_number(value) if present else None

    return {
        "namespace": row.resource.namespace,
        "kind": KIND_OF_TYPE.get(row.resource.type, row.resource.type).lower(),
        "name": row.resource.name,
        "meshed": row.meshed_pods,
        "totalPods": row.total_pods,
        "success": None if (frac := success_fraction(row)) is None else json_number(frac),
        "rps": num(row.rps, requests),
        "latency_ms_p50": num(row.latency_ms_p50, requests),
        "latency_ms_p95": num(row.latency_ms_p95, requests),
        "latency_ms_p99": num(row.latency_ms_p99, requests),
        "tcp_open_connections": num(row.tcp_open_connections, tcp),
        "tcp_read_bytes_rate": num(row.tcp_read_bytes_rate, tcp),
        "tcp_write_bytes_rate": num(row.tcp_write_bytes_rate, tcp),
    }


def route_has_requests(row: pb.RouteRow) -> bool:
    return row.has_traffic and (row.success_count + row.failure_count) > 0


def route_row_json(row: pb.RouteRow) -> dict[str, Any]:
    """One route row: success, rps and latencies are null when the route saw no response."""
    present = route_has_requests(row)
    total = row.success_count + row.failure_count
    return {
        "route": row.route,
        "service": row.service,
        "destination": {"namespace": row.destination.namespace,
                        "kind": KIND_OF_TYPE.get(row.destination.type, row.destination.type).lower(),
                        "name": row.destination.name},
        "success": json_number(row.success_count / total) if present else None,
        "rps": json_number(row.rps) if present else None,
        "latency_ms_p50": json_number(row.latency_ms_p50) if present else None,
        "latency_ms_p95": json_number(row.latency_ms_p95) if present else None,
        "latency_ms_p99": json_number(row.latency_ms_p99) if present else None,
        "requests": row.request_count,
        "failures": row.failure_count,
    }
