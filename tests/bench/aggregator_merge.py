"""CPU per 1 s bucket of the aggregator's merges, in process (docs/scale.md, "Windows and minutes").

6,000 keys, 1,200 of them with traffic each second, 4 minutes recorded; then, timed alone with
`time.process_time`: a 60 s and a 1 h window's first build, `seal()` (a tree without it: 0), and
downsampling the whole minutes.

    python3 tests/bench/aggregator_merge.py
"""

from __future__ import annotations

import random
import time

from nodemesh.api.model import LATENCY_BUCKETS_MS
from nodemesh.controlplane.aggregate import Aggregator

T0 = 1_700_000_040
N_LATENCY = len(LATENCY_BUCKETS_MS) + 1


def main() -> None:
    rng = random.Random(1)
    agg = Aggregator(retention_s=3600, clock=lambda: 0.0, downsample_after_s=600)
    keys = [("inbound", f"k{i}") for i in range(6000)]
    lat = [0] * N_LATENCY
    lat[5] = 2
    n = 0
    for sec in range(T0, T0 + 240):
        for key in rng.sample(keys, 1200):
            agg.record(key, t=sec + 0.5, success=2, requests=2, latency=lat, latency_sum=3.5, read_bytes=100)
            n += 1
    first = {}
    for width in (60, 3600):
        t0 = time.process_time()
        agg.totals_by_key(width, now=T0 + 240.5)
        first[width] = time.process_time() - t0
    t0 = time.process_time()
    sealed = agg.seal(now=T0 + 240.5) if hasattr(agg, "seal") else 0
    seal_s = time.process_time() - t0
    agg.downsample_after_s = 60
    t0 = time.process_time()
    merged = agg.downsample(now=T0 + 240.5)
    down_s = time.process_time() - t0
    print(f"{n} buckets; first build: 60 s window {first[60] * 1e3:.0f} ms "
          f"({first[60] / (1200 * 60) * 1e6:.2f} us/bucket), 1 h {first[3600] * 1e3:.0f} ms")
    per_sealed = f"{seal_s / sealed * 1e6:.2f} us each" if sealed else "no seal() in this tree"
    print(f"seal {seal_s:.2f} s ({sealed} buckets, {per_sealed}); "
          f"downsample {down_s:.2f} s ({merged} buckets, {down_s / max(merged, 1) * 1e6:.2f} us each)")


if __name__ == "__main__":
    main()
