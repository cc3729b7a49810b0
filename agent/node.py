"""NodeTelemetry: the parent process's half of telemetry.

Gathers the workers' cumulative snapshots (over workerlinks) into the node's totals, serves the
admin endpoints, keeps the identity index (from the controller stream, or from the sandbox's
recorded objects when there is no controller) and hands it to every worker, fans tap commands out
to workers and tap events back to whoever listens (the controller link, tests).

Totals never go backwards: a worker that exits (crash or restart) leaves its last snapshot in a
"retired" sum (counters and histograms; its open-connection gauge is dropped, those sockets
died with it). A restarted worker counts from zero and is added on top.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from nodemesh.agent import workerlink
from nodemesh.agent.admin import AdminServer
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.identity import IdentityFileSource
from nodemesh.agent.metrics import Snapshot, merge, without_gauges
from nodemesh.agent.podindex import PodIndex
from nodemesh.api.gen import nodemesh_pb2 as pb

log = logging.getLogger("nodemesh.agent.node")

CAPTURE_CHECK_INTERVAL_S = 2.0

TapSink = Callable[[pb.TapEvent], None]


def make_agent_id(node: str, pid: int, start_time_ms: int) -> str:
    """Unique per agent process, so the controller sees a restart as a counter reset."""
    return f"{node}/{pid}/{start_time_ms}"


class NodeTelemetry:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.start_time_ms = int(time.time() * 1000)
        self.agent_id = make_agent_id(config.node, os.getpid(), self.start_time_ms)
        self.index = PodIndex(config.node)
        self.ready = False
        self.capture_installed = False
        self._links: dict[int, workerlink.Link] = {}
        self._live: dict[int, Snapshot] = {}
        self._retired: Snapshot = {}
        self._identity: bytes | None = None
        self._taps: dict[str, bytes] = {}           # open taps, replayed to workers attached later
        self._tap_sinks: list[TapSink] = []
        self.admin = AdminServer(config.admin_host, config.admin_port, snapshot=self.snapshot,
                                 ready=lambda: self.ready and self.identity_synced(),
                                 excluded_ips=self.index.local_excluded_ips,
                                 capture_installed=lambda: self.capture_installed,
                                 identity_synced=self.identity_synced)
        self._identity_source: IdentityFileSource | None = None
        self.controller_link: Any = None            # agent.report.ControllerLink when configured
        self._admin_open = False
        self._capture_watch: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.admin.start()
        self._admin_open = True
        if self.config.watch_capture:
            self._capture_watch = asyncio.create_task(self._watch_capture())
        if self.config.controller:
            from nodemesh.agent.report import ControllerLink

            self.controller_link = ControllerLink(self.config, self)
            self.controller_link.start()
        elif self.config.identity_file:
            self._identity_source = IdentityFileSource(self.config.identity_file, self.apply_identity)
            self._identity_source.start()
        log.info("event=telemetry_started agent_id=%s controller=%s", self.agent_id,
                 self.config.controller or "-")

    def close_admin(self) -> None:
        """Drain start: not ready any more, and stop accepting admin connections."""
        self.ready = False
        if self._admin_open:
            self.admin.stop_listening()
            self._admin_open = False

    async def stop(self) -> None:
        self.ready = False
        if self._capture_watch is not None:
            self._capture_watch.cancel()
            self._capture_watch = None
        if self.controller_link is not None:
            await self.controller_link.stop()  # sends a final report with everything merged
            self.controller_link = None
        if self._identity_source is not None:
            await self._identity_source.stop()
            self._identity_source = None
        for index in list(self._links):
            self.detach_worker(index)
        await self.admin.stop()
        self._admin_open = False

    def set_ready(self, ready: bool) -> None:
        self.ready = ready

    def identity_synced(self) -> bool:
        """Has the agent had its identity since it started (or has it no source of one)? `/ready`
        waits for it: until then the agent cannot name the pods capture must leave alone — the
        mesh's own among them — so its node is not captured (docs/architecture.md, "The mesh never
        depends on itself"), and a rolling update keeps the old agent until the new one has it."""
        return self._identity is not None or not (self.config.controller or self.config.identity_file)

    def set_capture_installed(self, installed: bool) -> None:
        if installed != self.capture_installed:
            log.info("event=capture_state installed=%s", installed)
        self.capture_installed = installed

    async def _watch_capture(self) -> None:
        """Read (never write) whether the redirector's capture is in place, for `nodemesh check`
        and the nodemesh_capture_installed gauge. The redirector owns the rules."""
        from nodemesh.agent.capture import capture_active  # not redirector.apply: see agent/capture.py

        while True:
            try:
                installed = await capture_active()
            except OSError as exc:
                installed = None
                log.debug("event=capture_check_failed error=%s", exc)
            if installed is not None:  # a failed read says nothing: keep what we knew
                self.set_capture_installed(installed)
            await asyncio.sleep(CAPTURE_CHECK_INTERVAL_S)

    # ------------------------------------------------------------------ workers
    def attach_worker(self, index: int, parent_end: workerlink.ChannelEnd) -> None:
        if index in self._links:
            self.detach_worker(index)  # a restarted worker whose death we had not seen yet
        link = workerlink.Link(parent_end, partial(self._on_worker_message, index),
                               partial(self._on_worker_gone, index))
        link.start()
        self._links[index] = link
        if self._identity is not None:
            link.send((workerlink.MSG_IDENTITY, self._identity))
        for tap_id, filt in self._taps.items():
            link.send((workerlink.MSG_TAP_OPEN, tap_id, filt))

    def detach_worker(self, index: int) -> None:
        link = self._links.pop(index, None)
        if link is not None:
            link.close()
        self._retire(index)

    def _retire(self, index: int) -> None:
        last = self._live.pop(index, None)
        if last is not None:
            self._retired = merge([self._retired, without_gauges(last)])

    def _on_worker_gone(self, index: int) -> None:
        link = self._links.get(index)
        if link is not None and link.closed:
            del self._links[index]
            self._retire(index)
        log.info("event=worker_link_closed worker=%d", index)

    def _on_worker_message(self, index: int, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == workerlink.MSG_METRICS:
            self._live[index] = msg[1]
        elif kind == workerlink.MSG_TAP_EVENT:
            self._publish_tap(pb.TapEvent.FromString(msg[1]))
        elif kind == workerlink.MSG_HELLO:
            log.debug("event=worker_hello worker=%d pid=%d", index, msg[2])

    def request_flush(self) -> None:
        """Ask every worker for a fresh snapshot now (e.g. before a final report)."""
        for link in list(self._links.values()):  # a send may find a dead worker and drop it
            link.send((workerlink.MSG_FLUSH,))

    @property
    def workers(self) -> list[int]:
        return sorted(self._links)

    # ------------------------------------------------------------------ metrics
    def snapshot(self) -> Snapshot:
        """The node's cumulative series: retired workers' last counts plus every live worker's."""
        return merge([self._retired, *self._live.values()])

    # ------------------------------------------------------------------ identity
    def apply_identity(self, snapshot: pb.IdentitySnapshot) -> None:
        self.index.update(snapshot)
        self._identity = snapshot.SerializeToString()
        for link in list(self._links.values()):  # a send may find a dead worker and drop it
            link.send((workerlink.MSG_IDENTITY, self._identity))

    # ------------------------------------------------------------------ tap
    def open_tap(self, tap_id: str, filt: pb.TapFilter) -> None:
        data = filt.SerializeToString()
        self._taps[tap_id] = data
        for link in list(self._links.values()):  # a send may find a dead worker and drop it
            link.send((workerlink.MSG_TAP_OPEN, tap_id, data))

    def close_tap(self, tap_id: str) -> None:
        if self._taps.pop(tap_id, None) is None:
            return
        for link in list(self._links.values()):  # a send may find a dead worker and drop it
            link.send((workerlink.MSG_TAP_CLOSE, tap_id))

    def close_all_taps(self) -> None:
        for tap_id in list(self._taps):
            self.close_tap(tap_id)

    @property
    def open_taps(self) -> list[str]:
        return sorted(self._taps)

    def add_tap_sink(self, sink: TapSink) -> None:
        self._tap_sinks.append(sink)

    def remove_tap_sink(self, sink: TapSink) -> None:
        with contextlib.suppress(ValueError):
            self._tap_sinks.remove(sink)

    def _publish_tap(self, event: pb.TapEvent) -> None:
        if event.tap_id not in self._taps:
            return  # closed while the event was in flight
        for sink in self._tap_sinks:
            sink(event)
