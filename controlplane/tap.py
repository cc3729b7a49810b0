"""Tap fan-out: one CLI tap becomes TapOpen on the agents that can see matching traffic.

An agent does no tap work until it gets a TapOpen, so the controller opens a tap only on the
agents whose node runs pods of the target (or the --to) resource, merges their TapEvents into
one stream, limits the merged stream to max_rps requests per second, and closes the tap on every
agent it opened it on when the caller goes away.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable

from nodemesh.api.gen import nodemesh_pb2 as pb

MAX_TRACKED_REQUESTS = 10_000
QUEUE_SIZE = 2_000


def tap_scope(flt: pb.TapFilter) -> tuple[str, str, str]:
    """(namespace, type, name) a tap reads, as its permission is checked (auth.authorize_tap)."""
    t = flt.target
    if t.type == "namespace":
        ns = t.name or t.namespace
        return ns, "namespace", ns
    return t.namespace, t.type, t.name


class TokenBucket:
    """`rate` tokens per second, bursts up to one second's worth (at least one)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self._clock = clock
        self._last = self._clock()

    def take(self) -> bool:
        if self.rate <= 0:
            return True
        now = self._clock()
        self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.rate)
        self._last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class TapSession:
    """One caller's tap: its filter, the agents it is open on, and the merged event queue."""

    def __init__(self, flt: pb.TapFilter, max_rps: float) -> None:
        self.tap_id = uuid.uuid4().hex[:16]
        self.filter = pb.TapFilter()
        self.filter.CopyFrom(flt)
        self.filter.max_rps = max_rps
        self.limiter = TokenBucket(max_rps)
        self.queue: asyncio.Queue[pb.TapEvent] = asyncio.Queue(QUEUE_SIZE)
        self.agents: set[str] = set()          # agent ids the tap is open on
        self._admitted: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.forwarded = 0
        self.dropped = 0

    def open_message(self) -> pb.ControllerMessage:
        return pb.ControllerMessage(tap_open=pb.TapOpen(tap_id=self.tap_id, filter=self.filter))

    def close_message(self) -> pb.ControllerMessage:
        return pb.ControllerMessage(tap_close=pb.TapClose(tap_id=self.tap_id))

    def offer(self, agent_id: str, event: pb.TapEvent) -> bool:
        """Queue an agent's event if the merged rate allows; a request admitted at its
        request_init keeps its response events, a request refused there loses all of them."""
        rid = (agent_id, event.request_id)
        which = event.WhichOneof("event")
        if which == "request_init":
            if not self.limiter.take():
                self.dropped += 1
                return False
            self._admitted[rid] = None
            if len(self._admitted) > MAX_TRACKED_REQUESTS:
                self._admitted.popitem(last=False)
        elif rid not in self._admitted:
            return False
        elif which == "response_end":
            self._admitted.pop(rid, None)
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:  # a slow reader must not grow us without bound
            self.dropped += 1
            if which == "request_init":
                self._admitted.pop(rid, None)  # never shown: its responses must not show alone
            return False
        self.forwarded += 1
        return True
