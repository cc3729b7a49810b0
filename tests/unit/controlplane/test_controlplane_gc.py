"""The controller keeps Python's cyclic collector off its ~2 M long-lived objects (Controller.tend_gc):
they are frozen, so a full collection walks only the young ones, and thawed and collected once
when they grew by half or an hour passed — cyclic garbage frozen alive is reclaimed there."""

from __future__ import annotations

import gc
import time
import weakref

from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.controller import GC_THAW_MIN, GC_THAW_S, Controller


def _full_pauses_s(c: Controller) -> float:
    got = c.metrics.registry.get_sample_value("nodemesh_controller_gc_pause_seconds_sum", {"generation": "2"})
    return got or 0.0


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
        full = _full_pauses_s(c)
        # Growth past half (and the floor) thaws, collects (the cycle with it) and freezes again.
        kept = [[i] for i in range(int(base * 0.5) + GC_THAW_MIN + 1000)]
        assert c.tend_gc(now + 10) is True
        assert gone() is None
        assert _full_pauses_s(c) > full   # the full collection was timed
        assert gc.get_freeze_count() >= len(kept)
        assert c.tend_gc(now + 20) is False       # no growth since: nothing walked
        assert c.tend_gc(now + 10 + GC_THAW_S) is True   # an hour after the last thaw: once more
    finally:
        unwatch()
        gc.unfreeze()
