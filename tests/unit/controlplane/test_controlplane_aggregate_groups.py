"""The columnar store's group sums and series ids: `totals_by_group` equals merging
`totals_by_key` per group (gauges included), and an id freed at the retention and given to a new
key carries nothing of the old one."""

from __future__ import annotations

import math
import random

from nodemesh.controlplane.aggregate import N_LATENCY, Aggregator, SeriesKey, Totals

FIELDS = ("success", "failure", "requests", "tcp_open", "tcp_close", "read_bytes", "write_bytes", "open_connections")


def fields(t: Totals) -> tuple:
    return (*(getattr(t, f) for f in FIELDS), tuple(t.latency), round(t.latency_sum, 6), t.has_gauge)


def test_group_sums_equal_merged_key_totals() -> None:
    rng = random.Random(3)
    agg = Aggregator(retention_s=120, clock=lambda: 0.0, downsample_after_s=60)
    keys = [("inbound" if k % 3 else "outbound", f"ns{k % 4}", f"w{k % 7}", f"pod-{k}") for k in range(80)]
    keys += [("inbound", "ns9", "w1", f"brief-{k}") for k in range(200)]   # each seen once: dropped, ids reused
    now = 1_000_000.0
    gauges: dict[tuple[SeriesKey, str], tuple[float, float]] = {}
    for step in range(300):
        now += rng.choice((0.5, 1.0, 1.0, 3.0))
        for _ in range(rng.randint(0, 12)):
            latency = [0] * N_LATENCY
            latency[rng.randrange(N_LATENCY)] = rng.randint(1, 3)
            agg.record(rng.choice(keys[:80]) if rng.random() < 0.9 else keys[80 + step % 200], t=now - rng.choice((0, 1, 1, 4, 40)), success=rng.randint(0, 4),
                       failure=rng.randint(0, 1), requests=rng.randint(0, 4), latency=latency,
                       latency_sum=rng.random() * 9, read_bytes=rng.randint(0, 500))
        if rng.random() < 0.3:
            # timed (older agents) or held until the reporter goes (a ref'd gauge); both kinds on a key
            key, reporter = rng.choice(keys[:80]), rng.choice("abcd")
            at = now if reporter in "ab" else math.inf
            value = float(rng.choice((0, 1, 2)))
            agg.set_gauge(key, reporter, value, t=at)
            gauges[(key, reporter)] = (at, value)
        if rng.random() < 0.01:
            agg.drop_reporter("c")
            gauges = {k: g for k, g in gauges.items() if k[1] != "c"}
        if step % 10 == 0:
            agg.prune(now=now)
            gauges = {k: g for k, g in gauges.items() if g[0] >= int(now) - agg.retention_s}
        if step % 7 == 0:
            for window in (10, 60, 120):
                want_gauges: dict[SeriesKey, float] = {}
                for (key, _), (at, value) in gauges.items():
                    if at >= now - window:
                        want_gauges[key] = want_gauges.get(key, 0.0) + value
                assert agg.gauges(window, now) == {k: v for k, v in want_gauges.items() if v > 0}
                def group(k: SeriesKey) -> object:
                    return (k[1], k[2]) if k[0] == "inbound" and k[2] != "w0" else None
                want: dict[object, Totals] = {}
                for key, t in agg.totals_by_key(window, now).items():
                    g = group(key)
                    if g is not None:
                        want.setdefault(g, Totals(window)).merge(t)
                expected = {g: fields(t) for g, t in want.items()}
                got = agg.totals_by_group(window, now, group)
                assert {g: fields(t) for g, t in got.items()} == expected, (step, window)
                # the groups kept per id across prunes that free and reuse ids
                kept = agg.totals_by_group(window, now, group, token="by-workload")
                assert {g: fields(t) for g, t in kept.items()} == expected, (step, window)
                only = set(list(expected)[:3])
                some = agg.totals_by_group(window, now, group, token="by-workload", only=only)
                assert {g: fields(t) for g, t in some.items()} == {g: expected[g] for g in only}
    assert agg._epoch > 3, "no ids were freed"
    assert any(t.has_gauge for t in agg.totals_by_group(120, now, lambda k: k[1]).values())


def test_a_reused_id_starts_empty() -> None:
    agg = Aggregator(retention_s=600, clock=lambda: 0.0, downsample_after_s=120)
    old, new = ("inbound", "old"), ("inbound", "new")
    agg.record(old, t=1000.5, success=7)
    freed = agg.id_of(old)
    agg.totals_by_key(600, now=1001)                  # a kept window holding it
    assert agg.prune(now=1700) == 1 and old not in list(agg.keys())
    agg.record(new, t=1700.5, success=1)
    assert agg.id_of(new) == freed                    # the freed id, reused
    for window in (60, 600):
        got = agg.totals_by_key(window, now=1701)
        assert list(got) == [new] and got[new].success == 1
    assert agg.seconds_of(new) == [1700]
