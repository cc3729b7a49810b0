"""Series columns (MetricsReport.columns): packed arrays round trip, the agent link moves ref'd
series into them when the controller offers them, and a controller fed columns, refs or whole
labels (old agents) — or a mix of them — holds exactly the same totals."""

from __future__ import annotations

import math
from array import array

from nodemesh.agent.seriesrefs import SeriesRefTable
from nodemesh.api import columns
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import (
    LATENCY_BUCKETS_MS,
    REQUEST_TOTAL,
    RESPONSE_LATENCY_MS,
    RESPONSE_TOTAL,
    ROUTE_REQUEST_TOTAL,
    TCP_OPEN_CONNECTIONS,
    TCP_READ_BYTES_TOTAL,
)
from nodemesh.controlplane.aggregate import N_LATENCY, series_key
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.controller import AgentSession, Controller

BOUNDS = list(LATENCY_BUCKETS_MS)
PEER = {"direction": "inbound", "src_namespace": "a", "src_kind": "deployment", "src_name": "x",
        "dst_namespace": "b", "dst_kind": "deployment", "dst_name": "y", "protocol": "http"}
OTHER = dict(PEER, dst_name="z")
ROUTE = dict(PEER, rt_route="GET /items")
T0 = 1_700_000_000


def interval(i: int) -> list[pb.Series]:
    """What one agent counted in interval i: every peer family, a failure, a route, gauges."""
    lat = [0] * N_LATENCY
    lat[3 + i % 4] = i + 1
    lat[0] = 1
    return [
        pb.Series(name=REQUEST_TOTAL, labels=PEER, value=i + 2),
        pb.Series(name=RESPONSE_TOTAL, labels=dict(PEER, classification="success", status_code="200"), value=i + 1),
        pb.Series(name=RESPONSE_TOTAL, labels=dict(PEER, classification="failure", status_code="500"), value=1),
        pb.Series(name=RESPONSE_LATENCY_MS, labels=PEER, bucket_counts=lat, sum=3.5 * (i + 2)),
        pb.Series(name=TCP_READ_BYTES_TOTAL, labels=OTHER, value=100.0 * (i + 1)),
        pb.Series(name=TCP_OPEN_CONNECTIONS, labels=OTHER, value=float(i % 3)),
        pb.Series(name=ROUTE_REQUEST_TOTAL, labels=ROUTE, value=i + 2),
    ]


def report(seq: int, series: list[pb.Series]) -> pb.MetricsReport:
    return pb.MetricsReport(agent_id="a", seq=seq, time_ms=(T0 + seq) * 1000, latency_bounds_ms=BOUNDS,
                            increments=True, series=series)


def feed(c: Controller, session: AgentSession, mode: str, n: int = 6, query_between: bool = False) -> None:
    """n intervals from one agent speaking `mode` (labels: an old agent; refs; columns), each
    serialized and parsed as the wire would."""
    table = None if mode == "labels" else SeriesRefTable(columns=mode == "columns")
    for seq in range(1, n + 1):
        r = report(seq, interval(seq))
        if table is not None:
            table.compact(r)
        wire = pb.MetricsReport.FromString(r.SerializeToString())
        if mode == "columns" and seq > 1:
            assert not [s for s in wire.series if s.name != TCP_OPEN_CONNECTIONS] and wire.HasField("columns")
        if query_between:  # a kept window already holds the report's second when it arrives
            c.aggregator.totals_by_key(10, now=T0 + seq + 1.2)
        c.ingest_report(session, wire, now=T0 + seq + 0.5)


def controller_fed(*modes: str, query_between: bool = False) -> Controller:
    c = Controller(ControllerConfig())
    for k, mode in enumerate(modes):
        session = c.agent_connected(pb.AgentHello(agent_id=f"agent-{k}", node=f"node-{k}",
                                                  start_time_ms=c.started_ms + 1000))
        feed(c, session, mode, query_between=query_between)
    return c


def totals(c: Controller) -> tuple[dict, dict]:
    now = T0 + 10
    return (c.aggregator.totals_by_key(60, now=now), c.route_aggregator.totals_by_key(60, now=now))


def test_columns_round_trip_through_the_wire() -> None:
    cols = columns.Columns(array("I", [1, 2, 70000]), array("d", [1.0, 0.5, 1e12]), array("I", [3]),
                           array("d", [7.25]), array("Q", [0, 2**40, 1]))
    msg = pb.SeriesColumns.FromString(cols.to_proto().SerializeToString())
    assert columns.decode(msg, 3) == cols
    assert len(cols) == 4 and columns.series_count(msg) == 4


def test_malformed_columns_are_refused_whole() -> None:
    good = columns.Columns(array("I", [1, 2]), array("d", [1.0, 2.0]), array("I", [3]), array("d", [1.0]),
                           array("Q", [1, 2]))
    assert columns.decode(good.to_proto(), 2) is not None
    assert columns.decode(good.to_proto(), 3) is None                      # counts per histogram
    short = good.to_proto()
    short.values = short.values[:8]                                       # fewer values than refs
    assert columns.decode(short, 2) is None
    ragged = good.to_proto()
    ragged.refs = ragged.refs + b"\x01"                                    # not whole uint32s
    assert columns.decode(ragged, 2) is None


