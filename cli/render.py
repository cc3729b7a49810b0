"""Turning controller answers into what the user reads: tables, JSON and tap lines.

Pure functions from protobuf messages to strings, with no I/O, so every output shape is pinned
by a golden file (tests/unit/cli/testdata). The shapes follow Linkerd's `viz stat/tap/edges/top`:
names and text columns left-aligned, numbers right-aligned, three spaces between columns (Linkerd's
tabwriter padding), `-` where there is nothing to show.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import SHORT_TYPE
from nodemesh.api.rows import (
    route_has_requests,
    route_row_json,
    stat_has_requests,
    stat_has_tcp,
    stat_row_json,
    success_fraction,
)

MISSING = "-"
COLUMN_GAP = "   "

# Types in the order `stat all` prints their tables (alphabetical, as Linkerd's resource list).
TYPE_ORDER = ("daemonset", "deployment", "job", "namespace", "pod", "replicaset", "service", "statefulset")


# ---------------------------------------------------------------------------- tables


@dataclass(frozen=True, slots=True)
class Column:
    header: str
    right: bool = False  # numbers align right, names left


def format_table(columns: Sequence[Column], rows: Iterable[Sequence[str]], gap: str = COLUMN_GAP) -> str:
    """Aligned columns, header first, no trailing whitespace on any line."""
    body = [list(r) for r in rows]
    widths = [len(c.header) for c in columns]
    for row in body:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for cells in [[c.header for c in columns], *body]:
        parts = [
            cell.rjust(widths[i]) if columns[i].right else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ]
        lines.append(gap.join(parts).rstrip())
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- number formats


def fmt_percent(fraction: float | None) -> str:
    return MISSING if fraction is None else f"{fraction * 100:.2f}%"


def fmt_rps(rps: float) -> str:
    return f"{rps:.1f}rps"


def fmt_ms(ms: float) -> str:
    """Whole milliseconds as Linkerd prints them; sub-millisecond values keep one decimal
    because `0ms` for a fast local service hides the only thing the user asked for."""
    if 0 < ms < 1:
        return f"{ms:.1f}ms"
    return f"{round(ms)}ms"


def fmt_bytes_rate(rate: float) -> str:
    return f"{rate:.1f}B/s"



# ---------------------------------------------------------------------------- stat





def stat_row_name(row: pb.StatRow, with_type_prefix: bool) -> str:
    name = row.resource.name
    if with_type_prefix:
        return f"{SHORT_TYPE.get(row.resource.type, row.resource.type)}/{name}"
    return name


def _sort_key(row: pb.StatRow) -> tuple[str, str]:
    return (row.resource.namespace, row.resource.name)


def group_by_type(rows: Iterable[pb.StatRow]) -> list[tuple[str, list[pb.StatRow]]]:
    groups: dict[str, list[pb.StatRow]] = {}
    for row in rows:
        groups.setdefault(row.resource.type, []).append(row)
    order = {t: i for i, t in enumerate(TYPE_ORDER)}
    return [
        (t, sorted(groups[t], key=_sort_key))
        for t in sorted(groups, key=lambda t: (order.get(t, len(order)), t))
    ]


def stat_table(rows: Sequence[pb.StatRow], *, all_namespaces: bool = False, wide: bool = False) -> str:
    """One table per resource type (blank line between), as `linkerd viz stat`.

    Several types in one answer (`stat all`, `stat deploy/a po/b`) prefix each name with its
    short type so the tables stay unambiguous.
    """
    groups = group_by_type(rows)
    prefix = len(groups) > 1
    return "\n".join(
        _stat_single_table(type_, group, all_namespaces=all_namespaces, wide=wide, prefix=prefix)
        for type_, group in groups
    )


def _stat_single_table(
    type_: str, rows: Sequence[pb.StatRow], *, all_namespaces: bool, wide: bool, prefix: bool
) -> str:
    columns: list[Column] = []
    if all_namespaces:
        columns.append(Column("NAMESPACE"))
    columns.append(Column("NAME"))
    if type_ == "pod":
        columns.append(Column("STATUS"))
    columns += [Column(h, right=True) for h in (
        "MESHED", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99", "TCP_CONN")]
    if wide:
        columns += [Column("READ_BYTES/SEC", right=True), Column("WRITE_BYTES/SEC", right=True)]

    table_rows = []
    for row in rows:
        cells: list[str] = []
        if all_namespaces:
            cells.append(row.resource.namespace or MISSING)
        cells.append(stat_row_name(row, prefix))
        if type_ == "pod":
            cells.append(row.status or MISSING)
        cells.append(f"{row.meshed_pods}/{row.total_pods}")
        if stat_has_requests(row):
            cells.append(fmt_percent(success_fraction(row)))
            cells.append(fmt_rps(row.rps))
            cells += [fmt_ms(q) for q in (row.latency_ms_p50, row.latency_ms_p95, row.latency_ms_p99)]
        else:
            cells += [MISSING] * 5
        if stat_has_tcp(row):
            cells.append(str(round(row.tcp_open_connections)))
            if wide:
                cells += [fmt_bytes_rate(row.tcp_read_bytes_rate), fmt_bytes_rate(row.tcp_write_bytes_rate)]
        else:
            cells += [MISSING] * (3 if wide else 1)
        table_rows.append(cells)
    return format_table(columns, table_rows)




def stat_json(rows: Sequence[pb.StatRow]) -> str:
    ordered = [r for _, group in group_by_type(rows) for r in group]
    return json.dumps([stat_row_json(r) for r in ordered], indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------- routes


def routes_table(rows: Sequence[pb.RouteRow], *, wide: bool = False) -> str:
    """`linkerd viz routes`' table: ROUTE, SERVICE, SUCCESS, RPS, LATENCY_P50/95/99 (rows come
    sorted by service and route from the controller, `[DEFAULT]` and `[other]` last). Wide adds
    the destination workload and the window's request and failure counts."""
    columns = [Column("ROUTE"), Column("SERVICE")]
    columns += [Column(h, right=True) for h in ("SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99")]
    if wide:
        columns += [Column("DESTINATION"), Column("REQUESTS", right=True), Column("FAILURES", right=True)]
    table_rows = []
    for row in rows:
        cells = [row.route, row.service or MISSING]
        if route_has_requests(row):
            total = row.success_count + row.failure_count
            cells += [fmt_percent(row.success_count / total), fmt_rps(row.rps)]
            cells += [fmt_ms(q) for q in (row.latency_ms_p50, row.latency_ms_p95, row.latency_ms_p99)]
        else:
            cells += [MISSING] * 5
        if wide:
            dst = row.destination
            cells.append(f"{SHORT_TYPE.get(dst.type, dst.type)}/{dst.name}" if dst.name else MISSING)
            cells += [str(row.request_count), str(row.failure_count)]
        table_rows.append(cells)
    return format_table(columns, table_rows)


