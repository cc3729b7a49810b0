"""A worker's periodic upkeep: is its event loop overloaded, and memory back after a mass close.

- **Overload**: a timer due every `TICK_S` measures how late it runs (the loop's lag: how long
  ready callbacks wait). Lag over `OVERLOAD_LAG_S` on two ticks in a row sets
  `admission.overloaded` (admission.py then sheds new connections from sources holding more than
  their share); two on-time ticks clear it.
- **Idle**: a worker holding no connection, with nothing overloaded, throttled or tracked by
  fairness, has nothing for that tick to do: it ticks every `IDLE_TICK_S` instead (the memory
  check only), and the first connection admitted (`admission.on_busy`) brings the fast tick back at
  once. Measured (issue 18, docs/bench.md): a wake-up costs this 2-vCPU VM ~0.1 ms of CPU, so the
  ten fast ticks a second were ~1.5 ms of CPU per second per idle worker.
- **Fairness**: each tick hands the lag to `admission.fairness` (fairness.py), which sets every
  source's time budget for the next tick; the sources whose throttle lifts get their connections
  resumed and their held new connections let go on.
- **Stuck connections**: every `SWEEP_EVERY_TICKS` the worker's live connections are checked for
  one that should have finished and has not (client gone, upstream gone or never there, no connect
  under way): `Connection.reap_if_stuck` finishes it and logs `event=connection_reaped` with its
  state — a safety net for state-machine bugs, so a bug costs a log line, not a connection counted
  open for the agent's life. O(live connections) every 5 s: ~1 ms per 10,000.
- **Memory**: when the connections held fell by at least `TRIM_MIN_DROP` and to half their peak
  since the last trim, and have stopped falling (checked every second), `malloc_trim(0)` gives the allocator's free pages back to the system.
  Without it, 9,000 idle connections (+33 MB PSS) left the worker at +33 MB after they closed;
  with it +17 MB, which the next burst reuses (the rest: pymalloc arenas still holding a few
  long-lived objects each). Connections free their own memory at close (relay.py breaks their
  reference cycles), so no garbage collection is needed first.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time
from collections.abc import Iterable, Sized
from typing import Protocol

from nodemesh.agent.admission import Admission
from nodemesh.agent.fairness import TICK_S as FAIRNESS_TICK_S

log = logging.getLogger("nodemesh.agent.housekeeping")

TICK_S = FAIRNESS_TICK_S  # budgets (fairness.py) are per tick
IDLE_TICK_S = 1.0         # = TRIM_EVERY_TICKS fast ticks: the memory check keeps its pace
OVERLOAD_LAG_S = 0.05
TRIM_EVERY_TICKS = 10
TRIM_MIN_DROP = 1000
SWEEP_EVERY_TICKS = 50


class _Reapable(Protocol):
    def reap_if_stuck(self) -> bool: ...


class _Live(Iterable[_Reapable], Sized, Protocol):
    """A worker context's live connections (relay.WorkerContext.live)."""


def _malloc_trim() -> object | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl): nothing to give back this way
        return None


