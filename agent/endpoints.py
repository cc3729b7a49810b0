"""Choosing the endpoint pod behind a Service ClusterIP: least-loaded of two random choices.

An endpoint whose connect just failed (refused, unreachable, timed out: a pod gone with its node,
whose IP the identity still lists until the deltas arrive) is *suspect* for `SUSPECT_S`: picks
avoid it while another ready endpoint is left, and the relay's one retry goes elsewhere
(`retry`).
"""

from __future__ import annotations

import random
import time
from typing import Protocol

SUSPECT_S = 5.0


class ServiceIndex(Protocol):
    def service_endpoints(self, ip: str, port: int) -> list[tuple[str, int]] | None: ...


class EndpointPicker:
    """Counts open connections per endpoint in this worker; picks per connection."""

    def __init__(self, index: ServiceIndex | None, rng: random.Random | None = None) -> None:
        self.index = index
        self.open: dict[tuple[str, int], int] = {}
        self.suspect: dict[tuple[str, int], float] = {}   # endpoint -> until (monotonic)
        self._rng = rng or random.Random()

    def pick(self, ip: str, port: int) -> tuple[str, int]:
        """The address to connect to for a client that dialled ip:port."""
        if self.index is None:
            return (ip, port)
        endpoints = self.index.service_endpoints(ip, port)
        if not endpoints:
            # Not a ClusterIP we know (a pod IP, an external host), or a Service without ready
            # endpoints: connect as dialled and let the network answer.
            return (ip, port)
        if self.suspect:
            endpoints = self._trusted(endpoints) or endpoints
        return self._least_loaded(endpoints)

    def retry(self, ip: str, port: int, failed: tuple[str, int]) -> tuple[str, int]:
        """The connect to `failed`, chosen for a client that dialled ip:port, failed: another ready
        endpoint if there is one, else ip:port as dialled (kube-proxy decides)."""
        self.suspect[failed] = time.monotonic() + SUSPECT_S
        endpoints = self.index.service_endpoints(ip, port) if self.index is not None else None
        others = self._trusted([e for e in endpoints or () if e != failed])
        return self._least_loaded(others) if others else (ip, port)

    def _trusted(self, endpoints: list[tuple[str, int]]) -> list[tuple[str, int]]:
        now = time.monotonic()
        for endpoint, until in list(self.suspect.items()):
            if until <= now:
                del self.suspect[endpoint]
        return [e for e in endpoints if e not in self.suspect]

    def _least_loaded(self, endpoints: list[tuple[str, int]]) -> tuple[str, int]:
        if len(endpoints) == 1:
            return endpoints[0]
        a, b = self._rng.sample(endpoints, 2)
        return a if self.open.get(a, 0) <= self.open.get(b, 0) else b

    def acquire(self, endpoint: tuple[str, int]) -> None:
        self.open[endpoint] = self.open.get(endpoint, 0) + 1

    def release(self, endpoint: tuple[str, int]) -> None:
        n = self.open.get(endpoint, 0) - 1
        if n > 0:
            self.open[endpoint] = n
        else:
            self.open.pop(endpoint, None)
