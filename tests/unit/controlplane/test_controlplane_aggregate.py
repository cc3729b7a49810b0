"""Aggregation math: histogram quantiles, rates, windows, gauges, retention."""

from __future__ import annotations

import pytest
from nodemesh.api.model import LATENCY_BUCKETS_MS
from nodemesh.controlplane.aggregate import BOUNDS, N_LATENCY, Aggregator, histogram_quantile

KEY = ("inbound",) + ("",) * 11
OTHER = ("outbound",) + ("",) * 11


def latency(**by_bound: int) -> list[int]:
    """Counts per bucket, keyed like b10=5 (the bucket with upper bound 10 ms) or inf=1."""
    counts = [0] * N_LATENCY
    for k, v in by_bound.items():
        counts[len(BOUNDS) if k == "inf" else BOUNDS.index(float(k[1:]))] = v
    return counts


def test_quantile_interpolates_inside_the_bucket() -> None:
    counts = latency(b20=100)  # all in (10, 20]
    assert histogram_quantile(0.5, BOUNDS, counts) == pytest.approx(15.0)
    assert histogram_quantile(0.95, BOUNDS, counts) == pytest.approx(19.5)
    assert histogram_quantile(0.99, BOUNDS, counts) == pytest.approx(19.9)


def test_quantile_picks_the_bucket_holding_the_rank() -> None:
    counts = latency(b1=50, b100=45, b1000=5)
    p50 = histogram_quantile(0.5, BOUNDS, counts)
    assert 0 < p50 <= 1  # rank 50 is the last observation of the first bucket
    p95 = histogram_quantile(0.95, BOUNDS, counts)
    assert 50 < p95 <= 100
    p99 = histogram_quantile(0.99, BOUNDS, counts)
    assert 500 < p99 <= 1000 and p99 == pytest.approx(500 + 500 * 4 / 5)


def test_quantile_in_inf_bucket_is_the_highest_bound_and_empty_is_none() -> None:
    assert histogram_quantile(0.5, BOUNDS, latency(inf=3)) == float(LATENCY_BUCKETS_MS[-1])
    assert histogram_quantile(0.5, BOUNDS, [0] * N_LATENCY) is None


def test_rates_and_success_over_a_window() -> None:
    agg = Aggregator()
    for sec in range(1000, 1060):
        agg.record(KEY, t=sec + 0.5, success=9, failure=1, read_bytes=100, latency=latency(b5=10))
    tot = agg.totals(60, now=1060.2)  # seconds 1000..1059, all complete
    assert tot.responses == 600
    assert tot.rps == pytest.approx(10.0)
    assert tot.success_rate == pytest.approx(0.9)
    assert tot.read_bytes_rate == pytest.approx(100.0)
    assert 4 < tot.quantile(0.5) <= 5
    # A 10 s window sees only the last 10 complete seconds; the second in progress waits.
    assert agg.totals(10, now=1060.2).responses == 100
    # The second in progress is not counted until it is over (its report may still be on its way).
    agg.record(KEY, t=1060.3, success=50)
    assert agg.totals(10, now=1060.5).responses == 100
    assert agg.totals(10, now=1061.0).responses == 140  # 1051..1060: nine of the old seconds + 50
    # Later, the window slides off the traffic.
    assert agg.totals(10, now=1080).responses == 0


def test_totals_by_key_filters_and_keeps_keys_apart() -> None:
    agg = Aggregator()
    agg.record(KEY, t=100, success=5)
    agg.record(OTHER, t=100, failure=2)
    by_key = agg.totals_by_key(60, now=101)
    assert by_key[KEY].success == 5 and by_key[OTHER].failure == 2
    only = agg.totals_by_key(60, now=101, where=lambda k: k[0] == "outbound")
    assert list(only) == [OTHER]


def test_latency_from_agent_with_other_bounds_is_rebinned() -> None:
    agg = Aggregator()
    agg.record(KEY, t=100, success=4, latency=[1, 3, 0], latency_bounds=(7.0, 15.0))
    tot = agg.totals(60, now=101)
    assert tot.latency[BOUNDS.index(10.0)] == 1 and tot.latency[BOUNDS.index(20.0)] == 3


