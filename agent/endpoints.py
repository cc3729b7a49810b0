"""Choosing the endpoint pod behind a Service ClusterIP: least-loaded of two random choices."""

from __future__ import annotations

import random
from typing import Protocol


class ServiceIndex(Protocol):
    def service_endpoints(self, ip: str, port: int) -> list[tuple[str, int]] | None: ...


class EndpointPicker:
    """Counts open connections per endpoint in this worker; picks per connection."""

    def __init__(self, index: ServiceIndex | None, rng: random.Random | None = None) -> None:
        self.index = index
        self.open: dict[tuple[str, int], int] = {}
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
