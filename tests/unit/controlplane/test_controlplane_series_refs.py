"""Series refs (label compaction on the agent stream) and identity messages encoded once."""

from __future__ import annotations

from nodemesh.agent.seriesrefs import SeriesRefTable
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import REQUEST_TOTAL, TCP_OPEN_CONNECTIONS
from nodemesh.controlplane.aggregate import series_key
from nodemesh.controlplane.controller import _resolve_ref
from nodemesh.controlplane.deltas import AgentCounters
from nodemesh.controlplane.identityfeed import IdentityFeed

LABELS = {"direction": "inbound", "src_namespace": "a", "src_name": "x", "dst_namespace": "b", "dst_name": "y"}
OTHER = dict(LABELS, dst_name="z")


def report(seq: int, *series: pb.Series) -> pb.MetricsReport:
    return pb.MetricsReport(agent_id="a1", seq=seq, increments=True, series=list(series))


def test_agent_table_sends_labels_once_per_stream_and_the_controller_resolves_them() -> None:
    table = SeriesRefTable()
    refs: dict = {}
    counters = AgentCounters("a1", first_report_is_baseline=False)
    got = []
    for seq in (1, 2, 3):
        r = report(seq, pb.Series(name=REQUEST_TOTAL, labels=LABELS, value=seq),
                   pb.Series(name=TCP_OPEN_CONNECTIONS, labels=LABELS, value=seq),
                   pb.Series(name=REQUEST_TOTAL, labels=OTHER, value=10 * seq))
        table.compact(r)
        wire = pb.MetricsReport.FromString(r.SerializeToString())
        assert [bool(s.labels) for s in wire.series] == ([True] * 3 if seq == 1 else [False] * 3)
        assert len({s.ref for s in wire.series}) == 3
        got.append(counters.ingest_increments(wire.series, wire.seq, refs=refs, resolve=_resolve_ref))
    # Every report resolves to the same labels and values as if the labels had been sent.
    for seq, deltas in enumerate(got, start=1):
        assert [(d.name, d.key, d.value, d.gauge) for d in deltas] == [
            (REQUEST_TOTAL, series_key(LABELS), seq, False), (TCP_OPEN_CONNECTIONS, series_key(LABELS), seq, True),
            (REQUEST_TOTAL, series_key(OTHER), 10 * seq, False)]
        assert deltas[0].key == series_key(LABELS) and deltas[2].key == series_key(OTHER)
    assert counters.rejected == 0 and len(refs) == 3


def test_a_ref_never_defined_is_rejected_and_the_rest_of_the_report_counts() -> None:
    counters = AgentCounters("a1", first_report_is_baseline=False)
    deltas = counters.ingest_increments([pb.Series(name=REQUEST_TOTAL, ref=7, value=1),
                                         pb.Series(name=REQUEST_TOTAL, labels=LABELS, value=2)], 1, refs={})
    assert counters.rejected == 1 and [(d.labels, d.value) for d in deltas] == [(LABELS, 2)]


def test_table_limit_sends_whole_series_without_ref() -> None:
    table = SeriesRefTable(limit=1)
    r = report(1, pb.Series(name=REQUEST_TOTAL, labels=LABELS, value=1),
               pb.Series(name=REQUEST_TOTAL, labels=OTHER, value=1))
    table.compact(r)
    assert [(s.ref, bool(s.labels)) for s in r.series] == [(1, True), (0, True)]


def test_encoded_identity_messages_equal_the_messages_and_are_shared() -> None:
    feed = IdentityFeed(epoch=5)
    snap = pb.IdentitySnapshot(pods=[pb.Pod(uid="u1", name="p1", namespace="n", ip="10.0.0.1")])
    feed.update(snap)
    v1 = feed.version
    snap2 = pb.IdentitySnapshot(pods=[*snap.pods, pb.Pod(uid="u2", name="p2", namespace="n", ip="10.0.0.2")])
    feed.update(snap2)
    for epoch, version in ((0, 0), (5, v1), (9, v1)):
        enc, is_snapshot = feed.encoded_message_for(epoch, version)
        msg = feed.message_for(epoch, version)
        assert pb.ControllerMessage.FromString(enc) == msg and is_snapshot == msg.HasField("identity")
    assert feed.encoded_message_for(0, 0)[0] is feed.encoded_message_for(9, 1)[0]  # encoded once
    assert feed.encoded_message_for(5, feed.version) is None


def test_unchanged_gauges_are_not_sent_again_on_a_stream() -> None:
    table = SeriesRefTable()
    sent = []
    for value in (2, 2, 0, 0, 3):
        r = report(1, pb.Series(name=TCP_OPEN_CONNECTIONS, labels=LABELS, value=value),
                   pb.Series(name=REQUEST_TOTAL, labels=LABELS, value=1))
        table.compact(r)
        sent.append([(s.name, s.value) for s in r.series])
    assert [len(x) for x in sent] == [2, 1, 2, 1, 2]
    assert [v for x in sent for n, v in x if n == TCP_OPEN_CONNECTIONS] == [2, 0, 3]
