"""Cluster sources: where the controller learns pods, owners, services and nodes.

Two implementations behind one interface, feeding the same Kubernetes-shaped JSON objects into a
`WorkloadRegistry`: `KubernetesSource` (list + watch through the `kubernetes` client) and
`SandboxSource` (the sandbox's recorded objects file).
"""

from __future__ import annotations

import abc
import asyncio

from nodemesh.controlplane.registry import WorkloadRegistry


class ClusterSource(abc.ABC):
    """Keeps a registry in step with a cluster until stopped."""

    def __init__(self) -> None:
        self.synced = asyncio.Event()  # set once every kind has been listed at least once

    @abc.abstractmethod
    async def start(self, registry: WorkloadRegistry) -> None:
        """Begin feeding `registry` (returns once started, not once synced)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop feeding; idempotent."""

    async def wait_synced(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self.synced.wait(), timeout)
        except TimeoutError:
            return False
        return True


__all__ = ["ClusterSource"]
