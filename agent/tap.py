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

    def sightings(self, src: PeerLabels, dst: PeerLabels, service: str, head: RequestHead,
                  directions: tuple[str, ...]) -> tuple[str, ...]:
        """The directions in which this tap shows the request, as Linkerd's tap shows what the
        target's own proxies saw: its outbound calls (`proxy=out`) and what it received
        (`proxy=in`); with `--to Y`, only its outbound calls to Y. `directions` are the ones this
        observation is recorded in (both, for a request between two pods of this node)."""
        f = self.filter
        if f.HasField("to"):
            seen: tuple[str, ...] = ("outbound",) if (
                "outbound" in directions and resource_matches(f.target, src)
                and resource_matches(f.to, dst, service)) else ()
        elif f.target.type == "service":
            # Only a client knows which Service it dialled: the Service's requests are the callers'.
            seen = ("outbound",) if "outbound" in directions and resource_matches(f.target, dst, service) else ()
        else:
            out = "outbound" in directions and resource_matches(f.target, src)
            inn = "inbound" in directions and resource_matches(f.target, dst, service)
            seen = ("outbound",) * out + ("inbound",) * inn
        if not seen:
            return ()
        if f.method and head.method.upper() != f.method.upper():
            return ()
        if f.path_prefix and not head.path.startswith(f.path_prefix):
            return ()
        if f.authority and head.authority != f.authority:
            return ()
        if f.scheme and head.scheme != f.scheme:
            return ()
        return seen

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
    """Open taps of one process. `taps` is the dict the hot path checks for truthiness; the
    registry is also the telemetry's observe.HeadersGate: headers are wanted while a tap is open."""

    def __init__(self, default_max_rps: float = 100.0) -> None:
        self.taps: dict[str, Tap] = {}
        self.headers_wanted = False
        self.default_max_rps = default_max_rps

    def open(self, tap_id: str, filt: pb.TapFilter) -> Tap:
        tap = Tap(tap_id, filt, self.default_max_rps)
        # Replace the dict rather than mutate it, so an iteration in progress is never disturbed.
        self.taps = {**self.taps, tap_id: tap}
        self.headers_wanted = True
        return tap

    def close(self, tap_id: str) -> Tap | None:
        taps = dict(self.taps)
        tap = taps.pop(tap_id, None)
        self.taps = taps
        self.headers_wanted = bool(taps)
        return tap

    def close_all(self) -> None:
        self.taps = {}
        self.headers_wanted = False

    def match(self, src: PeerLabels, dst: PeerLabels, service: str, head: RequestHead,
              directions: tuple[str, ...]) -> list[tuple[Tap, str]] | None:
        """(tap, direction) for every sighting of this request an open tap shows, each tap having
        admitted the request under its rate (once, however many sightings); None when none."""
        hit: list[tuple[Tap, str]] | None = None
        now = time.monotonic()
        for tap in self.taps.values():
            seen = tap.sightings(src, dst, service, head, directions)
            if seen and tap.admit(now):
                if hit is None:
                    hit = []
                hit.extend((tap, direction) for direction in seen)
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
