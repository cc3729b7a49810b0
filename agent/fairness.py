"""Per-pod CPU fairness: one pod's flood cannot take a worker's time from the other pods.

A worker's event loop serves ready connections in turn, so its time is shared *per connection*:
a pod with 200 busy keep-alive connections gets 50 times the turns of a pod with 4, and when the
worker is saturated the small pod's requests queue behind the big one's (measured: a steady 200
req/s pod went from 2 ms to 3 s p50 while another pod flooded the same agent with wrk; direct,
without the mesh, 6 ms). Fairness here is *per source* (the calling pod, or the other node's agent
when the agent is not transparent):

- **Accounting in work units**: every read callback adds 1 unit (+1 per 16 KB read) to its
  connection's source, every connection opened `CONNECTION_WORK` (accept, upstream connect,
  close). An integer add per read. Timing each callback was tried and dropped: wall-clock time in
  a callback includes the time the process is preempted (a write wakes the server, which often
  runs first on a busy node), which charged a pod making 10 requests a tick as much as the flood;
  a CPU clock (`thread_time`) is a syscall, 1 µs, per read.
- **Contention**: housekeeping's 100 ms tick reports the loop's lag and the worker's CPU time. A
  tick that ran `CONTENDED_LAG_S` late (ready callbacks waited that long: the worker's own work, or
  a node whose CPUs are all busy), or in which the worker used `SATURATED_SHARE` of a CPU, is
  contended: the work all sources together may do in a tick (`limit`) becomes `DECREASE` of what
  they did (multiplicative decrease); each on-time tick lets it grow by `INCREASE`; after
  `ENGAGED_TICKS` calm ticks it is lifted. Measured on the fault sandbox: the flood's wrk, nginx and
  the agents share 2 CPUs, and the victim's requests waited mostly for a CPU (the worker itself used
  10-25 % of one); fewer flood requests through the agent is what gives it back.
- **Budgets**: while a limit is set and more than one source is active, it is shared max-min: each
  source may do what the others leave (each other one counted up to an equal share), at least its
  equal share and `MIN_SHARE`. A pod alone is never limited. A source past its budget is
  *throttled* until the next tick: reading paused on its connections, both sides (the kernel's
  buffers and TCP flow control hold its bytes), and its new connections held, not dialled, like
  the identity wait (at most `MAX_HELD` per source; past that they go on to admission). The other
  sources' connections run as before.

Sans-IO: work units, lag and CPU time in, budgets and releases out; relay.py counts, pauses and
resumes, housekeeping.py ticks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

TICK_S = 0.1               # housekeeping's tick: budgets are per tick
CONTENDED_LAG_S = 0.02     # a tick this late: callbacks waited this long for the loop
SATURATED_SHARE = 0.8      # a tick in which the worker used this share of a CPU
ENGAGED_TICKS = 20         # contended for this many ticks after the last sign of contention
DECREASE = 0.5             # contended tick: the sources together may do this share of the last tick's work
INCREASE = 1.05            # uncontended tick while engaged: the limit grows back by this factor
MIN_SHARE = 20             # work units a source may always do in a tick (10 small requests)
CONNECTION_WORK = 8        # work units of a connection opened (accept, connect, close) ~ 8 reads
BYTES_PER_WORK_SHIFT = 14  # one more unit per 16 KB read
MAX_HELD = 512             # new connections of a throttled source held at once

UNLIMITED = float("inf")


class SourceLoad:
    """One source in this worker: its work this tick, its budget, its live connections."""

    __slots__ = ("budget", "conns", "held", "last", "source", "throttled", "work")

    def __init__(self, source: str) -> None:
        self.source = source
        self.work = 0                    # units this tick
        self.last = 0                    # units in the last tick
        self.budget: float = UNLIMITED   # units allowed this tick
        self.throttled = False
        self.conns: set[Any] = set()     # relay.Connection objects (paused and resumed by relay.py)
        self.held: list[Callable[[], None]] = []   # new connections waiting for the throttle to lift


class Fairness:
    """Per worker (shared by its outbound and inbound listeners, through Admission)."""

    def __init__(self, tick_s: float) -> None:
        self.tick_s = tick_s
        self.loads: dict[str, SourceLoad] = {}
        self.engaged = 0                  # ticks left of contention
        self.limit: float = UNLIMITED     # units all sources together may do in a tick
        self.throttles = 0                # times a source was throttled (logged)

    def load_for(self, source: str) -> SourceLoad:
        load = self.loads.get(source)
        if load is None:
            load = self.loads[source] = SourceLoad(source)
        return load

    def opened(self, load: SourceLoad, conn: object) -> None:
        load.conns.add(conn)
        load.work += CONNECTION_WORK

    def over_budget(self, load: SourceLoad) -> bool:
        """The source did more than its budget (the caller checked `work > budget`): throttle it
        now, once. True when it is newly throttled (the caller pauses its connections)."""
        if load.throttled:
            return False
        load.throttled = True
        self.throttles += 1
        return True

    def tick(self, lag_s: float, cpu_s: float) -> list[SourceLoad]:
        """A housekeeping tick: `cpu_s` is the CPU time the worker used since the last one. Sets
        the budgets for the next tick; returns the sources whose throttle lifts now (the caller
        resumes their connections and lets their held connections go on)."""
        loads = self.loads
        total = 0
        active = 0
        for load in loads.values():
            total += load.work
            if load.work:
                active += 1
        if lag_s > CONTENDED_LAG_S or cpu_s > SATURATED_SHARE * self.tick_s:
            # Multiplicative decrease from what was done, until the loop is on time again.
            self.engaged = ENGAGED_TICKS
            self.limit = max(MIN_SHARE * max(active, 1), min(self.limit, total) * DECREASE)
        elif self.engaged:
            self.engaged -= 1
            self.limit = self.limit * INCREASE if self.engaged else UNLIMITED
        if self.limit != UNLIMITED and active > 1:
            # Max-min: each may do what the others leave (each other counted up to an equal share).
            equal = max(MIN_SHARE, self.limit / active)
            capped = sum(min(load.work, equal) for load in loads.values())
            for load in loads.values():
                load.budget = max(equal, self.limit - (capped - min(load.work, equal)))
        else:
            for load in loads.values():
                load.budget = UNLIMITED
        released: list[SourceLoad] = []
        idle: list[str] = []
        for source, load in loads.items():
            load.last, load.work = load.work, 0
            if load.throttled:
                load.throttled = False
                released.append(load)
            elif not load.conns and not load.held and not load.last:
                idle.append(source)
        for source in idle:
            del loads[source]
        return released
