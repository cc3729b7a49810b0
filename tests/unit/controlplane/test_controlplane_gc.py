"""The controller keeps Python's cyclic collector off its ~2 M long-lived objects (Controller.tend_gc):
they are frozen, so a full collection walks only the young ones, and thawed and collected once
when they grew by half or an hour passed — cyclic garbage frozen alive is reclaimed there."""

from __future__ import annotations

import gc
import time
import weakref

from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.controller import GC_THAW_MIN, GC_THAW_S, Controller


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_tend_gc_freezes_then_thaws_on_growth_and_hourly_reclaiming_frozen_cycles() -> None:
    c = Controller(ControllerConfig())
    unwatch = c.watch_gc()
    try:
        now = time.time()
        gc.unfreeze()
        c.tend_gc(now)                            # freezes what lives (thawed and collected if > the floor)
        base = gc.get_freeze_count()
        assert base > 0
        assert c.tend_gc(now) is False            # no growth: nothing walked
        # A cycle frozen alive, then dropped: no collection reaches it while it is frozen.
        cycle = _Cycle()
        c.tend_gc(now)
        gone = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert gone() is not None
        full = c.metrics.gc_pause.labels(generation="2")._sum.get()  # noqa: SLF001 - the pause was timed
        # Growth past half (and the floor) thaws, collects (the cycle with it) and freezes again.
        kept = [[i] for i in range(int(base * 0.5) + GC_THAW_MIN + 1000)]
        assert c.tend_gc(now + 10) is True
        assert gone() is None
        assert c.metrics.gc_pause.labels(generation="2")._sum.get() > full  # noqa: SLF001
        assert gc.get_freeze_count() >= len(kept)
        assert c.tend_gc(now + 20) is False       # no growth since: nothing walked
        assert c.tend_gc(now + 10 + GC_THAW_S) is True   # an hour after the last thaw: once more
    finally:
        unwatch()
        gc.unfreeze()
