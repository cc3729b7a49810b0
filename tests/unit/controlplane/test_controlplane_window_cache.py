"""The aggregator's kept sliding windows answer exactly what summing every key's buckets does:
late seconds, replays, seconds entering and leaving, several widths, a gap longer than a window."""

from __future__ import annotations

import random

from nodemesh.controlplane.aggregate import N_LATENCY, Aggregator


def _fields(t):
    return (t.success, t.failure, t.requests, tuple(t.latency), t.tcp_open, t.read_bytes, t.write_bytes)


def test_kept_windows_equal_a_full_scan() -> None:
    rng = random.Random(7)
    agg = Aggregator(retention_s=3600)
    keys = [tuple(f"{k}-{i}" for i in range(12)) for k in range(30)]
    now = 1_000_000.0
    checked = 0
    for step in range(400):
        now += rng.choice((0.0, 0.3, 1.0, 1.0, 2.0, 75.0 if step % 97 == 0 else 1.0))
        for _ in range(rng.randint(0, 20)):
            # mostly the current second, some late (a report crossing a second, a replay)
            t = now - rng.choice((0, 0, 0, 1, 2, 5, 30, 200))
            latency = [0] * N_LATENCY
            latency[rng.randrange(N_LATENCY)] = rng.randint(1, 3)
            agg.record(rng.choice(keys), t=t, success=rng.randint(0, 5), failure=rng.randint(0, 1),
                       requests=rng.randint(0, 5), latency=latency, read_bytes=rng.randint(0, 900))
        for window in (10, 60):
            where = (lambda k: k[0] < "2") if step % 2 else None
            kept = agg.totals_by_key(window, now, where)
            scan = agg._scan(window, int(now), where)
            assert {k: _fields(t) for k, t in kept.items()} == {k: _fields(t) for k, t in scan.items()}
            checked += len(scan)
    assert checked > 1000
    # a moment behind the kept window is answered by a scan, and is right too
    past = agg.totals_by_key(10, now - 50)
    assert {k: _fields(t) for k, t in past.items()} == \
        {k: _fields(t) for k, t in agg._scan(10, int(now - 50), None).items()}
