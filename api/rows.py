"""Rows the controller answers, as JSON: one definition for every place that prints them.

`nodemesh routes -o json` (cli/render.py) and the dashboard's workload page (controlplane/dashboard)
show the same route rows; neither room may import the other, so the JSON form lives here, beside
the messages it reads.
"""

from __future__ import annotations

from typing import Any

from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import KIND_OF_TYPE


def json_number(value: float) -> float | int:
    """Whole numbers as ints, the rest to 6 places (what `-o json` has always printed)."""
    return int(value) if float(value).is_integer() else round(value, 6)


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
