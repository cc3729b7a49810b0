"""The sandbox's cluster source: the recorded objects file, polled for changes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path

from nodemesh.api.clusterstate import objects_path, read_objects
from nodemesh.controlplane.registry import WATCHED_KINDS, WorkloadRegistry
from nodemesh.controlplane.sources import ClusterSource

log = logging.getLogger("nodemesh.controlplane.sources.sandbox")


class SandboxSource(ClusterSource):
    """Reads `<state_dir>/objects.json` and re-reads it whenever it changes.

    The sandbox replaces the file atomically, so a changed (inode, mtime, size) is a cheap and
    reliable change signal; the file's resourceVersion is checked too, in case two writes land
    within one mtime tick.
    """

    def __init__(self, state_dir: str | os.PathLike[str], poll_s: float = 0.5) -> None:
        super().__init__()
        self.state_dir = Path(state_dir)
        self.poll_s = poll_s
        self._task: asyncio.Task[None] | None = None
        self._seen: tuple[int, int, int] | None = None
        self._rv = -1

    async def start(self, registry: WorkloadRegistry) -> None:
        self.poll_once(registry)
        self._task = asyncio.create_task(self._run(registry), name="sandbox-source")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self, registry: WorkloadRegistry) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                self.poll_once(registry)
            except Exception:  # a bad write must not end the source; the next write fixes it
                log.exception("event=sandbox_read_failed dir=%s", self.state_dir)

    def poll_once(self, registry: WorkloadRegistry) -> bool:
        """Load the file if it changed; True when the registry was refreshed."""
        path = objects_path(self.state_dir)
        try:
            st = path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = (0, 0, 0)
        if stamp == self._seen and stamp != (0, 0, 0):
            return False
        try:
            objects = read_objects(self.state_dir)
        except (json.JSONDecodeError, ValueError):
            return False  # caught mid-write by a non-atomic writer: retry next poll
        self._seen = stamp
        if objects.resource_version == self._rv and self.synced.is_set():
            return False
        self._rv = objects.resource_version
        for kind in WATCHED_KINDS:
            registry.replace(kind, objects.of_kind(kind))
        if not self.synced.is_set():
            self.synced.set()
            log.info("event=sandbox_synced rv=%s objects=%d", objects.resource_version, len(objects.items))
        return True