def routes_json(rows: Sequence[pb.RouteRow]) -> str:
    return json.dumps([route_row_json(row) for row in rows], indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------- tap

# Go's codes.Code String(), which Linkerd prints for grpc-status.
GRPC_CODE_NAMES = (
    "OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
    "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange",
    "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated",
)
TLS_STATUS = "no_identity"  # plaintext: the connection did not cross nodes inside an mTLS tunnel


def grpc_code_name(code: int) -> str:
    return GRPC_CODE_NAMES[code] if 0 <= code < len(GRPC_CODE_NAMES) else f"Code({code})"


def format_addr(ip: str, port: int) -> str:
    """`10.0.0.1:80`, `[fd00::1]:80` — IPv6 in brackets so the port is unambiguous."""
    try:
        if ipaddress.ip_address(ip).version == 6:
            return f"[{ip}]:{port}"
    except ValueError:
        pass
    return f"{ip}:{port}"


def proxy_direction(direction: str) -> str:
    # Linkerd pads `in` with a space so `in` and `out` lines align.
    return {"outbound": "out", "inbound": "in "}.get(direction, "???")


def peer_resource(peer: pb.Peer) -> str:
    if not peer.owner.type or not peer.owner.name:
        return ""
    return f"{SHORT_TYPE.get(peer.owner.type, peer.owner.type)}/{peer.owner.name}"


def tap_line(event: pb.TapEvent, wide: bool = False) -> str:
    flow = (
        f"proxy={proxy_direction(event.direction)} "
        f"src={format_addr(event.source.ip, event.source.port)} "
        f"dst={format_addr(event.destination.ip, event.destination.port)} "
        f"tls={'true' if event.tls else TLS_STATUS}"
    )
    # The identity the agent verified from a certificate (agent/tunnel.py), as Linkerd's tap -o wide.
    if event.client_id:
        flow += f" client_id={event.client_id}"
    if event.server_id:
        flow += f" server_id={event.server_id}"
    rid = event.request_id
    kind = event.WhichOneof("event")
    if kind == "request_init":
        req = event.request_init
        line = f"req id={rid} {flow} :method={req.method} :authority={req.authority} :path={req.path}"
    elif kind == "response_init":
        rsp = event.response_init
        line = f"rsp id={rid} {flow} :status={rsp.http_status} latency={rsp.since_request_init_us}µs"
    elif kind == "response_end":
        end = event.response_end
        tail = f"duration={end.since_request_init_us}µs response-length={end.response_bytes}B"
        if end.reset_error:
            line = f"end id={rid} {flow} reset-error={end.reset_error} {tail}"
        elif end.has_grpc_status:
            line = f"end id={rid} {flow} grpc-status={grpc_code_name(end.grpc_status)} {tail}"
        else:
            line = f"end id={rid} {flow} {tail}"
    else:
        line = f"unknown {flow}"
    if wide:
        line += "".join(_wide_labels("src", event.source)) + "".join(_wide_labels("dst", event.destination))
    return line


def _wide_labels(side: str, peer: pb.Peer) -> list[str]:
    labels = []
    res = peer_resource(peer)
    if res:
        labels.append(f" {side}_res={res}")
    if peer.namespace:
        labels.append(f" {side}_ns={peer.namespace}")
    return labels


def _peer_json(peer: pb.Peer) -> dict[str, object]:
    metadata: dict[str, str] = {}
    if peer.namespace:
        metadata["namespace"] = peer.namespace
    if peer.pod:
        metadata["pod"] = peer.pod
    if peer.owner.type and peer.owner.name:
        metadata[peer.owner.type] = peer.owner.name
    return {"ip": peer.ip, "port": peer.port, "metadata": metadata or None}


def _request_id_json(request_id: str) -> dict[str, object]:
    base, _, stream = request_id.partition(":")
    try:
        return {"base": int(base), "stream": int(stream or 0)}
    except ValueError:
        return {"base": request_id, "stream": 0}


def tap_event_json(event: pb.TapEvent) -> dict[str, object]:
    """The event as Linkerd's `tap -o json` names things (camelCase, proxyDirection)."""
    out: dict[str, object] = {
        "source": _peer_json(event.source),
        "destination": _peer_json(event.destination),
        "proxyDirection": event.direction.upper(),
        "node": event.node,
        "timeMs": event.time_ms,
    }
    rid = _request_id_json(event.request_id)
    kind = event.WhichOneof("event")
    if kind == "request_init":
        req = event.request_init
        out["requestInitEvent"] = {
            "id": rid, "method": req.method, "scheme": req.scheme, "authority": req.authority,
            "path": req.path, "headers": [{"name": h.name, "valueStr": h.value} for h in req.headers],
        }
    elif kind == "response_init":
        rsp = event.response_init
        out["responseInitEvent"] = {
            "id": rid, "sinceRequestInitUs": rsp.since_request_init_us, "httpStatus": rsp.http_status,
            "headers": [{"name": h.name, "valueStr": h.value} for h in rsp.headers],
        }
    elif kind == "response_end":
        end = event.response_end
        body: dict[str, object] = {
            "id": rid, "sinceRequestInitUs": end.since_request_init_us, "responseBytes": end.response_bytes,
        }
        if end.has_grpc_status:
            body["grpcStatusCode"] = end.grpc_status
        if end.reset_error:
            body["resetErrorCode"] = end.reset_error
        out["responseEndEvent"] = body
    return out


def tap_json(event: pb.TapEvent) -> str:
    """One event per line (JSON Lines), so `| jq` and line-based tools work on a live stream."""
    return json.dumps(tap_event_json(event), ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------------------- edges


def _edge_sort_key(edge: pb.Edge) -> tuple[str, str, str, str]:
    return (edge.src.namespace, edge.dst.namespace, edge.src.name, edge.dst.name)


def edges_table(edges: Sequence[pb.Edge], wide: bool = False) -> str:
    """Linkerd's `viz edges` columns: SECURED says whether all of the edge that crossed nodes did
    so inside mTLS; -o wide adds the verified identities and, when not secured, why."""
    columns = [Column("SRC"), Column("DST"), Column("SRC_NS"), Column("DST_NS"), Column("SECURED")]
    if wide:
        columns += [Column("CLIENT_ID"), Column("SERVER_ID"), Column("MSG")]
    rows = []
    for e in sorted(edges, key=_edge_sort_key):
        cells = [e.src.name, e.dst.name, e.src.namespace or MISSING, e.dst.namespace or MISSING,
                 "yes" if e.secured else "no"]
        if wide:
            cells += [e.client_id or MISSING, e.server_id or MISSING, e.no_identity_msg or MISSING]
        rows.append(cells)
    return format_table(columns, rows)


def edges_json(edges: Sequence[pb.Edge]) -> str:
    data = [
        {
            "src": e.src.name, "src_namespace": e.src.namespace,
            "dst": e.dst.name, "dst_namespace": e.dst.namespace,
            "secured": e.secured, "client_id": e.client_id, "server_id": e.server_id,
            "no_tls_reason": e.no_identity_msg,
        }
        for e in sorted(edges, key=_edge_sort_key)
    ]
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------- check


@dataclass(frozen=True, slots=True)
class CheckStep:
    """One line of `nodemesh check`: what was checked, whether it held, and if not, why and what to do."""

    name: str
    ok: bool
    details: tuple[str, ...] = ()
    hint: str = ""


OK_MARK = "\u2713"    # ✓
FAIL_MARK = "\u00d7"  # ×


def check_report(title: str, steps: Sequence[CheckStep]) -> str:
    """Linkerd's `check` layout: a titled section, one mark per step, failures explained underneath."""
    lines = [title, "-" * len(title)]
    for step in steps:
        lines.append(f"{OK_MARK if step.ok else FAIL_MARK} {step.name}")
        if not step.ok:
            lines += [f"    {d}" for d in step.details]
            if step.hint:
                lines.append(f"    hint: {step.hint}")
    passed = all(s.ok for s in steps)
    lines += ["", f"Status check results are {OK_MARK if passed else FAIL_MARK}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- top


def go_duration(us: int) -> str:
    """A latency as Linkerd's top prints it (Go's Duration.String after rounding): 523µs, 12ms, 3s."""
    if us < 1000:
        return f"{us}µs"
    if us < 1_000_000:
        return f"{round(us / 1000)}ms"
    seconds = round(us / 1_000_000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
