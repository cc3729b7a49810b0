"""The store's blocks, downsampled minutes and kept windows change no answer: random traffic over two hours — many keys,
late seconds and replays (some past the downsampling horizon), histograms, gauges, series columns
added in place or batched, prunes every 10 s — and every window from 10 s to 1 h, built fresh or
kept sliding, equals a naive sum of the events recorded (each counted at its second, or at its
minute's middle second once that minute is downsampled, or at its 5 minutes' middle second once
they are coarsened)."""

from __future__ import annotations

import math
import random
from array import array

import pytest
from nodemesh.api.columns import Columns
from nodemesh.api.model import RESPONSE_LATENCY_MS, RESPONSE_TOTAL
from nodemesh.controlplane.aggregate import COARSE_S, COARSER_S, N_LATENCY, Aggregator, SeriesKey, Totals
from nodemesh.controlplane.columns import ingest_columns
from nodemesh.controlplane.deltas import RefEntry

T0 = 1_700_000_017   # not a minute boundary
FIELDS = ("success", "failure", "requests", "tcp_open", "tcp_close", "read_bytes", "write_bytes")
Event = tuple[int, SeriesKey, dict[str, float], list[int], float]   # sec, key, counters, latency, latency_sum


class Naive:
    """Every event as recorded, and every gauge, summed afresh for each query."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.gauges: dict[tuple[SeriesKey, str], tuple[float, float]] = {}

    def totals(self, agg: Aggregator, window_s: int, now: float) -> dict[SeriesKey, tuple]:
        end = int(now)
        lo = end - window_s
        minutes_before, fives_before = agg._before[COARSE_S], agg._before[COARSER_S]
        sums: dict[SeriesKey, list] = {}
        for sec, key, counters, latency, latency_sum in self.events:
            width = 1 if sec >= minutes_before else COARSER_S if sec < fives_before else COARSE_S
            filed = sec - sec % width + width // 2
            if not lo <= filed < end:
                continue
            s = sums.setdefault(key, [dict.fromkeys(FIELDS, 0.0), [0] * N_LATENCY, 0.0, 0.0, True])
            s[4] = True   # a bucket in the window, even of zeros: the key is in the answer
            for name, v in counters.items():
                s[0][name] += v
            s[1] = [a + b for a, b in zip(s[1], latency)]
            s[2] += latency_sum
        for (key, _), (ts, v) in self.gauges.items():
            if ts >= now - window_s:
                s = sums.setdefault(key, [dict.fromkeys(FIELDS, 0.0), [0] * N_LATENCY, 0.0, 0.0, False])
                s[3] += v
        return {key: (tuple(s[0][f] for f in FIELDS), tuple(s[1]), s[2], s[3]) for key, s in sums.items()
                if s[4] or s[3] > 0}


def observed(t: Totals) -> tuple:
    return (tuple(getattr(t, f) for f in FIELDS), tuple(t.latency), t.latency_sum, t.open_connections)


def same(got: dict[SeriesKey, Totals], want: dict[SeriesKey, tuple], what: str) -> None:
    assert got.keys() == want.keys(), what
    for key, t in got.items():
        g, w = observed(t), want[key]
        assert (g[0], g[1], g[3]) == (w[0], w[1], w[3]), (what, key)
        assert math.isclose(g[2], w[2], rel_tol=1e-9, abs_tol=1e-6), (what, key)


def run(seed: int, downsample_after_s: int, coarsen_after_s: int, seconds: int = 4800, n_keys: int = 60) -> int:
    rng = random.Random(seed)
    agg = Aggregator(retention_s=3600, clock=lambda: 0.0, downsample_after_s=downsample_after_s,
                     coarsen_after_s=coarsen_after_s)
    naive = Naive()
    keys = [("inbound", f"ns{k % 3}", f"pod-{k}") for k in range(n_keys)]
    refs = {}
    for i, key in enumerate(keys):   # a stream's refs as the controller resolves them
        refs[2 * i + 1] = RefEntry({}, key, RESPONSE_TOTAL, "success")
        refs[2 * i + 2] = RefEntry({}, key, RESPONSE_LATENCY_MS, "latency")
    checked = 0
    now = float(T0)
    widths = [10, 60, 300, 600, 900, 3600]
    while now < T0 + seconds:
        now += rng.choice((1.0, 1.0, 1.0, 0.4, 2.0, 7.0))
        for _ in range(rng.randint(0, 4)):       # record(): mostly this second, some late, some replays
            sec = int(now) - rng.choice((1, 1, 1, 2, 5, 61, 200, 700, 1000, 1500, 3500))
            key = rng.choice(keys)
            counters = {f: float(rng.randint(0, 4)) for f in rng.sample(FIELDS, 3)}
            latency = [0] * N_LATENCY
            if rng.random() < 0.5:
                latency[rng.randrange(N_LATENCY)] = rng.randint(1, 3)
            latency_sum = rng.random() * 40 if any(latency) else 0.0
            agg.record(key, t=sec + 0.5, latency=latency if any(latency) else None, latency_sum=latency_sum,
                       **counters)
            naive.events.append((sec, key, counters, latency, latency_sum))
        if rng.random() < 0.6:                   # a columns report (in place, or batched when it must)
            sec = int(now) - rng.choice((1, 1, 1, 2, 90, 800, 1300))
            chosen = rng.sample(range(n_keys), rng.randint(1, 10))
            cols = Columns()
            for i in chosen:
                v = float(rng.randint(1, 5))
                cols.refs.append(2 * i + 1)
                cols.values.append(v)
                latency = [0] * N_LATENCY
                latency[rng.randrange(N_LATENCY)] = rng.randint(1, 3)
                total = rng.random() * 30
                cols.hist_refs.append(2 * i + 2)
                cols.hist_sums.append(total)
                cols.hist_counts.extend(array("Q", latency))
                naive.events.append((sec, keys[i], {"success": v}, latency, total))
            rejected, slow = ingest_columns(agg, refs, cols, sec, "agent", N_LATENCY, True)
            assert (rejected, slow) == (0, [])
        if rng.random() < 0.2:                   # gauges (the latest per reporter counts)
            key, reporter = rng.choice(keys), rng.choice(("a", "b"))
            value = float(rng.choice((0, 0, 1, 3)))
            agg.set_gauge(key, reporter, value, t=now)
            naive.gauges[(key, reporter)] = (now, value)
        if int(now) % 10 == 0:                   # the controller's housekeeping
            agg.prune(now=now)
            naive.gauges = {k: g for k, g in naive.gauges.items() if g[0] >= int(now) - agg.retention_s}
        if rng.random() < 0.05:
            for width in (*rng.sample(widths, 2), rng.randint(10, 3600)):
                kept = agg.totals_by_key(width, now)
                want = naive.totals(agg, width, now)
                same(kept, want, f"window {width} at {now - T0:.1f}")
                checked += len(want)
        if rng.random() < 0.02:                   # a window nobody kept: built fresh now
            agg._windows.clear()
    if downsample_after_s:
        assert agg._coarse_before > T0 + seconds - downsample_after_s - 2 * COARSE_S, "minutes were not downsampled"
    if coarsen_after_s:
        assert agg._before[COARSER_S] > T0 + seconds - coarsen_after_s - 2 * COARSER_S, "5 minutes were not merged"
    else:
        assert agg._before[COARSER_S] < T0
    return checked


@pytest.mark.parametrize("seed, downsample_after_s, coarsen_after_s",
                         [(1, 600, 0), (2, 600, 900), (3, 60, 0), (4, 0, 0), (5, 120, 900), (6, 60, 300), (7, 120, 3600)])
def test_windows_over_sealed_minutes_equal_a_naive_sum(seed: int, downsample_after_s: int, coarsen_after_s: int) -> None:
    assert run(seed, downsample_after_s, coarsen_after_s) > 3000


def test_a_fresh_window_over_downsampled_minutes() -> None:
    """A minute's block holds one entry per key and column, and a fresh 1 h window over them and
    the seconds after the horizon is their exact sum."""
    agg = Aggregator(retention_s=3600, clock=lambda: 0.0, downsample_after_s=120, coarsen_after_s=0)
    keys = [("inbound", f"p{i}") for i in range(4)]
    for sec in range(T0, T0 + 1200):
        for key in keys:
            agg.record(key, t=sec + 0.5, success=1, requests=1)
    agg.prune(now=T0 + 1200.5)
    # 2 entries per key and second: ~120 s of seconds + ~18 minutes of one entry per key-column
    assert agg.stored_entries() <= len(keys) * 2 * (3 * COARSE_S + 20)
    t = agg.totals_by_key(3600, now=T0 + 1200.5)
    assert {k: (v.success, v.requests) for k, v in t.items()} == dict.fromkeys(keys, (1200.0, 1200.0))
    assert agg.seconds_of(keys[0])[:2] == [T0 - T0 % COARSE_S + 30, T0 - T0 % COARSE_S + 90]


def test_a_kept_hour_forgets_what_the_retention_pruned() -> None:
    """A 1 h window last moved before a prune held seconds older than the retention; they must
    still leave it when it slides (they were counted forever: the index of them was pruned)."""
    agg = Aggregator(retention_s=3600, clock=lambda: 0.0, downsample_after_s=0)  # 1 s edges: exact
    key = ("inbound", "p")
    for sec in range(T0, T0 + 5000):
        agg.record(key, t=sec + 0.5, success=1, requests=1)
        if sec % 10 == 0:
            agg.prune(now=sec + 0.9)
        if sec % 25 == 0 and sec > T0 + 3700:
            assert agg.totals_by_key(3600, now=sec + 0.95)[key].success == 3600


@pytest.mark.parametrize("retention_s", [600, 660])
def test_downsampling_at_the_retention_edge(retention_s: int) -> None:
    """`--downsample-after` may equal `--retention`: minutes reach the horizon as their seconds
    leave the retention, while a lagging kept window still holds them."""
    agg = Aggregator(retention_s=retention_s, clock=lambda: 0.0, downsample_after_s=600)
    naive = Naive()
    key = ("inbound", "p")
    for sec in range(T0, T0 + 2000):
        agg.record(key, t=sec + 0.5, success=1, requests=1)
        naive.events.append((sec, key, {"success": 1.0, "requests": 1.0}, [0] * N_LATENCY, 0.0))
        if sec % 10 == 0:
            agg.prune(now=sec + 0.9)
        if sec % 25 == 0:
            for width in (60, 600):
                same(agg.totals_by_key(width, now=sec + 0.95), naive.totals(agg, width, sec + 0.95), f"{width} {sec}")
