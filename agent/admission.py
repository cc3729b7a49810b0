"""Admission: which new connections a worker takes, so that one pod cannot take it from the others.

A worker has room for `capacity` relayed connections (two fds each, from its fd limit). Every
connection is counted per source address (the calling pod, or the other node's agent). The
decisions, in order:

- **capacity**: the worker is full: the connection is shed.
- **fair share**: the worker is past its high-water mark (80 % of capacity), or its event loop is
  overloaded (`overloaded`, set by housekeeping.py from the loop's lag) while other sources are
  present: a source that already holds its share — of the capacity, or when overloaded of the
  connections held now, divided among the sources present plus one newcomer — is shed; a source
  new to the worker always gets in. One pod's flood of connections costs that pod, not its
  neighbours; a pod alone on an overloaded worker waits in the queue instead.
- **slow**: a connection whose first request has not arrived by the detection timeout is *slow*;
  a source may hold `max_slow` of those at once (a slowloris opens thousands); past that, the
  next slow one is answered at once (408) instead of being held for the header timeout.

A shed connection gets a clear answer — 503 (HTTP/1), GOAWAY ENHANCE_YOUR_CALM (HTTP/2), a reset
(anything else) — and is counted like any connection, with `error="shed: <reason>"` on
tcp_close_total. Sans-IO: counts in, decisions out; relay.py acts.
"""

from __future__ import annotations

from collections.abc import Callable

from nodemesh.agent.fairness import TICK_S, Fairness

SHED_CAPACITY = "capacity"
SHED_FAIR_SHARE = "fair_share"
SHED_SLOW = "slow"

HIGH_WATER = 0.8          # past this share of capacity, fair share applies
DEFAULT_MAX_SLOW = 256    # slow connections one source may hold in one worker
FD_RESERVE = 128          # fds a worker keeps for itself (listeners, pipes, logs, the loop)


def capacity_for(nofile: int) -> int:
    """Relayed connections a worker can hold with `nofile` fds: two each (client and upstream)."""
    return max(16, (nofile - FD_RESERVE) // 2)


class Admission:
    """Per worker (shared by its outbound and inbound listeners)."""

    __slots__ = ("by_source", "capacity", "fairness", "high_water", "max_slow", "on_busy", "open", "overloaded",
                 "peak", "slow")

    def __init__(self, capacity: int, max_slow: int = DEFAULT_MAX_SLOW) -> None:
        self.capacity = capacity
        self.high_water = int(capacity * HIGH_WATER)
        self.max_slow = max_slow
        self.open = 0                         # connections held now (shed ones too, until closed)
        self.peak = 0                         # most held since the last memory trim (memory.py)
        self.by_source: dict[str, int] = {}
        self.slow: dict[str, int] = {}
        self.overloaded = False
        self.fairness = Fairness(TICK_S)      # the worker's time per source (fairness.py)
        # Called when the first connection arrives at an idle worker (housekeeping.py: back to its
        # fast tick at once instead of at the end of its idle one).
        self.on_busy: Callable[[], None] | None = None

    def admit(self, source: str) -> str | None:
        """None to take the connection, else the reason to shed it. Counts it either way
        (`release` when it is gone)."""
        n = self.open + 1
        self.open = n
        self.peak = max(self.peak, n)
        if n == 1 and self.on_busy is not None:
            self.on_busy()
        by_source = self.by_source
        mine = by_source.get(source, 0)
        by_source[source] = mine + 1
        if n <= self.high_water and not self.overloaded:
            return None
        if n > self.capacity:
            return SHED_CAPACITY
        # A share of the room among the sources present, plus one newcomer who must still find
        # some; a newcomer itself always gets in. Overloaded but not full, the room is what is held
        # now, and only when others are there to be fair to: a pod alone queues, it is not refused.
        sources = len(by_source)
        if n > self.high_water:
            room = self.capacity
        elif sources > 1:
            room = n
        else:
            return None
        if mine and mine >= room // (sources + 1):
            return SHED_FAIR_SHARE
        return None

    def release(self, source: str) -> None:
        self.open -= 1
        n = self.by_source.get(source, 0) - 1
        if n > 0:
            self.by_source[source] = n
        else:
            self.by_source.pop(source, None)

    def mark_slow(self, source: str) -> bool:
        """The connection's first request is late. False: the source holds too many such: shed it."""
        n = self.slow.get(source, 0)
        if n >= self.max_slow:
            return False
        self.slow[source] = n + 1
        return True

    def unmark_slow(self, source: str) -> None:
        n = self.slow.get(source, 0) - 1
        if n > 0:
            self.slow[source] = n
        else:
            self.slow.pop(source, None)