def test_agent_moves_defined_refs_into_columns_only_when_offered() -> None:
    plain, packed = SeriesRefTable(), SeriesRefTable(columns=True)
    for table in (plain, packed):
        first = report(1, interval(1))
        table.compact(first)
        assert all(s.labels and s.ref for s in first.series) and not first.HasField("columns")
    r_plain, r_packed = report(2, interval(2)), report(2, interval(2))
    plain.compact(r_plain)
    packed.compact(r_packed)
    assert not r_plain.HasField("columns") and all(s.ref and not s.labels for s in r_plain.series)
    assert [s.name for s in r_packed.series] == []  # the gauge changed too: it is in the columns
    cols = columns.decode(r_packed.columns, len(BOUNDS) + 1)
    assert cols is not None
    assert list(cols.refs) == [s.ref for s in r_plain.series if not s.bucket_counts]
    assert list(cols.values) == [s.value for s in r_plain.series if not s.bucket_counts]
    hist = [s for s in r_plain.series if s.bucket_counts]
    assert list(cols.hist_refs) == [s.ref for s in hist] and list(cols.hist_sums) == [s.sum for s in hist]
    assert list(cols.hist_counts) == list(hist[0].bucket_counts)


def test_an_old_controllers_ack_means_no_columns() -> None:
    old_ack = pb.ReportAck(seq=3, series_refs=True)  # a controller from before columns never sets it
    ack = pb.ReportAck.FromString(old_ack.SerializeToString())
    table = SeriesRefTable(columns=ack.series_columns)
    for seq in (1, 2):
        r = report(seq, interval(seq))
        table.compact(r)
        assert not r.HasField("columns") and len(r.series) == len(interval(seq))
    new_ack = Controller(ControllerConfig()).ack_message("a").report_ack
    assert new_ack.series_refs and new_ack.series_columns


def test_columns_refs_and_labels_give_the_same_totals() -> None:
    by_labels, by_refs, by_columns = (totals(controller_fed(m)) for m in ("labels", "refs", "columns"))
    peer, routes = by_columns
    assert peer and routes
    assert by_columns == by_refs == by_labels
    t = peer[series_key(PEER)]
    assert (t.requests, t.success, t.failure) == (sum(range(3, 9)), sum(range(2, 8)), 6)
    assert sum(t.latency) == sum(range(2, 8)) + 6 and t.latency_sum == 3.5 * sum(range(3, 9))
    assert peer[series_key(OTHER)].open_connections == 6 % 3  # the last gauge: held (ref'd) or in window


def test_mixed_old_and_new_agents_on_one_controller_add_up() -> None:
    mixed = totals(controller_fed("labels", "refs", "columns"))
    single = totals(controller_fed("labels"))
    for key, t in single[0].items():
        m = mixed[0][key]
        assert (m.requests, m.success, m.failure, m.read_bytes, m.latency_sum) == (
            3 * t.requests, 3 * t.success, 3 * t.failure, 3 * t.read_bytes, 3 * t.latency_sum)
        assert m.latency == [3 * x for x in t.latency]
    assert {k: 3 * v.requests for k, v in single[1].items()} == {k: v.requests for k, v in mixed[1].items()}


def test_columns_reach_a_window_already_holding_their_second() -> None:
    kept = totals(controller_fed("columns", query_between=True))
    assert kept == totals(controller_fed("labels", query_between=True)) == totals(controller_fed("labels"))


def test_bad_values_and_unknown_refs_in_columns_are_rejected_and_the_rest_counts() -> None:
    c = Controller(ControllerConfig())
    session = c.agent_connected(pb.AgentHello(agent_id="a", node="n", start_time_ms=c.started_ms + 1000))
    table = SeriesRefTable(columns=True)
    first = report(1, [pb.Series(name=REQUEST_TOTAL, labels=PEER, value=1)])
    table.compact(first)
    c.ingest_report(session, first, now=T0 + 1.5)
    bad = report(2, [])
    bad.columns.CopyFrom(columns.Columns(array("I", [1, 1, 99, 1]), array("d", [math.nan, -1.0, 5.0, 4.0]))
                         .to_proto())
    c.ingest_report(session, bad, now=T0 + 2.5)
    counters = c.counters_for("a", session.start_time_ms)
    assert counters.rejected == 3
    assert c.aggregator.totals_by_key(60, now=T0 + 10)[series_key(PEER)].requests == 5
    broken = report(3, [])
    broken.columns.refs = b"\x01\x00\x00\x00"  # a ref without its value: the block is refused
    c.ingest_report(session, broken, now=T0 + 3.5)
    assert counters.rejected == 4 and counters.stored_seq == 3
