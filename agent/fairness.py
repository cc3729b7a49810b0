"""Per-pod CPU fairness: one pod's flood cannot take a worker's time from the other pods.

A worker's event loop serves ready connections in turn, so its time is shared *per connection*:
a pod with 200 busy keep-alive connections gets 50 times the time of a pod with 4, and when the
worker is saturated the small pod's requests queue behind the big one's (measured: a steady 200
req/s pod went from 2 ms to 3 s p50 while another pod flooded the same agent with wrk; direct,
without the mesh, 6 ms). Fairness here is *per source* (the calling pod, or the other node's agent
when the agent is not transparent):

- **Accounting**: the time spent in each read callback (client and upstream side) is added to the
  connection's source, plus `CONNECTION_COST_S` for each connection it opens (accept, upstream
  connect and close, not timed one by one). Two clock reads per read callback.
- **Contention**: housekeeping's 100 ms tick reports the loop's lag. A tick that ran
  `CONTENDED_LAG_S` late, or whose accounted time was over `SATURATED_SHARE` of the tick, makes the
  worker *contended* for the next `ENGAGED_TICKS` ticks (then it lets everyone run free again, and
  re-engages within a tick if the contention comes back).
- **Budgets**: while contended and more than one source is active, each source may spend
  `TARGET_SHARE` of a tick minus what the others spent (each other one counted up to an equal
  share): max-min fair, so a pod the others leave room for still gets it. A source past its budget
  is *throttled* until the next tick: reading paused on its connections (the kernel's buffers and
  TCP flow control hold its bytes) and its new connections held, not dialled, like the identity
  wait (at most `MAX_HELD` per source; past that they go on to admission). The other sources'
  connections run as before.

Sans-IO: time and lag in, decisions out; relay.py pauses and resumes, housekeeping.py ticks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

TICK_S = 0.1               # housekeeping's tick: budgets are per tick
CONTENDED_LAG_S = 0.02      # a tick this late: callbacks waited this long for the loop
SATURATED_SHARE = 0.8       # a tick with this share of its time in accounted callbacks
TARGET_SHARE = 0.5          # while contended: the share of a tick the sources together may take
ENGAGED_TICKS = 20          # contended for this many ticks after the last sign of contention
CONNECTION_COST_S = 60e-6   # charged per connection opened (accept, connect, close)
MAX_HELD = 512              # new connections of a throttled source held at once
IDLE_FLOOR_S = 1e-5         # a source with less than this in a tick is not active

UNLIMITED = float("inf")


class SourceLoad:
    """One source's time in this worker: this tick's, its budget, its live connections."""

    __slots__ = ("budget", "busy", "conns", "held", "last", "source", "throttled")

    def __init__(self, source: str) -> None:
        self.source = source
        self.busy = 0.0                  # seconds in this tick
        self.last = 0.0                  # seconds in the last tick
        self.budget = UNLIMITED          # seconds allowed in this tick
        self.throttled = False
        self.conns: set[Any] = set()     # relay.Connection objects (paused and resumed by relay.py)
        self.held: list[Callable[[], None]] = []   # new connections waiting for the throttle to lift


class Fairness:
    """Per worker (shared by its outbound and inbound listeners, through Admission)."""

    def __init__(self, tick_s: float) -> None:
        self.tick_s = tick_s
        self.loads: dict[str, SourceLoad] = {}
        self.engaged = 0          # ticks left of contention
        self.throttles = 0        # times a source was throttled (for logs and tests)

    def load_for(self, source: str) -> SourceLoad:
        load = self.loads.get(source)
        if load is None:
            load = self.loads[source] = SourceLoad(source)
        return load

    def opened(self, load: SourceLoad, conn: object) -> None:
        load.conns.add(conn)
        load.busy += CONNECTION_COST_S

    def over_budget(self, load: SourceLoad) -> bool:
        """The source spent past its budget (the caller checked `busy > budget`): throttle it now,
        once. True when it is newly throttled (the caller pauses its connections)."""
        if load.throttled:
            return False
        load.throttled = True
        self.throttles += 1
        return True

    def tick(self, lag_s: float) -> list[SourceLoad]:
        """A housekeeping tick: new budgets for the next one. Returns the sources whose throttle
        lifts now (the caller resumes their connections and lets their held connections go on)."""
        loads = self.loads
        total = 0.0
        active = 0
        for load in loads.values():
            total += load.busy
            if load.busy >= IDLE_FLOOR_S:
                active += 1
        if lag_s > CONTENDED_LAG_S or total > SATURATED_SHARE * self.tick_s:
            self.engaged = ENGAGED_TICKS
        elif self.engaged:
            self.engaged -= 1
        released: list[SourceLoad] = []
        idle: list[str] = []
        if self.engaged and active > 1:
            equal = self.tick_s * TARGET_SHARE / active
            capped = sum(min(load.busy, equal) for load in loads.values())
            target = self.tick_s * TARGET_SHARE
            for load in loads.values():
                load.budget = max(equal, target - (capped - min(load.busy, equal)))
        else:
            for load in loads.values():
                load.budget = UNLIMITED
        for source, load in loads.items():
            load.last, load.busy = load.busy, 0.0
            if load.throttled:
                load.throttled = False
                released.append(load)
            elif not load.conns and not load.held and load.last == 0.0:
                idle.append(source)
        for source in idle:
            del loads[source]
        return released
