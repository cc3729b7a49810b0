"""A worker with no connection ticks slowly (housekeeping.IDLE_TICK_S) and the first connection
brings the fast tick back at once (issue 18: each wake-up costs CPU; an idle worker had ten a
second)."""

from __future__ import annotations

import asyncio

import pytest
from nodemesh.agent import housekeeping
from nodemesh.agent.admission import Admission
from nodemesh.agent.housekeeping import Housekeeping


class _Counting(Housekeeping):
    def __init__(self, admission: Admission) -> None:
        super().__init__(admission)
        self.fast_ticks = 0

    def fair_tick(self, lag_s: float, cpu_s: float) -> None:
        self.fast_ticks += 1
        super().fair_tick(lag_s, cpu_s)


async def _until(pred: object, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if pred():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.01)
    return bool(pred())  # type: ignore[operator]


def test_idle_worker_skips_fast_ticks_and_a_connection_restores_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(housekeeping, "IDLE_TICK_S", 60.0)  # no idle tick ends by itself in this test

    async def run() -> None:
        adm = Admission(100)
        hk = _Counting(adm)
        hk.start()
        assert adm.on_busy == hk.wake
        await asyncio.sleep(5 * housekeeping.TICK_S)
        assert hk.fast_ticks == 0 and hk.idle_ticks == 0      # idle: asleep in one long tick
        adm.admit("10.0.0.1")                                 # the first connection wakes it
        assert await _until(lambda: hk.fast_ticks >= 2, timeout=10.0)
        assert hk.idle_ticks == 1
        adm.release("10.0.0.1")                               # idle again: back to the slow tick
        assert await _until(lambda: hk._woken is not None, timeout=10.0)
        ticks = hk.fast_ticks
        await asyncio.sleep(5 * housekeeping.TICK_S)
        assert hk.fast_ticks == ticks
        hk.stop()
        assert adm.on_busy is None

    asyncio.run(run())


def test_not_idle_while_anything_is_tracked() -> None:
    adm = Admission(100)
    hk = Housekeeping(adm)
    assert hk.idle()
    adm.admit("a")
    assert not hk.idle()
    adm.release("a")
    assert hk.idle()
    adm.overloaded = True
    assert not hk.idle()
    adm.overloaded = False
    adm.fairness.engaged = 3
    assert not hk.idle()
    adm.fairness.engaged = 0
    hk.late_ticks = 1
    assert not hk.idle()
    hk.late_ticks = 0
    hk.live = ([object()],)  # type: ignore[list-item]
    assert not hk.idle()
