"""The agent's report history (agent/history.py) and the increments it is fed (NodeStore.pending)."""

from __future__ import annotations

import pytest
from nodemesh.agent.history import ReportRing
from nodemesh.agent.metrics import NodeStore, to_series
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import PEER_LABELS

KEY = ("outbound", "ns", "deployment", "web", "web-1", "ns", "deployment", "api", "api-1", "", "api:80", "http1")


def report(seq: int, time_ms: int, value: float = 1.0) -> pb.MetricsReport:
    labels = dict(zip(PEER_LABELS, KEY))
    return pb.MetricsReport(agent_id="n/1/1", seq=seq, time_ms=time_ms, increments=True,
                            series=[pb.Series(name="request_total", labels=labels, value=value)])


def test_ring_keeps_entries_in_order_and_gives_back_what_a_controller_lacks() -> None:
    ring = ReportRing(max_age_s=60)
    for seq in range(1, 11):
        ring.append(report(seq, 1_000_000 + seq * 1000, value=seq))
    assert len(ring) == 10 and (ring.first_seq, ring.last_seq) == (1, 10)
    assert [e.seq for e in ring.since(0)] == list(range(1, 11))      # a new controller: everything
    assert [e.seq for e in ring.since(7)] == [8, 9, 10]              # the same one: what it lacks
    assert ring.since(10) == []
    back = ring.since(8)[0].report()
    assert back == report(9, 1_009_000, value=9)                     # bytes in, the same report out


def test_ring_refuses_a_seq_that_does_not_follow() -> None:
    ring = ReportRing()
    ring.append(report(5, 1000))
    with pytest.raises(ValueError):
        ring.append(report(5, 2000))


def test_ring_ages_out_acknowledged_entries_silently_and_counts_unacknowledged_ones() -> None:
    ring = ReportRing(max_age_s=5)
    for seq in range(1, 6):
        ring.append(report(seq, seq * 1000))
    ring.ack(3)
    for seq in range(6, 11):  # 10 s: entries older than 5 s go
        ring.append(report(seq, seq * 1000))
    assert ring.first_seq == 5
    assert ring.dropped_acked == 3 and ring.dropped_unacked == 1    # seq 4 was never stored anywhere
    ring.ack(0)  # a restarted controller holds nothing: what its predecessor stored is not "lost"
    for seq in range(11, 13):
        ring.append(report(seq, seq * 1000))
    assert ring.dropped_unacked == 3                                # seqs 5 and 6: never stored
    ring.ack(9)
    ring.append(report(13, 13 * 1000))
    assert ring.dropped_unacked == 3 and ring.dropped_acked == 4    # seq 7: the new controller holds it (ack 9)


def test_ring_is_bounded_in_bytes_and_keeps_the_newest() -> None:
    one = len(ReportRing().append(report(1, 1000)).blob)
    ring = ReportRing(max_age_s=3600, max_bytes=one * 5)
    for seq in range(1, 21):
        ring.append(report(seq, seq * 1000))
    assert ring.bytes <= one * 5 + 16 and len(ring) <= 5
    assert ring.last_seq == 20 and ring.dropped_unacked == 20 - len(ring)


def test_nodestore_pending_holds_one_interval_of_increments_with_capped_keys() -> None:
    store = NodeStore(max_authorities=1)
    store.track_pending = True
    other = KEY[:10] + ("other:80",) + KEY[11:]
    store.add({"request_total": {KEY: 2, other: 3}, "tcp_open_connections": {KEY: 1},
               "response_latency_ms": {KEY: [1] + [0] * 22 + [0.5]}})
    store.add({"request_total": {KEY: 1}})
    taken = store.take_pending()
    assert taken["request_total"] == {KEY: 3, KEY[:10] + ("[other]",) + KEY[11:]: 3}
    assert "tcp_open_connections" not in taken                      # gauges go live, as values
    assert taken["response_latency_ms"][KEY][0] == 1
    assert store.take_pending() == {}                                 # taken: the next interval is empty
    assert store.series["request_total"][KEY] == 3                    # the cumulative series are untouched
    assert store.gauges()["tcp_open_connections"] == {KEY: 1}
    assert to_series(taken)  # the controller link reports them as Series


def test_nodestore_without_a_controller_keeps_no_pending() -> None:
    store = NodeStore()
    store.add({"request_total": {KEY: 2}})
    assert store.pending == {}
