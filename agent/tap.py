"""The tap registry: open taps, their filters and rate limits, and the TapEvents they produce.

Tap is pull, not log: with no tap open the traffic path checks one dict's truthiness and moves on.
When a request matches an open tap, a token bucket per tap decides (once, at request start) whether
this request is reported; an admitted request produces all three of its events (request-init,
response-init, response-end), a refused one none, and is only counted in `dropped`. Nothing here
waits: over the rate, events are dropped, traffic never slowed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from nodemesh.api.gen import nodemesh_pb2 as pb

if TYPE_CHECKING:
    from nodemesh.agent.observe import RequestHead
    from nodemesh.agent.podindex import PeerLabels

Emit = Callable[[pb.TapEvent], None]


def resource_matches(res: pb.Resource, peer: PeerLabels, service: str = "") -> bool:
    """Does a peer (namespace, kind, name, pod) belong to the resource `res`?

    An empty namespace in `res` means any namespace; an empty name any resource of the type.
    `service` ("name.namespace") is only given for destinations, where a Service can match.
    """
    ns, kind, name, pod = peer
    rtype = res.type
    if rtype == "namespace":
        return ns == (res.name or res.namespace) and kind != "unknown"
    if res.namespace and ns != res.namespace:
        return False
    if rtype in ("", "all"):
        return kind != "unknown"
    if rtype == "pod":
        return bool(pod) and (not res.name or pod == res.name)
    if rtype == "service":
        if not service:
            return False
        svc_name, _, svc_ns = service.partition(".")
        return (not res.name or svc_name == res.name) and (not res.namespace or svc_ns == res.namespace)
    return kind == rtype and (not res.name or name == res.name)


class Tap:
    __slots__ = ("admitted", "burst", "dropped", "filter", "id", "last", "rate", "tokens")

    def __init__(self, tap_id: str, filt: pb.TapFilter, default_max_rps: float) -> None:
        self.id = tap_id
        self.filter = filt
        self.rate = filt.max_rps if filt.max_rps > 0 else default_max_rps
        # A burst of one second's worth: a quiet tap shows the first requests immediately.
        self.burst = max(1.0, self.rate)
        self.tokens = self.burst
        self.last = time.monotonic()
        self.admitted = 0
        self.dropped = 0

    def matches(self, src: PeerLabels, dst: PeerLabels, service: str, head: RequestHead) -> bool:
        f = self.filter
        if f.HasField("to"):
            # `tap X --to Y`: requests from X to Y.
            if not (resource_matches(f.target, src) and resource_matches(f.to, dst, service)):
                return False
        elif not (resource_matches(f.target, src) or resource_matches(f.target, dst, service)):
            return False
        if f.method and head.method.upper() != f.method.upper():
            return False
        if f.path_prefix and not head.path.startswith(f.path_prefix):
            return False
        if f.authority and head.authority != f.authority:
            return False
        return not (f.scheme and head.scheme != f.scheme)

    def admit(self, now: float) -> bool:
        tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            self.admitted += 1
            return True
        self.tokens = tokens
        self.dropped += 1
        return False


class TapRegistry:
    """Open taps of one process. `taps` is the dict the hot path checks for truthiness."""

    def __init__(self, default_max_rps: float = 100.0) -> None:
        self.taps: dict[str, Tap] = {}
        self.default_max_rps = default_max_rps

    def open(self, tap_id: str, filt: pb.TapFilter) -> Tap:
        tap = Tap(tap_id, filt, self.default_max_rps)
        # Replace the dict rather than mutate it, so an iteration in progress is never disturbed.
        self.taps = {**self.taps, tap_id: tap}
        return tap

    def close(self, tap_id: str) -> Tap | None:
        taps = dict(self.taps)
        tap = taps.pop(tap_id, None)
        self.taps = taps
        return tap

    def close_all(self) -> None:
        self.taps = {}

    def match(self, src: PeerLabels, dst: PeerLabels, service: str, head: RequestHead) -> list[Tap] | None:
        """Taps that match this request and admit it under their rate; None when none does."""
        hit: list[Tap] | None = None
        now = time.monotonic()
        for tap in self.taps.values():
            if tap.matches(src, dst, service, head) and tap.admit(now):
                if hit is None:
                    hit = []
                hit.append(tap)
        return hit

    @property
    def dropped(self) -> int:
        return sum(t.dropped for t in self.taps.values())


def peer_message(ip: str, port: int, labels: PeerLabels) -> pb.Peer:
    ns, kind, name, pod = labels
    peer = pb.Peer(ip=ip, port=port, namespace=ns, pod=pod)
    if kind != "unknown":
        peer.owner.CopyFrom(pb.Resource(namespace=ns, type=kind, name=name))
    return peer
