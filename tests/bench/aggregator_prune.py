"""CPU of the aggregator's housekeeping (freezing pending seconds into blocks, downsampling), in
process (docs/scale.md, "Storage over time").

30,000 keys, 6,000 of them active each second with 6 entries (counts, and a latency sum that is
not an integer), appended as a report's columns are (numpy chunks); 1,200 s, `prune` every 10 s,
timed with `time.process_time`; then the store's bytes.

    python3 tests/bench/aggregator_prune.py [DOWNSAMPLE_AFTER_S]
"""

from __future__ import annotations

import sys
import time

import numpy as np
from nodemesh.controlplane.aggregate import Aggregator

T0 = 1_700_000_000
KEYS = 30_000


def main() -> None:
    rng = np.random.default_rng(1)
    agg = Aggregator(retention_s=3600, clock=lambda: 0.0,
                     downsample_after_s=int(sys.argv[1]) if len(sys.argv) > 1 else 600)
    for k in range(KEYS):
        agg.id_of(("k", str(k)))
    columns = np.array([0, 2, 3, 8, 9, 10], dtype=np.uint8)
    prune = 0.0
    for sec in range(T0, T0 + 1200):
        p = agg.pending(agg.filed_second(sec))
        ids = np.repeat(rng.permutation(KEYS)[:6000].astype(np.int32), 6)
        vals = rng.integers(1, 50, len(ids)).astype(np.float64)
        vals[2::6] += 0.37
        p.chunks.append((ids, np.tile(columns, 6000), vals))
        if sec % 10 == 0:
            t0 = time.process_time()
            agg.prune(now=sec + 0.9)
            prune += time.process_time() - t0
    print(f"prune CPU {prune:.2f} s  store {agg.stored_bytes() / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
