"""Cumulative series -> deltas: agent restarts, controller restarts, counter resets."""

from __future__ import annotations

from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.controlplane.deltas import AgentCounters

LABELS = {"direction": "inbound", "dst_name": "web"}


def counter(value: float, name: str = "response_total", **labels: str) -> pb.Series:
    return pb.Series(name=name, labels={**LABELS, **labels}, value=value)


def hist(counts: list[int], total: float) -> pb.Series:
    return pb.Series(name="response_latency_ms", labels=LABELS, bucket_counts=counts, sum=total)


def values(deltas) -> list[float]:
    return [d.value for d in deltas]


def test_agent_started_after_controller_first_report_is_all_new() -> None:
    c = AgentCounters("a1", first_report_is_baseline=False)
    assert values(c.ingest([counter(5)])) == [5]
    assert values(c.ingest([counter(8)])) == [3]
    assert values(c.ingest([counter(8)])) == []  # no change, no delta


def test_controller_restart_first_report_is_a_baseline() -> None:
    # The agent reported 100 to the previous controller; the new one must not count it again.
    c = AgentCounters("a1", first_report_is_baseline=True)
    assert c.ingest([counter(100)]) == []
    assert values(c.ingest([counter(130)])) == [30]


def test_total_over_controller_restart_is_not_doubled() -> None:
    cumulative = [10, 20, 30, 45, 60, 75]
    old = AgentCounters("a1", first_report_is_baseline=False)
    counted = sum(sum(values(old.ingest([counter(v)]))) for v in cumulative[:3])
    new = AgentCounters("a1", first_report_is_baseline=True)  # controller restarted
    counted += sum(sum(values(new.ingest([counter(v)]))) for v in cumulative[3:])
    # 30 before; the baseline (45) eats the 15 that happened while the controller was down.
    assert counted == 30 + (75 - 45)


def test_counter_going_down_is_a_reset() -> None:
    c = AgentCounters("a1", first_report_is_baseline=False)
    c.ingest([counter(50)])
    assert values(c.ingest([counter(7)])) == [7]
    assert c.resets == 1


def test_new_series_from_known_agent_counts_fully_even_after_baseline() -> None:
    c = AgentCounters("a1", first_report_is_baseline=True)
    c.ingest([counter(100, classification="success")])
    deltas = c.ingest([counter(101, classification="success"), counter(4, classification="failure")])
    assert sorted((d.labels["classification"], d.value) for d in deltas) == [("failure", 4), ("success", 1)]


def test_histogram_deltas_and_reset() -> None:
    c = AgentCounters("a1", first_report_is_baseline=False)
    (d,) = c.ingest([hist([1, 2, 0], 10.0)])
    assert list(d.buckets) == [1, 2, 0] and d.sum == 10.0
    (d,) = c.ingest([hist([1, 5, 1], 30.0)])
    assert list(d.buckets) == [0, 3, 1] and d.sum == 20.0
    (d,) = c.ingest([hist([0, 1, 0], 2.0)])  # a bucket went down: the agent restarted the histogram
    assert list(d.buckets) == [0, 1, 0]


def test_gauges_pass_through_as_values() -> None:
    c = AgentCounters("a1", first_report_is_baseline=True)
    (d,) = c.ingest([counter(3, name="tcp_open_connections")])
    assert d.gauge and d.value == 3
