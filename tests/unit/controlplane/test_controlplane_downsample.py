"""Downsampling: per-second blocks older than the horizon become one block per minute, minute
blocks older than the coarsening horizon one block per 5 minutes, and the windows answer the
same totals as the blocks they replaced."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.controlplane import aggregate
from nodemesh.controlplane.aggregate import COARSER_S, N_LATENCY, Aggregator, Totals
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


def fed(downsample_after_s: int, events: list, query_every: int = 0, coarsen_after_s: int = 0) -> Aggregator:
    agg = Aggregator(retention_s=3600, clock=lambda: 0.0, downsample_after_s=downsample_after_s,
                     coarsen_after_s=coarsen_after_s)
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
    agg = Aggregator(retention_s=3600, clock=lambda: 0.0, downsample_after_s=600, coarsen_after_s=0)
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
    agg = Aggregator(retention_s=3600, clock=lambda: 0.0, coarsen_after_s=0)
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
    agg = Aggregator(retention_s=1200, clock=lambda: 0.0, coarsen_after_s=0)
    agg.record(KEYS[0], t=T0 + 1, requests=1)
    agg.prune(now=T0 + 700)
    assert agg.seconds_of(KEYS[0]) == [T0 + 30]
    assert agg.prune(now=T0 + 1300) == 1 and len(agg) == 0


def test_retention_and_downsample_flags_reach_the_store_and_bound_the_window() -> None:
    base = ["--state-dir", "/nonexistent"]
    config = parse_args([*base, "--retention", "900", "--downsample-after", "300", "--coarsen-after", "600"])
    assert (config.retention_s, config.downsample_after_s, config.coarsen_after_s) == (900, 300, 600)
    assert parse_args([*base, "--downsample-after", "0", "--coarsen-after", "0"]).downsample_after_s == 0
    defaults = parse_args(base)
    assert (defaults.downsample_after_s, defaults.coarsen_after_s) == (120, 900)
    # The default never makes another flag alone an error (5 minutes only ever come from minutes).
    assert parse_args([*base, "--retention", "600"]).coarsen_after_s == 900
    assert parse_args([*base, "--downsample-after", "1200"]).coarsen_after_s == 900
    with pytest.raises(SystemExit):
        parse_args([*base, "--coarsen-after", "30"])
    with pytest.raises(SystemExit):
        parse_args([*base, "--retention", "7200"])
    with pytest.raises(SystemExit):
        parse_args([*base, "--retention", "600", "--downsample-after", "900"])
    c = Controller(config)
    assert (c.aggregator.retention_s, c.aggregator.downsample_after_s, c.aggregator.coarsen_after_s) == (900, 300, 600)
    assert (c.route_aggregator.downsample_after_s, c.route_aggregator.coarsen_after_s) == (300, 600)
    long = asyncio.run(c.answer_stat(pb.StatRequest(selector=pb.Resource(type="deploy"), all_namespaces=True,
                                                    window_seconds=1800)))
    assert "--retention 900s" in long.error
    short = asyncio.run(c.answer_stat(pb.StatRequest(selector=pb.Resource(type="deploy"), all_namespaces=True,
                                                     window_seconds=600)))
    assert not short.error


# ------------------------------------------------------------------ 5-minute blocks
F0 = T0 - T0 % COARSER_S + COARSER_S   # a 5-minute boundary


def test_five_minute_blocks_give_the_totals_of_their_minutes_and_seconds() -> None:
    events = traffic(seed=3, seconds=2700)
    now = T0 + 2700 + 0.5
    fine, coarse, minutes = fed(0, events), fed(120, events, coarsen_after_s=600), fed(120, events)
    coarse.prune(now=now)
    minutes.prune(now=now)
    tiers = coarse.tier_bytes()
    assert tiers[1] and tiers[60] and tiers[300]                 # seconds, minutes, 5 minutes
    merged = minutes.tier_bytes()
    # 36 minutes -> 8 minutes + 6 blocks of 5 (5 sparse keys: a block of 5 minutes holds more cells than one)
    assert tiers[1] == merged[1] and tiers[60] + tiers[300] < merged[60] * 0.6
    end = int(now)
    starts = [F0, F0 + 300, end - 900 - (end - 900) % 300, end - 600 - (end - 600) % 60, end - 120, end - 60, end - 10]
    for start in starts:   # windows starting at a block's edge, in each tier
        window = end - start
        same(fine.totals_by_key(window, now=now), coarse.totals_by_key(window, now=now))
    # The tiers' edges: seconds after the downsampling horizon, minutes until the coarsening one.
    assert coarse._before[60] == end - 120 - (end - 120) % 60
    assert coarse._before[COARSER_S] == end - 600 - (end - 600) % COARSER_S
    b5, b1 = coarse._before[COARSER_S], coarse._before[60]
    assert [coarse.filed_second(s) for s in (b5 - 1, b5, b5 + 59, b1 - 1, b1)] == [
        b5 - COARSER_S + 150, b5 + 30, b5 + 30, b1 - 30, b1]


def test_a_window_edge_inside_five_minutes_counts_them_when_their_middle_is_inside() -> None:
    agg = Aggregator(retention_s=3600, clock=lambda: 0.0, downsample_after_s=120, coarsen_after_s=600)
    agg.record(KEYS[0], t=F0 + 5, requests=1)      # 5 minutes F0: filed at F0 + 150
    agg.record(KEYS[0], t=F0 + 290, requests=2)
    agg.prune(now=F0 + 100)                       # not yet past either horizon
    assert agg.seconds_of(KEYS[0]) == [F0 + 5, F0 + 290]
    agg.prune(now=F0 + 500)                       # minutes
    assert agg.seconds_of(KEYS[0]) == [F0 + 30, F0 + 270]
    now = F0 + 1300
    agg.prune(now=now)                            # 5 minutes
    assert agg.seconds_of(KEYS[0]) == [F0 + 150]
    assert agg.totals_by_key(1300 - 149, now=now)[KEYS[0]].requests == 3  # starts at F0 + 149
    assert KEYS[0] not in agg.totals_by_key(1300 - 151, now=now)          # starts at F0 + 151


def test_kept_windows_straddling_the_tiers_stay_equal_to_a_fresh_sum() -> None:
    events = traffic(seed=4, seconds=1800)
    kept = fed(120, events, query_every=5, coarsen_after_s=300)   # windows slide through every merge
    now = T0 + 1800 + 0.5
    assert kept._before[COARSER_S] > T0
    for window in (3600, 1000, 500, 200, 60, 10):
        kept.totals_by_key(window, now=now - 3)
    kept.prune(now=now)
    for window in (3600, 1000, 500, 200, 60, 10):
        got = kept.totals_by_key(window, now=now)       # kept, slid across the horizons
        fresh = kept._scan(window, int(now))            # summed afresh from the blocks
        same(got, fresh)


def test_a_late_record_into_merged_five_minutes_lands_at_their_middle() -> None:
    agg = Aggregator(retention_s=3600, clock=lambda: 0.0, downsample_after_s=120, coarsen_after_s=600)
    agg.record(KEYS[0], t=F0 + 1, requests=1)
    now = F0 + 1300
    agg.prune(now=now)
    agg.totals_by_key(3600, now=now)               # a kept window holding those 5 minutes
    agg.record(KEYS[0], t=F0 + 299, requests=4)    # late, into the merged 5 minutes
    agg.record(KEYS[1], t=F0 + 301, requests=2)    # the next 5 minutes (merged too)
    agg.record(KEYS[2], t=now - 200, requests=8)   # a merged minute
    assert agg.seconds_of(KEYS[0]) == [F0 + 150]
    assert agg.seconds_of(KEYS[1]) == [F0 + 450]
    assert agg.seconds_of(KEYS[2]) == [now - 200 - (now - 200) % 60 + 30]
    totals = agg.totals_by_key(3600, now=now)
    assert [totals[k].requests for k in KEYS[:3]] == [5, 2, 8]
    agg.prune(now=now + 600)                       # the late minute joins its 5 minutes
    assert agg.seconds_of(KEYS[2]) == [now - 200 - (now - 200) % 300 + 150]
    assert agg.totals_by_key(3600, now=now + 600)[KEYS[2]].requests == 8


def test_retention_drops_five_minute_blocks_at_their_middle() -> None:
    agg = Aggregator(retention_s=1200, clock=lambda: 0.0, downsample_after_s=120, coarsen_after_s=600)
    agg.record(KEYS[0], t=F0 + 1, requests=1)
    agg.prune(now=F0 + 1000)
    assert agg.seconds_of(KEYS[0]) == [F0 + 150]
    assert agg.prune(now=F0 + 150 + 1200) == 0 and len(agg) == 1   # the middle is the retention's edge
    assert agg.prune(now=F0 + 151 + 1200) == 1 and len(agg) == 0 and agg.stored_entries() == 0


def test_values_are_stored_in_the_narrowest_exact_type() -> None:
    agg = Aggregator(retention_s=3600, clock=lambda: 0.0)
    agg.record(KEYS[0], t=T0, requests=3, read_bytes=70000, latency=[1] + [0] * (N_LATENCY - 1), latency_sum=1.3)
    agg.record(KEYS[1], t=T0, requests=65535, read_bytes=2.0**40 + 1)
    agg._flush()
    kinds = {str(b.vals.dtype): sorted(b.vals.tolist()) for b in agg._blocks[T0]}
    assert kinds == {"uint16": [1, 3, 65535], "float32": [70000.0], "float64": [1.3, 2.0**40 + 1]}
    t = agg.totals_by_key(60, now=T0 + 1)
    assert (t[KEYS[1]].requests, t[KEYS[1]].read_bytes, t[KEYS[0]].latency_sum) == (65535, 2.0**40 + 1, 1.3)


def test_a_block_holds_each_id_once_with_its_entry_count() -> None:
    """Entries arrive in any id order (late records, several reports in a second); a block keeps
    them grouped by id — each id once, with how many entries follow — and sums as before, also
    for an id with more than 255 entries in a second."""
    agg = Aggregator(retention_s=3600, clock=lambda: 0.0)
    for key in (KEYS[3], KEYS[0], KEYS[3], KEYS[1]):
        agg.record(key, t=T0, requests=1, success=2)
    for _ in range(200):
        agg.record(KEYS[2], t=T0, requests=1, failure=1)
    agg._flush()
    (block,) = agg._blocks[T0]
    ids = {agg.id_of(k): k for k in KEYS[:4]}
    assert [ids[i] for i in block.uids.tolist()] == sorted(KEYS[:4], key=agg.id_of)
    assert dict(zip(block.uids.tolist(), block.counts.tolist())) == {
        agg.id_of(KEYS[0]): 2, agg.id_of(KEYS[1]): 2, agg.id_of(KEYS[2]): 400, agg.id_of(KEYS[3]): 4}
    assert block.counts.dtype.name == "int32" and len(block) == 408 and block.ids.tolist() == sorted(block.ids.tolist())
    t = agg.totals_by_key(10, now=T0 + 1)
    assert [(t[k].requests, t[k].success, t[k].failure) for k in KEYS[:4]] == [
        (1, 2, 0), (1, 2, 0), (200, 0, 200), (2, 4, 0)]


def test_merges_computed_off_the_loop_meet_late_records_kept_windows_and_a_store_moved_past() -> None:
    """The controller's path (`Controller.merge_off_loop`): a merge planned, its sums computed in a
    worker thread, applied back. Records for the planned seconds that arrive meanwhile join the
    merged block as they are; kept windows stay equal to a fresh sum and the totals to the
    per-second truth; a plan the store has moved past is dropped (None) and made again."""
    events = traffic(seed=5, seconds=1500)
    late = [(T0 + 1, KEYS[0], {"requests": 7, "success": 3}), (T0 + 59, KEYS[4], {"failure": 2}),
            (T0 + 60, KEYS[1], {"read_bytes": 11}), (T0 + 125, KEYS[2], {"requests": 4})]
    plain = fed(0, [e for e in events if e[0] != T0 + 125] + late)
    agg = fed(0, [e for e in events if e[0] != T0 + 125])   # a second without blocks when planned
    agg.downsample_after_s, agg.coarsen_after_s = 600, 900
    now = T0 + 1500 + 0.5
    agg.totals_by_key(3600, now=now)                 # kept windows across the tiers
    agg.totals_by_key(600, now=now)
    plan = agg.merge_plan(now)
    assert plan is not None and plan.width == 60 and plan.spans
    merged = asyncio.run(asyncio.to_thread(plan.compute))
    for sec, key, values in late:                    # while the sums were computed
        agg.record(key, t=sec + 0.5, **values)
    agg.totals_by_key(60, now=now)                   # a query freezes them into their seconds
    assert agg.merge_apply(plan, merged) is not None
    assert agg.merge_apply(plan, merged) is None     # the store has moved past it
    assert T0 + 125 not in agg._blocks               # the late second joined its minute's block
    stale = agg.merge_plan(now)
    assert stale is not None and stale.width == 300
    agg.prune(now=now)                               # merges the 5 minutes itself
    assert agg.merge_apply(stale, stale.compute()) is None
    assert asyncio.run(Controller.merge_off_loop(agg)) == 0   # nothing left due
    assert agg.merge_plan(now) is None
    assert agg._coarse_before > T0 and agg.stored_entries() < plain.stored_entries() / 2
    for window in (3600, 600, 60):
        got = agg.totals_by_key(window, now=now)
        same(got, plain.totals_by_key(window, now=now))   # the per-second truth (whole blocks)
        agg._windows.clear()
        same(got, agg.totals_by_key(window, now=now))     # kept windows equal a fresh sum


def test_a_dense_merge_summed_a_few_blocks_at_a_time_equals_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_merged` sums a dense merge into one accumulator a chunk of blocks at a time (a minute of
    1,000 agents' seconds concatenated at once held ~0.5 GB): any chunk size gives the same
    entries as summing every block at once."""
    rng = np.random.default_rng(3)
    blocks = []
    for _ in range(12):
        ids = np.sort(rng.choice(40, 25, replace=False).astype(np.int32)).repeat(3)
        cols = np.tile(np.array([0, 3, 9], dtype=np.uint8), 25)
        vals = rng.integers(1, 9, len(ids)).astype(np.float64)
        vals[1::3] += 0.25
        blocks += aggregate._compact(ids, cols, vals)

    def dense(ms: list) -> dict[int, float]:
        out: dict[int, float] = {}
        for m in ms:
            for cell, v in zip(m.flat().tolist(), m.vals.astype(np.float64).tolist()):
                out[cell] = out.get(cell, 0.0) + v
        return out
    want = dense(blocks)
    for chunk in (1, 7, 80, 1 << 20):
        monkeypatch.setattr(aggregate, "MERGE_CHUNK", chunk)
        got = dense(aggregate._merged(blocks))
        assert got.keys() == want.keys() and all(got[c] == want[c] for c in want), chunk
