"""NodeTelemetry: the parent process's half of telemetry.

Adds the workers' increments (over workerlinks) into the node's cumulative series (`NodeStore`:
wire labels capped, idle series evicted), serves the admin endpoints, keeps the identity index
(from the controller stream, or from the sandbox's recorded objects when there is no controller)
and hands every identity message to every worker, fans tap commands out to workers and tap events
back to whoever listens (the controller link, tests).

Totals never go backwards: a worker that exits (crash or restart) has delivered its counts up to
its last report; only its open-connection gauge is taken back out (those sockets died with it).
A restarted worker's increments are added on top.
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
from nodemesh.agent.metrics import NodeStore, Snapshot
from nodemesh.agent.podindex import IdentityGap, PodIndex
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import TCP_OPEN_CONNECTIONS

log = logging.getLogger("nodemesh.agent.node")

CAPTURE_CHECK_INTERVAL_S = 2.0
EVICT_INTERVAL_S = 10.0

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
        self.capture_mode = ("", "")   # (mode, reason): agent/capture.py ebpf_capture_state
        self._links: dict[int, workerlink.Link] = {}
        self.store = NodeStore(idle_s=config.series_idle_s, max_authorities=config.max_authorities,
                               max_routes=config.max_routes)
        self.store.track_pending = bool(config.controller)  # the controller link takes increments
        # Per worker, the open-connection gauge it added: taken back out when it dies.
        self._worker_gauges: dict[int, dict[tuple[str, ...], float]] = {}
        self._taps: dict[str, bytes] = {}           # open taps, replayed to workers attached later
        self._tap_sinks: list[TapSink] = []
        # Set by the controller link: reports the controller received (monotonic time of the last
        # one sent on a live stream); series are evicted only once a report after their last
        # change went out.
        self.reported_at: float | None = None
        self.identity_gaps = 0
        self.admin = AdminServer(config.admin_host, config.admin_port, snapshot=self.snapshot,
                                 ready=lambda: self.ready and self.identity_synced(),
                                 excluded_ips=self.index.local_excluded_ips,
                                 capture_installed=lambda: self.capture_installed,
                                 identity=self.identity_view, identity_synced=self.identity_synced,
                                 scrape_auth=self._scrape_auth() if config.controller else None)
        self._identity_source: IdentityFileSource | None = None
        self.controller_link: Any = None            # agent.report.ControllerLink when configured
        self.workload_certs: Any = None             # agent.certs.WorkloadCerts with --cert-dir
        self._admin_open = False
        self._capture_watch: asyncio.Task[None] | None = None
        self._evict_task: asyncio.Task[None] | None = None

    def _scrape_auth(self) -> Any:
        """Scrapers from elsewhere than this node are checked by the controller (agent/scrapeauth.py)."""
        from nodemesh.agent.scrapeauth import ScrapeAuth

        def ask(token: str) -> Any:
            if self.controller_link is None:
                raise ConnectionError("no controller link")
            return self.controller_link.review_scrape(token)

        return ScrapeAuth(ask).check

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.admin.start()
        self._admin_open = True
        if self.config.watch_capture:
            self._capture_watch = asyncio.create_task(self._watch_capture())
        self._evict_task = asyncio.create_task(self._evict_loop())
        if self.config.controller:
            from nodemesh.agent.report import ControllerLink

            self.controller_link = ControllerLink(self.config, self)
            self.controller_link.start()
            if self.config.cert_dir:
                self._start_workload_certs()
        elif self.config.identity_file:
            self._identity_source = IdentityFileSource(self.config.identity_file, self.apply_identity)
            self._identity_source.start()
        log.info("event=telemetry_started agent_id=%s controller=%s", self.agent_id,
                 self.config.controller or "-")

    def _start_workload_certs(self) -> None:
        from nodemesh.agent.certs import WorkloadCerts

        link = self.controller_link
        self.workload_certs = WorkloadCerts(self.config.cert_dir, self.index.local_pod_uids,
                                            lambda uid, csr: link.request_certificate(uid, csr))
        link.on_trust_bundle = self.workload_certs.set_bundle
        self.workload_certs.start()

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
        if self._evict_task is not None:
            self._evict_task.cancel()
            self._evict_task = None
        if self.workload_certs is not None:
            await self.workload_certs.stop()
            self.workload_certs = None
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
        return self.index.generation > 0 or not (self.config.controller or self.config.identity_file)

    def set_capture_installed(self, installed: bool) -> None:
        if installed != self.capture_installed:
            log.info("event=capture_state installed=%s", installed)
        self.capture_installed = installed

    async def _watch_capture(self) -> None:
        """Read (never write) whether the redirector's capture is in place, for `nodemesh check`
        and the nodemesh_capture_installed gauge. The redirector owns the rules."""
        from nodemesh.agent.capture import capture_active, ebpf_capture_state  # not redirector.apply

        while True:
            try:
                installed = await capture_active()
            except OSError as exc:
                installed = None
                log.debug("event=capture_check_failed error=%s", exc)
            if installed is not None:  # a failed read says nothing: keep what we knew
                self.set_capture_installed(installed)
            state = ebpf_capture_state()
            mode = (state["capture_mode"], state["capture_mode_reason"])
            if mode != self.capture_mode:
                log.info("event=capture_mode mode=%s reason=%r", *mode)
                self.capture_mode = mode
            await asyncio.sleep(CAPTURE_CHECK_INTERVAL_S)

    # ------------------------------------------------------------------ workers
    def attach_worker(self, index: int, parent_end: workerlink.ChannelEnd) -> None:
        if index in self._links:
            self.detach_worker(index)  # a restarted worker whose death we had not seen yet
        link = workerlink.Link(parent_end, partial(self._on_worker_message, index),
                               partial(self._on_worker_gone, index))
        link.start()
        self._links[index] = link
        if self.index.generation:
            link.send((workerlink.MSG_IDENTITY, self._full_identity()))
        for tap_id, filt in self._taps.items():
            link.send((workerlink.MSG_TAP_OPEN, tap_id, filt))

    def detach_worker(self, index: int) -> None:
        link = self._links.pop(index, None)
        if link is not None:
            link.close()
        self._retire(index)

    def _retire(self, index: int) -> None:
        """A worker is gone: its counts stay, the connections it held open do not."""
        gauges = self._worker_gauges.pop(index, None)
        if gauges:
            self.store.remove_gauge(gauges)

    def _on_worker_gone(self, index: int) -> None:
        link = self._links.get(index)
        if link is not None and link.closed:
            del self._links[index]
            self._retire(index)
        log.info("event=worker_link_closed worker=%d", index)

    def _on_worker_message(self, index: int, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == workerlink.MSG_METRICS:
            self.add_increments(index, msg[1])
        elif kind == workerlink.MSG_TAP_EVENT:
            self._publish_tap(pb.TapEvent.FromString(msg[1]))
        elif kind == workerlink.MSG_IDENTITY_RESYNC:
            link = self._links.get(index)
            if link is not None and self.index.generation:
                link.send((workerlink.MSG_IDENTITY, self._full_identity()))
        elif kind == workerlink.MSG_HELLO:
            log.debug("event=worker_hello worker=%d pid=%d", index, msg[2])

    def add_increments(self, index: int, delta: Snapshot) -> None:
        """A worker's counts since its last report, into the node's series."""
        gauge = delta.get(TCP_OPEN_CONNECTIONS)
        if gauge:
            mine = self._worker_gauges.setdefault(index, {})
            for key, value in gauge.items():
                if isinstance(value, list):  # a gauge is a number (Snapshot's values include histograms)
                    continue
                total = mine.get(key, 0) + value
                if total:
                    mine[key] = total
                else:
                    mine.pop(key, None)
        self.store.add(delta)

    def request_flush(self) -> None:
        """Ask every worker for a fresh snapshot now (e.g. before a final report)."""
        for link in list(self._links.values()):  # a send may find a dead worker and drop it
            link.send((workerlink.MSG_FLUSH,))

    @property
    def workers(self) -> list[int]:
        return sorted(self._links)

    # ------------------------------------------------------------------ metrics
    def snapshot(self) -> Snapshot:
        """The node's cumulative series."""
        return self.store.snapshot()

    async def _evict_loop(self) -> None:
        while True:
            await asyncio.sleep(min(EVICT_INTERVAL_S, max(1.0, self.config.series_idle_s / 4)))
            self.evict()

    def evict(self) -> int:
        """Drop idle series; with a controller, only those whose last change a report carried."""
        safe_before = None
        if self.config.controller:
            if self.reported_at is None:
                return 0
            safe_before = self.reported_at - 2 * self.config.report_interval_s
        dropped = self.store.evict(safe_before)
        if dropped:
            log.info("event=series_evicted count=%d live=%d", dropped, len(self.store))
        return dropped

    # ------------------------------------------------------------------ identity
    def apply_identity(self, message: pb.IdentitySnapshot | pb.IdentityDelta | pb.ControllerMessage) -> bool:
        """Apply a snapshot or delta and hand it to every worker. False when a delta does not fit
        what we hold (the caller asks the controller for the whole identity)."""
        if not isinstance(message, pb.ControllerMessage):
            wrapped = pb.ControllerMessage()
            if isinstance(message, pb.IdentityDelta):
                wrapped.identity_delta.CopyFrom(message)
            else:
                wrapped.identity.CopyFrom(message)
            message = wrapped
        try:
            self.index.update(message)
        except IdentityGap as gap:
            self.identity_gaps += 1
            log.info("event=identity_gap %s", gap)
            return False
        data = message.SerializeToString()
        for link in list(self._links.values()):  # a send may find a dead worker and drop it
            link.send((workerlink.MSG_IDENTITY, data))
        if self.workload_certs is not None:
            self.workload_certs.poke()
        return True

    def _full_identity(self) -> bytes:
        return pb.ControllerMessage(identity=self.index.snapshot()).SerializeToString()

    def identity_view(self) -> dict[str, Any]:
        """What the admin /identity endpoint shows: the version held and who owns each pod IP."""
        return {"epoch": self.index.epoch, "version": self.index.version,
                "resource_version": self.index.resource_version, "pods": self.index.known_uids()}

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
