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


# ---------------------------------------------------------------------------- idle eviction (created_ms)
def stamped(value: float, created: int, **labels: str) -> pb.Series:
    return pb.Series(name="request_total", labels={**LABELS, **labels}, value=value, created_ms=created)


def test_evicted_series_coming_back_higher_is_all_new_not_an_increase() -> None:
    # 40 counted, evicted at the agent, back as a new incarnation that reached 55 by the next
    # report: all 55 are new. A plain "went down = reset" rule would have counted 15.
    c = AgentCounters("a1", first_report_is_baseline=False)
    assert values(c.ingest([stamped(40, created=1000)])) == [40]
    assert values(c.ingest([])) == []                      # evicted: missing from the report
    assert values(c.ingest([stamped(55, created=9000)])) == [55]
    assert values(c.ingest([stamped(60, created=9000)])) == [5]


def test_new_incarnation_in_the_very_next_report_is_counted_whole() -> None:
    # Evicted and re-created between two reports: the created stamp alone tells them apart.
    c = AgentCounters("a1", first_report_is_baseline=False)
    c.ingest([stamped(40, created=1000)])
    assert values(c.ingest([stamped(41, created=2000)])) == [41]
    assert c.resets == 1


def test_missing_series_are_forgotten_but_rejected_ones_are_not() -> None:
    c = AgentCounters("a1", first_report_is_baseline=False)
    c.ingest([stamped(5, created=1, dst_name="a"), stamped(7, created=1, dst_name="b")])
    assert len(c) == 2
    # b reported as NaN (rejected): still alive at the agent, must not be forgotten, or its whole
    # value would be counted again when it is valid in the next report.
    c.ingest([stamped(5, created=1, dst_name="a"), stamped(float("nan"), created=1, dst_name="b")])
    assert len(c) == 2 and c.rejected == 1
    assert values(c.ingest([stamped(5, created=1, dst_name="a"), stamped(9, created=1, dst_name="b")])) == [2]
    c.ingest([stamped(9, created=1, dst_name="b")])        # a evicted
    assert len(c) == 1 and c.forgotten == 1


def test_baseline_report_then_eviction_counts_only_what_followed() -> None:
    c = AgentCounters("a1", first_report_is_baseline=True)  # controller restarted
    assert c.ingest([stamped(100, created=1)]) == []
    assert values(c.ingest([stamped(120, created=1)])) == [20]
    c.ingest([])
    assert values(c.ingest([stamped(3, created=50)])) == [3]