def test_open_connections_is_latest_gauge_summed_over_agents() -> None:
    agg = Aggregator()
    agg.set_gauge(KEY, "agent-a", 3, t=100)
    agg.set_gauge(KEY, "agent-a", 5, t=101)
    agg.set_gauge(KEY, "agent-b", 2, t=101)
    assert agg.totals(60, now=102).open_connections == 7
    agg.drop_reporter("agent-b")
    assert agg.totals(60, now=102).open_connections == 5
    assert agg.totals(10, now=200).open_connections == 0  # not reported within the window


def test_a_gauge_back_at_zero_leaves_the_rows_and_a_later_open_returns() -> None:
    """Queries walk only keys some agent reports > 0 open connections for (most keys of a long-lived
    cluster are peers closed long ago, kept at 0): a key goes out of that set and comes back."""
    agg = Aggregator()
    agg.set_gauge(KEY, "agent-a", 2, t=100)
    agg.set_gauge(KEY, "agent-b", 0, t=100)
    agg.set_gauge(OTHER, "agent-a", 0, t=100)
    assert set(agg.totals_by_key(60, now=101)) == {KEY}
    agg.set_gauge(KEY, "agent-a", 0, t=101)
    assert agg.totals_by_key(60, now=102) == {}
    agg.set_gauge(OTHER, "agent-b", 4, t=102)
    got = agg.totals_by_key(60, now=103)
    assert set(got) == {OTHER} and got[OTHER].open_connections == 4
    agg.drop_reporter("agent-b")
    assert agg.totals_by_key(60, now=103) == {}
    agg.set_gauge(KEY, "agent-a", 1, t=0)
    agg.prune(now=4000)  # past retention: the gauge and its open mark go
    agg.set_gauge(KEY, "agent-b", 0, t=4000)
    assert agg.totals_by_key(60, now=4001) == {}


def test_retention_prunes_old_buckets_and_idle_keys() -> None:
    agg = Aggregator(retention_s=3600)
    agg.record(KEY, t=0, success=1)
    agg.record(OTHER, t=3000, success=1)
    assert agg.prune(now=3700) == 1
    assert list(agg.keys()) == [OTHER]
    assert agg.totals(3600, now=3700).responses == 1


def test_one_hour_window() -> None:
    agg = Aggregator()
    for sec in range(0, 3600, 10):
        agg.record(KEY, t=sec, success=36)
    assert agg.totals(3600, now=3599).rps == pytest.approx(3.6)


def test_flush_before_freezes_only_the_settled_seconds_and_changes_no_answer() -> None:
    agg, plain = Aggregator(), Aggregator()
    for a in (agg, plain):
        a.record(KEY, t=999.5, success=1)
        a.totals(60, now=1000.0)  # a kept window, which the flushed blocks must reach too
        for sec in range(1000, 1010):
            a.record(KEY, t=sec + 0.5, success=sec - 999, latency=latency(b5=1))
    agg.flush(1008)
    assert sorted(agg._pending) == [1008, 1009]   # the unsettled seconds wait
    assert 1007 in agg._blocks and 1008 not in agg._blocks
    # A late report for a frozen second, then more of the unsettled ones.
    for a in (agg, plain):
        a.record(KEY, t=1003.2, failure=4)
        a.record(KEY, t=1009.7, success=100)
    agg.flush(1011)
    assert not agg._pending
    for window, now in ((60, 1010.1), (10, 1010.1), (10, 1012.0)):
        got, want = agg.totals(window, now=now), plain.totals(window, now=now)
        assert (got.responses, got.success_rate, got.quantile(0.5)) == (want.responses, want.success_rate,
                                                                          want.quantile(0.5))
    assert agg.totals(60, now=1010.1).responses == 1 + sum(range(1, 11)) + 4 + 100