class Housekeeping:
    def __init__(self, admission: Admission, live: tuple[_Live, ...] = ()) -> None:
        self.admission = admission
        self.live = live   # the worker contexts' live connections, swept for stuck ones
        self.reaped = 0
        self.task: asyncio.Task[None] | None = None
        self.late_ticks = 0
        self.trims = 0
        self.last_open = 0
        self.last_cpu = time.thread_time()
        self._trim = _malloc_trim()
        self.idle_ticks = 0
        self._woken: asyncio.Future[None] | None = None

    def start(self) -> None:
        self.admission.on_busy = self.wake
        self.task = asyncio.get_running_loop().create_task(self._run())

    def idle(self) -> bool:
        """Nothing for a fast tick to watch: no connection held (or live), no overload or
        contention being tracked, no source known to fairness."""
        adm = self.admission
        fairness = adm.fairness
        return (adm.open == 0 and not adm.overloaded and self.late_ticks == 0 and not fairness.engaged
                and not fairness.loads and not any(len(live) for live in self.live))

    def wake(self) -> None:
        """A connection arrived: end an idle tick now."""
        woken = self._woken
        if woken is not None and not woken.done():
            woken.set_result(None)

    async def _idle_tick(self) -> None:
        loop = asyncio.get_running_loop()
        woken = self._woken = loop.create_future()
        timer = loop.call_later(IDLE_TICK_S, self.wake)
        try:
            await woken
        finally:
            timer.cancel()
            self._woken = None
        self.idle_ticks += 1
        self.last_cpu = time.thread_time()  # the idle stretch is no fast tick's CPU (fairness)

    def stop(self) -> None:
        if self.admission.on_busy == self.wake:
            self.admission.on_busy = None
        if self.task is not None:
            self.task.cancel()

    async def _run(self) -> None:
        tick = 0
        while True:
            if self.idle():
                await self._idle_tick()
                self.maybe_trim()
                continue
            due = time.monotonic() + TICK_S
            await asyncio.sleep(TICK_S)
            self.lag(time.monotonic() - due)
            tick += 1
            if tick % TRIM_EVERY_TICKS == 0:
                self.maybe_trim()
            if tick % SWEEP_EVERY_TICKS == 0:
                self.sweep()

    def sweep(self) -> int:
        """Finish connections that should have finished (Connection.reap_if_stuck)."""
        reaped = 0
        for live in self.live:
            if len(live):
                reaped += sum(1 for conn in list(live) if conn.reap_if_stuck())
        self.reaped += reaped
        return reaped

    def lag(self, lag_s: float) -> None:
        adm = self.admission
        if lag_s > OVERLOAD_LAG_S:
            self.late_ticks = min(self.late_ticks + 1, 2)
            if self.late_ticks == 2 and not adm.overloaded:
                adm.overloaded = True
                log.warning("event=overloaded lag_ms=%.0f connections=%d", lag_s * 1000, adm.open)
        else:
            self.late_ticks = max(self.late_ticks - 1, 0)
            if self.late_ticks == 0 and adm.overloaded:
                adm.overloaded = False
                log.info("event=overload_over connections=%d", adm.open)
        cpu = time.thread_time()   # the loop's thread: the worker's own CPU, not its helper threads'
        cpu_s, self.last_cpu = cpu - self.last_cpu, cpu
        self.fair_tick(lag_s, cpu_s)

    def fair_tick(self, lag_s: float, cpu_s: float) -> None:
        fairness = self.admission.fairness
        was_engaged = fairness.engaged
        for load in fairness.tick(lag_s, cpu_s):
            for conn in list(load.conns):
                conn.unthrottle()
            held, load.held = load.held, []
            for go in held:
                go()
        if fairness.engaged and log.isEnabledFor(logging.DEBUG):
            log.debug("event=fairness_tick lag_ms=%.0f cpu_ms=%.0f limit=%.0f %s", lag_s * 1000, cpu_s * 1000,
                     fairness.limit, " ".join(
                f"{l.source}={l.last}/{l.budget:.0f},c={len(l.conns)},h={len(l.held)}"
                for l in fairness.loads.values()))
        if fairness.engaged and not was_engaged:
            log.info("event=fairness_engaged lag_ms=%.0f sources=%d", lag_s * 1000, len(fairness.loads))
        elif was_engaged and not fairness.engaged:
            log.info("event=fairness_released throttles=%d", fairness.throttles)

    def maybe_trim(self) -> bool:
        adm = self.admission
        falling = self.last_open - adm.open >= TRIM_MIN_DROP // 10
        self.last_open = adm.open
        if falling or adm.peak - adm.open < TRIM_MIN_DROP or adm.open * 2 > adm.peak:
            return False  # no mass close, or one still going on: trim once it has settled
        adm.peak = adm.open
        if self._trim is not None:
            started = time.monotonic()
            self._trim(0)  # type: ignore[operator]
            self.trims += 1
            log.info("event=memory_trimmed connections=%d ms=%.1f", adm.open, (time.monotonic() - started) * 1000)
        return True
