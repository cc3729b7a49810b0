"""Downsampling: per-second buckets older than the horizon become one bucket per minute, and the
windows answer the same totals as the per-second buckets they replaced."""

from __future__ import annotations

import asyncio
import random

import pytest
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.controlplane.aggregate import N_LATENCY, Aggregator, Totals
from nodemesh.controlplane.controller import Controller
from nodemesh.controlplane.main import parse_args

T0 = 1_700_000_040  # a minute boundary
KEYS = [("inbound", f"p{i}") for i in range(5)]


def traffic(seed: int = 1, seconds: int = 1800) -> list[tuple[int, tuple[str, ...], dict]]:
    rng = random.Random(seed)
    out = []
    for sec in range(T0, T0 + seconds):
        for key in KEYS:
            if rng.random() < 0.3:
                lat = [0] * N_LATENCY
                lat[rng.randrange(N_LATENCY)] = rng.randint(1, 4)
                out.append((sec, key, {"success": rng.randint(0, 5), "failure": rng.randint(0, 1),
                                       "requests": rng.randint(1, 6), "latency": lat,
                                       "latency_sum": rng.random() * 50, "read_bytes": rng.randint(0, 999),
                                       "tcp_open": rng.randint(0, 1)}))
    return out


def fed(downsample_after_s: int, events: list, query_every: int = 0) -> Aggregator:
    agg = Aggregator(retention_s=3600, clock=lambda: 0.0, downsample_after_s=downsample_after_s)
    for i, (sec, key, values) in enumerate(events):
        agg.record(key, t=sec + 0.5, **values)
        if query_every and i % query_every == 0:  # kept windows slide along (and span the horizon)
            agg.totals_by_key(3600, now=sec + 1.0)
            agg.totals_by_key(60, now=sec + 1.0)
            agg.prune(now=sec + 1.0)
    return agg


def same(a: dict[tuple[str, ...], Totals], b: dict[tuple[str, ...], Totals]) -> None:
    assert a.keys() == b.keys()
    for key, ta in a.items():
        tb = b[key]
        assert (ta.success, ta.failure, ta.requests, ta.tcp_open, ta.latency) == (
            tb.success, tb.failure, tb.requests, tb.tcp_open, tb.latency)
        assert abs(ta.latency_sum - tb.latency_sum) < 1e-6 and abs(ta.read_bytes - tb.read_bytes) < 1e-6


def buckets(agg: Aggregator) -> int:
    return agg.stored_entries()


def test_downsampled_minutes_give_the_totals_of_their_seconds() -> None:
    events = traffic()
    now = T0 + 1800 + 0.5
    fine, coarse = fed(0, events), fed(600, events)
    coarse.prune(now=now)
    # The 20 oldest minutes: ~18 seconds' entries per key-minute and column become 1; the last
    # 10 stay per second.
    assert buckets(coarse) < buckets(fine) / 2
    # Windows covering whole minutes of the downsampled part, and windows inside the horizon.
    for window in (3600, 1800, 1200, 600, 300, 60, 10):
        same(fine.totals_by_key(window, now=now), coarse.totals_by_key(window, now=now))


def test_a_window_ending_past_the_horizon_counts_a_minute_when_its_middle_is_inside() -> None:
    agg = Aggregator(retention_s=3600, clock=lambda: 0.0)
    agg.record(KEYS[0], t=T0 + 5, requests=1)    # minute T0: filed at T0 + 30
    agg.record(KEYS[0], t=T0 + 50, requests=2)
    agg.prune(now=T0 + 1300)
    assert agg.seconds_of(KEYS[0]) == [T0 + 30]
    now = T0 + 1300
    assert agg.totals_by_key(1300 - 29, now=now)[KEYS[0]].requests == 3  # starts at T0 + 29
    assert KEYS[0] not in agg.totals_by_key(1300 - 31, now=now)          # starts at T0 + 31


def test_kept_windows_stay_equal_to_a_fresh_sum_across_downsampling() -> None:
    events = traffic(seed=2, seconds=1500)
    kept = fed(600, events, query_every=7)      # windows slide through every downsample
    plain = fed(0, events)
    now = T0 + 1500 + 0.5
    assert kept._coarse_before > T0 and kept.stored_entries() < plain.stored_entries() / 2
    for window in (3600, 60):
        got = kept.totals_by_key(window, now=now)       # the kept, slid window
        kept._windows.clear()
        same(got, kept.totals_by_key(window, now=now))   # rebuilt from the buckets
        same(got, plain.totals_by_key(window, now=now))  # and the per-second truth


def test_a_replay_older_than_the_horizon_lands_in_its_minute() -> None:
    agg = Aggregator(retention_s=3600, clock=lambda: 0.0)
    agg.record(KEYS[0], t=T0 + 1, requests=1)
    agg.prune(now=T0 + 1300)
    agg.totals_by_key(3600, now=T0 + 1300)           # a kept window holding that minute
    agg.record(KEYS[0], t=T0 + 59, requests=4)      # an agent's history, replayed late
    agg.record(KEYS[1], t=T0 + 61, requests=2)
    assert agg.seconds_of(KEYS[0]) == [T0 + 30]
    assert agg.seconds_of(KEYS[1]) == [T0 + 90]
    totals = agg.totals_by_key(3600, now=T0 + 1300)
    assert (totals[KEYS[0]].requests, totals[KEYS[1]].requests) == (5, 2)


def test_retention_drops_minute_buckets_too() -> None:
    agg = Aggregator(retention_s=1200, clock=lambda: 0.0)
    agg.record(KEYS[0], t=T0 + 1, requests=1)
    agg.prune(now=T0 + 700)
    assert agg.seconds_of(KEYS[0]) == [T0 + 30]
    assert agg.prune(now=T0 + 1300) == 1 and len(agg) == 0


def test_retention_and_downsample_flags_reach_the_store_and_bound_the_window() -> None:
    base = ["--state-dir", "/nonexistent"]
    config = parse_args([*base, "--retention", "900", "--downsample-after", "300"])
    assert (config.retention_s, config.downsample_after_s) == (900, 300)
    assert parse_args([*base, "--downsample-after", "0"]).downsample_after_s == 0
    with pytest.raises(SystemExit):
        parse_args([*base, "--retention", "7200"])
    with pytest.raises(SystemExit):
        parse_args([*base, "--retention", "600", "--downsample-after", "900"])
    c = Controller(config)
    assert (c.aggregator.retention_s, c.aggregator.downsample_after_s) == (900, 300)
    assert c.route_aggregator.downsample_after_s == 300
    long = asyncio.run(c.answer_stat(pb.StatRequest(selector=pb.Resource(type="deploy"), all_namespaces=True,
                                                    window_seconds=1800)))
    assert "--retention 900s" in long.error
    short = asyncio.run(c.answer_stat(pb.StatRequest(selector=pb.Resource(type="deploy"), all_namespaces=True,
                                                     window_seconds=600)))
    assert not short.error
