"""The controller: cluster source -> registry -> identity pushes; agent reports -> aggregator;
questions (stat, edges, check, tap) answered from both.

`Controller` is the Python API the gRPC servicer (`server.py`) and the web app (`web.py`, and a
later dashboard) share: `stat()`, `edges()`, `check()`, `tap()`, `agents()`. Everything runs on
one asyncio loop; the Kubernetes source's threads hand their events to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, TypeVar

from nodemesh.api import columns as columnsmod
from nodemesh.api import tapfilter
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import (
    REQUEST_TOTAL,
    RESPONSE_LATENCY_MS,
    RESPONSE_TOTAL,
    ROUTE_REQUEST_TOTAL,
    ROUTE_RESPONSE_LATENCY_MS,
    ROUTE_RESPONSE_TOTAL,
    TCP_CLOSE_TOTAL,
    TCP_OPEN_CONNECTIONS,
    TCP_OPEN_TOTAL,
    TCP_READ_BYTES_TOTAL,
    TCP_WRITE_BYTES_TOTAL,
)
from nodemesh.controlplane import promstore
from nodemesh.controlplane import routes as routesmod
from nodemesh.controlplane import stat as statmod
from nodemesh.controlplane.aggregate import BOUNDS, Aggregator, SeriesKey, SeriesStore, series_key
from nodemesh.controlplane.ca import WorkloadCA
from nodemesh.controlplane.certify import certify, trust_bundle
from nodemesh.controlplane.columns import RefColumns, ingest_columns
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.deltas import AgentCounters, RefEntry, SeriesDelta, SeriesRefs
from nodemesh.controlplane.identityfeed import ZLIB, IdentityFeed
from nodemesh.controlplane.metrics import ControllerMetrics
from nodemesh.controlplane.registry import WorkloadRegistry
from nodemesh.controlplane.routeconfig import workload_routes
from nodemesh.controlplane.sources import ClusterSource
from nodemesh.controlplane.tap import TapSession

# What the API's stat-like calls answer: each carries `error` and `warning`.
_Answer = TypeVar("_Answer", pb.StatResponse, pb.EdgesResponse, pb.RoutesResponse)

log = logging.getLogger("nodemesh.controlplane")

_IDENTITY = object()  # outbox marker: send what the agent's identity lacks (coalesces bursts)
_CLOSE = object()     # outbox marker: the agent's side of the stream ended
_ROUTE_FAMILIES = frozenset((ROUTE_REQUEST_TOTAL, ROUTE_RESPONSE_TOTAL, ROUTE_RESPONSE_LATENCY_MS))
_ACK = object()       # outbox marker: acknowledge the increment reports stored (coalesces)
# An agent clock this far off ours is corrected by the measured skew when filing its reports.
SKEW_CORRECT_MS = 1000
SETTLE_S = 2  # a second is frozen into its block this long after it ended (its reports are in)
GC_THAW_GROWTH, GC_THAW_MIN, GC_THAW_S = 1.5, 200_000, 3600.0   # Controller.tend_gc
CHECK_BACKEND_TIMEOUT_S = 1.0  # Check asks the stat backend within this (a healthy Prometheus: milliseconds)
MAX_SCRAPE_REVIEWS = 256  # scrapers' credential checks in flight for all agents
# token -> (allowed, could not be checked now, message): controlplane/auth.review_scrape
ScrapeReviewer = Callable[[str], Awaitable[tuple[bool, bool, str]]]


_CLASSIFICATION: dict[str, dict[str, str]] = {}  # shared {"classification": c} dicts


# The aggregator Bucket field each peer family's values add to (controlplane/columns.py: what
# _record does per series, decided once per ref).
_SLOTS = {REQUEST_TOTAL: "requests", RESPONSE_LATENCY_MS: "latency", TCP_OPEN_TOTAL: "tcp_open",
          TCP_CLOSE_TOTAL: "tcp_close", TCP_READ_BYTES_TOTAL: "read_bytes", TCP_WRITE_BYTES_TOTAL: "write_bytes",
          TCP_OPEN_CONNECTIONS: "gauge"}


def _resolve_ref(name: str, labels: dict[str, str], keys: dict[SeriesKey, SeriesKey] | None = None) -> RefEntry:
    """What a series ref keeps (deltas.SeriesRefs), once per ref: for the peer families the
    aggregator key (label values interned: the same names recur in thousands of keys; with `keys`,
    a stream's table of the keys its refs resolved to, one tuple shared by the ~6 families of a
    peer), the one label _record reads and the Bucket field its column values add to; route series
    keep their labels (route_key reads several) and go through _record. The family name is
    interned too (a new str per ref otherwise: ~70 bytes each, 1.8 M refs at 1,000 nodes)."""
    name = sys.intern(name)
    if name in _ROUTE_FAMILIES:
        return RefEntry(labels, None, name)
    key = tuple(sys.intern(v) for v in series_key(labels))
    if keys is not None:
        key = keys.setdefault(key, key)
    c = labels.get("classification", "")
    kept = _CLASSIFICATION.get(c)
    if kept is None:
        kept = {"classification": c} if c else {}
        if len(_CLASSIFICATION) < 16:  # success, failure, "": an agent's odd values are not kept
            _CLASSIFICATION[c] = kept
    if name == RESPONSE_TOTAL:
        slot = "failure" if c == "failure" else "success"
    else:
        slot = _SLOTS.get(name, "")
    return RefEntry(kept, key, name, slot)


def controller_version() -> str:
    try:
        return metadata.version("nodemesh")
    except metadata.PackageNotFoundError:
        return "dev"


class TapLimitError(Exception):
    """As many taps are open as the controller allows (--tap-max-taps)."""


@dataclass
class AgentSession:
    """One connected agent stream (an agent process may reconnect: a new session, same id)."""

    agent_id: str
    node: str
    version: str
    start_time_ms: int
    node_ip: str = ""
    pod_cidrs: list[str] = field(default_factory=list)
    connected_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    last_report: float = 0.0
    ready: bool = False
    capture_installed: bool = False
    capture_mode: tuple[str, str] = ("", "")     # (mode, reason) as the agent reports it
    clock_skew_ms: int = 0
    reports: int = 0
    dropped_seq: int = 0      # --no-ingest: the last increment report acknowledged without storing it
    outbox: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    identity_queued: bool = False
    identity_epoch: int = 0                    # the identity (epoch, version) this agent was last sent
    identity_version: int = 0
    identity_resyncs: int = 0
    identity_encodings: frozenset[str] = frozenset()  # what its hello offered (and we use): {"zlib"}
    stale_taps_closed: set[str] = field(default_factory=set)
    ack_queued: bool = False
    series_refs: SeriesRefs = field(default_factory=dict)  # this stream's Series.ref table
    ref_columns: RefColumns = field(default_factory=RefColumns)  # the same refs as arrays (columns.py)
    ref_keys: dict[SeriesKey, SeriesKey] = field(default_factory=dict)  # the keys its refs resolved to, once each

    def resolve_ref(self, name: str, labels: dict[str, str]) -> RefEntry:
        """A ref of this stream defined (deltas.AgentCounters.ingest_increments)."""
        return _resolve_ref(name, labels, self.ref_keys)

    def send(self, msg: pb.ControllerMessage) -> None:
        self.outbox.put_nowait(msg)

    def queue_ack(self) -> None:
        if not self.ack_queued:
            self.ack_queued = True
            self.outbox.put_nowait(_ACK)

    def queue_identity(self) -> None:
        if not self.identity_queued:
            self.identity_queued = True
            self.outbox.put_nowait(_IDENTITY)


class Controller:
    def __init__(self, config: ControllerConfig, source: ClusterSource | None = None,
                 registry: WorkloadRegistry | None = None) -> None:
        self.config = config
        self.source = source
        self.registry = registry or WorkloadRegistry()
        self.aggregator = Aggregator(retention_s=config.retention_s, downsample_after_s=config.downsample_after_s,
                                     coarsen_after_s=config.coarsen_after_s)
        # Route series apart (controlplane/routes.py): route cardinality never reaches `stat`.
        self.route_aggregator = Aggregator(retention_s=config.retention_s,
                                           downsample_after_s=config.downsample_after_s,
                                           coarsen_after_s=config.coarsen_after_s)
        self.route_cap = routesmod.RouteCap(config.max_routes)
        # `--backend prometheus` (controlplane/promstore.py): the same questions, answered by PromQL.
        self.prometheus = (promstore.PrometheusStore(config.prometheus_url, config.prometheus_timeout_s)
                           if config.prometheus_url else None)
        self.metrics = ControllerMetrics()
        self.started_ms = int(time.time() * 1000)
        self.version = controller_version()
        self.sessions: dict[str, AgentSession] = {}     # agent_id -> live session
        self._counters: dict[str, tuple[AgentCounters, float]] = {}  # agent_id -> (counters, last use)
        self._taps: dict[str, TapSession] = {}
        self._unwatch_gc: Callable[[], None] | None = None
        self._gc_base, self._gc_thawed = 0, time.time()   # frozen objects at the last thaw, and when
        self.identity = IdentityFeed()
        self._identity_version = -1  # the registry version the feed last took
        self._push_handle: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ingest_queue: asyncio.Queue[tuple[AgentSession, pb.MetricsReport]] | None = None
        self.registry.add_listener(self._registry_changed)
        # Answers agents' ScrapeReviews (may this token read an agent's /metrics?); None: no
        # authentication configured (dev mode), every scraper is allowed.
        self.scrape_reviewer: ScrapeReviewer | None = None
        self._reviews: set[asyncio.Task[None]] = set()
        # The workload CA (controlplane/ca.py); None: agents asking for certificates are refused.
        self.ca: WorkloadCA | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.source is not None:
            await self.source.start(self.registry)
            if not self.source.synced.is_set():
                self._tasks.append(asyncio.create_task(self._identity_once_synced(), name="controller-synced"))
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="controller-housekeeping"))
        self._tasks.append(asyncio.create_task(self._watch_loop_lag(), name="controller-loop-lag"))
        self._unwatch_gc = self.watch_gc()
        self._tasks.append(asyncio.create_task(self._settle(), name="controller-settle"))

    async def _identity_once_synced(self) -> None:
        """Agents connected before the cluster source's first full list were told nothing (see the
        outbox in serve_agent): give them the identity now."""
        assert self.source is not None
        await self.source.synced.wait()
        log.info("event=identity_synced agents=%d", len(self.sessions))
        self._push_identity()

    async def stop(self) -> None:
        if self._unwatch_gc is not None:
            self._unwatch_gc()
            self._unwatch_gc = None
        if self.config.gc_freeze:
            gc.unfreeze()
        if self._push_handle is not None:
            self._push_handle.cancel()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        for session in list(self.sessions.values()):
            session.outbox.put_nowait(_CLOSE)
        if self.source is not None:
            await self.source.stop()
        if self.prometheus is not None:
            await self.prometheus.close()

    @property
    def ready(self) -> bool:
        return self.source is None or self.source.synced.is_set()

    async def _watch_loop_lag(self, period_s: float = 0.1) -> None:
        """How late the event loop runs what is due (`nodemesh_controller_loop_lag_seconds`):
        every request, report and identity push waits that long before its first step, so a
        saturated controller shows here before it shows anywhere else."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + period_s
            await asyncio.sleep(period_s)
            self.metrics.loop_lag.observe(max(0.0, loop.time() - due))

    def watch_gc(self) -> Callable[[], None]:
        """Time the cyclic collector's pauses into `nodemesh_controller_gc_pause_seconds` (a full
        collection walks every tracked object: ~1 s at 1,000 agents' series refs); returns the
        function that stops it."""
        started = [0.0]
        observe = {g: self.metrics.gc_pause.labels(generation=str(g)).observe for g in (0, 1, 2)}

        def callback(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                observe[info["generation"]](time.perf_counter() - started[0])
        gc.callbacks.append(callback)
        return lambda: gc.callbacks.remove(callback)

    @staticmethod
    async def merge_off_loop(store: Aggregator) -> int:
        """The store's due merges (seconds into minutes, minutes into 5 minutes), their numpy
        sums in a worker thread: at 1,000 agents a minute's merge is ~0.6–1.1 s of CPU, which
        on the loop stopped every report, query and push that long once a minute (off it, the
        loop waits ~15 ms at most). Planned and applied on the loop; a plan the store moved past
        meanwhile is dropped and made again at the next housekeeping."""
        merged = 0
        now = time.time()
        while (plan := store.merge_plan(now)) is not None:
            got = store.merge_apply(plan, await asyncio.to_thread(plan.compute))
            if got is None:
                break
            merged += got
        return merged

    def tend_gc(self, now: float) -> bool:
        """Freeze what lives now (`gc.freeze`: the collector never walks it again, so a full
        collection costs the young objects, not the ~2 M of 1,000 agents' series refs), and
        when the frozen objects have grown by half since the last thaw, or an hour has passed,
        thaw and collect them all once (cyclic garbage that was frozen alive is reclaimed there:
        what it can hold is bounded by that half). The housekeeping's, every 10 s. Returns
        whether it thawed."""
        gc.freeze()
        if (gc.get_freeze_count() <= self._gc_base * GC_THAW_GROWTH + GC_THAW_MIN
                and now - self._gc_thawed < GC_THAW_S):
            return False
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self._gc_base, self._gc_thawed = gc.get_freeze_count(), now
        return True

    async def _settle(self) -> None:
        """Each second, freeze the stores' seconds whose reports are in (agents report each
        second, filed under the second their interval ended): a query or prune then freezes a
        second or two, where ten seconds of a thousand agents' reports took ~0.4 s of the loop
        at once (docs/scale.md); and keep what `stat` is asked most ready (`stat.warm`)."""
        while True:
            await asyncio.sleep(1.0)
            before = int(time.time()) - SETTLE_S
            self.aggregator.flush(before)
            self.route_aggregator.flush(before)
            if self.config.ingest:
                statmod.warm(self.aggregator)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(10)
            self.aggregator.prune(downsample=False)
            await self.merge_off_loop(self.aggregator)
            if self.route_aggregator.prune():
                self.route_cap.prune(self.route_aggregator.keys())
            horizon = time.time() - self.config.retention_s
            for agent_id, (_, used) in list(self._counters.items()):
                if used < horizon and agent_id not in self.sessions:
                    del self._counters[agent_id]
            self.metrics.series_tracked.set(len(self.aggregator))
            if self.config.gc_freeze:
                self.tend_gc(time.time())

    # ------------------------------------------------------------------ identity
    def mesh_config(self) -> pb.MeshConfig:
        c = self.config
        return pb.MeshConfig(opaque_ports=list(c.opaque_ports), excluded_namespaces=list(c.excluded_namespaces),
                             tap_max_rps=c.tap_max_rps, tap_redact_headers=list(c.tap_redact_headers),
                             tap_show_headers=list(c.tap_show_headers), tap_redact_query=c.tap_redact_query,
                             routes=workload_routes(self.registry),
                             mtls_required_namespaces=list(c.mtls_required_namespaces))

    def refresh_identity(self) -> IdentityFeed:
        """Bring the identity feed up to the registry (a new version only when something an agent
        is told changed: status-only writes on Deployments, Nodes or Pods cost no push)."""
        if self._identity_version != self.registry.version:
            entries = self.registry.identity_entries(self.mesh_config(), self.config.captured_namespaces)
            self._identity_version = self.registry.version
            self.identity.update_entries(entries)
        return self.identity

    def identity_message(self) -> pb.ControllerMessage:
        """The whole identity, as a new agent stream starts with."""
        return pb.ControllerMessage(identity=self.refresh_identity().snapshot())

    def _registry_changed(self) -> None:
        # Rollouts change many objects at once: push one snapshot after the burst settles.
        if self._push_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop yet (built before start): agents get it on connect
                return
            self._push_handle = loop.call_later(self.config.identity_debounce_s, self._push_identity)

    def _push_identity(self) -> None:
        self._push_handle = None
        feed = self.refresh_identity()
        stale = [s for s in self.sessions.values()
                 if (s.identity_epoch, s.identity_version) != (feed.epoch, feed.version)]
        for session in stale:
            session.queue_identity()
        for tap in self._taps.values():
            self._open_tap_where_needed(tap)

    # ------------------------------------------------------------------ agent stream
    def agent_connected(self, hello: pb.AgentHello) -> AgentSession:
        session = AgentSession(agent_id=hello.agent_id, node=hello.node, version=hello.version,
                               start_time_ms=hello.start_time_ms, node_ip=hello.node_ip,
                               pod_cidrs=list(hello.pod_cidrs))
        if self.config.identity_compression:
            session.identity_encodings = frozenset(hello.identity_encodings) & {ZLIB}
        old = self.sessions.get(hello.agent_id)
        if old is not None:
            old.outbox.put_nowait(_CLOSE)  # the agent reconnected; the old stream is dead to it
        self.sessions[hello.agent_id] = session
        self.metrics.connected_agents.set(len(self.sessions))
        log.info("event=agent_connected agent_id=%s node=%s version=%s", hello.agent_id, hello.node,
                 hello.version)
        session.queue_identity()
        for tap in self._taps.values():
            self._open_tap_where_needed(tap)
        return session

    def agent_disconnected(self, session: AgentSession) -> None:
        if self.sessions.get(session.agent_id) is session:
            del self.sessions[session.agent_id]
            self.aggregator.drop_reporter(session.agent_id)
            for tap in self._taps.values():
                tap.agents.discard(session.agent_id)
        self.metrics.connected_agents.set(len(self.sessions))
        log.info("event=agent_disconnected agent_id=%s node=%s", session.agent_id, session.node)

    def agent_message(self, session: AgentSession, msg: pb.AgentMessage) -> None:
        session.last_seen = time.time()
        which = msg.WhichOneof("msg")
        if which == "metrics":
            self.ingest_report(session, msg.metrics)
        elif which == "tap_event":
            self._tap_event(session, msg.tap_event)
        elif which == "status":
            session.ready = msg.status.ready
            session.capture_installed = msg.status.capture_installed
            session.capture_mode = (msg.status.capture_mode, msg.status.capture_mode_reason)
            if msg.status.time_ms:
                session.clock_skew_ms = msg.status.time_ms - int(time.time() * 1000)
        elif which == "identity_resync":
            # The agent found a gap (or holds another epoch): the next identity message is whole.
            r = msg.identity_resync
            log.info("event=identity_resync agent_id=%s epoch=%d version=%d reason=%r", session.agent_id,
                     r.epoch, r.version, r.reason)
            session.identity_epoch, session.identity_version = 0, 0
            session.identity_resyncs += 1
            session.queue_identity()
        elif which == "scrape_review":
            self._scrape_review(session, msg.scrape_review)
        elif which == "csr":
            if self.ca is None:
                issued = pb.CertificateIssued(id=msg.csr.id, pod_uid=msg.csr.pod_uid,
                                              error="this controller is not a CA (--ca-dir/--ca-secret)")
            else:
                issued = certify(self.ca, self.registry, session.node, msg.csr)
            session.send(pb.ControllerMessage(certificate=issued))

    def _scrape_review(self, session: AgentSession, review: pb.ScrapeReview) -> None:
        """Check a scraper's token for an agent, off the stream's reader: a TokenReview takes a
        round trip to the API server. At most MAX_SCRAPE_REVIEWS at once (then: unavailable)."""
        if self.scrape_reviewer is None:
            session.send(pb.ControllerMessage(scrape_review_result=pb.ScrapeReviewResult(id=review.id, allowed=True)))
            return
        if len(self._reviews) >= MAX_SCRAPE_REVIEWS:
            session.send(pb.ControllerMessage(scrape_review_result=pb.ScrapeReviewResult(
                id=review.id, unavailable=True, message="too many credential checks at once")))
            return
        reviewer = self.scrape_reviewer

        async def run() -> None:
            allowed, unavailable, message = await reviewer(review.token)
            session.send(pb.ControllerMessage(scrape_review_result=pb.ScrapeReviewResult(
                id=review.id, allowed=allowed, unavailable=unavailable, message=message)))

        task = asyncio.get_running_loop().create_task(run(), name="scrape-review")
        self._reviews.add(task)
        task.add_done_callback(self._reviews.discard)

    def rotate_workload_root(self) -> None:
        """A new root signs from now on (controlplane/ca.py); every agent gets the bundle holding
        old and new roots at once, and each leaf moves to the new root at its next renewal."""
        if self.ca is None:
            raise ValueError("this controller is not a CA (--ca-dir/--ca-secret)")
        self.ca.rotate()
        bundle = pb.ControllerMessage(trust_bundle=trust_bundle(self.ca))
        for session in self.sessions.values():
            session.send(bundle)

    def ack_message(self, agent_id: str) -> pb.ControllerMessage:
        entry = self._counters.get(agent_id)
        seq = entry[0].stored_seq if entry else 0
        if not self.config.ingest:
            session = self.sessions.get(agent_id)
            seq = session.dropped_seq if session is not None else 0
        return pb.ControllerMessage(report_ack=pb.ReportAck(seq=seq,
                                                            controller_epoch=self.identity.epoch,
                                                            series_refs=True, series_columns=True))

    def counters_for(self, agent_id: str, start_time_ms: int) -> AgentCounters:
        entry = self._counters.get(agent_id)
        if entry is None:
            # See deltas.py: an agent older than us holds counts we must not count again.
            baseline = start_time_ms < self.started_ms
            counters = AgentCounters(agent_id, first_report_is_baseline=baseline)
            log.info("event=agent_counters_new agent_id=%s baseline=%s", agent_id, baseline)
        else:
            counters = entry[0]
        self._counters[agent_id] = (counters, time.time())
        return counters

    def ingest_report(self, session: AgentSession, report: pb.MetricsReport, now: float | None = None) -> None:
        now = time.time() if now is None else now
        session.last_report = now
        session.reports += 1
        self.metrics.reports_received.inc()
        if not self.config.ingest:
            # --no-ingest: Prometheus holds the metrics; acknowledge so the agent frees its history.
            if report.increments and report.seq > session.dropped_seq:
                session.dropped_seq = report.seq
                session.queue_ack()
            return
        counters = self.counters_for(session.agent_id, session.start_time_ms)
        bounds = tuple(report.latency_bounds_ms) or BOUNDS
        rejected = counters.rejected
        if report.increments:
            # One interval's counts, filed in the second they were counted (not the second they
            # arrived: a replay after a restart brings minutes of history); once per seq.
            gaps = counters.gaps
            deltas = counters.ingest_increments(report.series, report.seq, n_buckets=len(bounds) + 1,
                                                refs=session.series_refs, resolve=session.resolve_ref)
            if deltas is None:
                self.metrics.reports_duplicate.inc()
                session.queue_ack()
                return
            if counters.gaps > gaps:
                self.metrics.report_gaps.inc(counters.gaps - gaps)
                log.warning("event=report_gap agent_id=%s missing=%d seq=%d", session.agent_id,
                            counters.gaps - gaps, report.seq)
            if report.replayed:
                self.metrics.reports_replayed.inc()
            t = self.report_time(session, report, now)
            session.queue_ack()
            if report.HasField("columns"):
                deltas += self._record_columns(session, counters, report.columns, bounds, t)
        else:
            deltas = counters.ingest(report.series, report.seq, n_buckets=len(bounds) + 1)
            t = now
        self._record(session, deltas, bounds, t)
        if counters.rejected > rejected:
            log.warning("event=report_series_rejected agent_id=%s count=%d reason=malformed", session.agent_id,
                        counters.rejected - rejected)

    def _record_columns(self, session: AgentSession, counters: AgentCounters, block: pb.SeriesColumns,
                        bounds: tuple[float, ...], t: float) -> list[SeriesDelta]:
        """A report's series columns into the aggregator (controlplane/columns.py); returns the
        series it leaves to _record (routes, histograms to rebin)."""
        cols = columnsmod.decode(block, len(bounds) + 1)
        if cols is None:
            counters.rejected += columnsmod.series_count(block)
            return []
        rejected, slow = ingest_columns(self.aggregator, session.series_refs, cols, int(t), session.agent_id,
                                        len(bounds) + 1, bounds == BOUNDS, session.ref_columns)
        counters.rejected += rejected
        return slow

    @staticmethod
    def report_time(session: AgentSession, report: pb.MetricsReport, now: float) -> float:
        """When an increment report's interval ended, on our clock: the agent's stamp, corrected
        by the measured skew when its clock is badly off, and never in our future."""
        t_ms = report.time_ms or int(now * 1000)
        if abs(session.clock_skew_ms) > SKEW_CORRECT_MS:
            t_ms -= session.clock_skew_ms
        return min(t_ms / 1000, now)

    def _record(self, session: AgentSession, deltas: list[SeriesDelta], bounds: tuple[float, ...], t: float) -> None:
        """Deltas into the aggregator's bucket of second `t`."""
        agg = self.aggregator
        for d in deltas:
            name = d.name
            if name in _ROUTE_FAMILIES:
                self._record_route(d, bounds, t)
                continue
            key = d.key or series_key(d.labels)
            if name == RESPONSE_TOTAL:
                if d.labels.get("classification") == "failure":
                    agg.record(key, t=t, failure=d.value)
                else:
                    agg.record(key, t=t, success=d.value)
            elif name == RESPONSE_LATENCY_MS and d.buckets is not None:
                agg.record(key, t=t, latency=d.buckets, latency_bounds=bounds if bounds != BOUNDS else BOUNDS,
                           latency_sum=d.sum)
            elif name == REQUEST_TOTAL:
                agg.record(key, t=t, requests=d.value)
            elif name == TCP_OPEN_TOTAL:
                agg.record(key, t=t, tcp_open=d.value)
            elif name == TCP_CLOSE_TOTAL:
                agg.record(key, t=t, tcp_close=d.value)
            elif name == TCP_READ_BYTES_TOTAL:
                agg.record(key, t=t, read_bytes=d.value)
            elif name == TCP_WRITE_BYTES_TOTAL:
                agg.record(key, t=t, write_bytes=d.value)
            elif name == TCP_OPEN_CONNECTIONS:
                # A ref'd gauge is sent when it changes (agent/seriesrefs.py): it holds until the
                # stream ends (agent_disconnected drops the agent's gauges), not for a window.
                agg.set_gauge(key, session.agent_id, d.value, t=math.inf if d.key is not None else t)

    def _record_route(self, d: SeriesDelta, bounds: tuple[float, ...], t: float) -> None:
        agg = self.route_aggregator
        key = self.route_cap.cap(routesmod.route_key(d.labels), d.value if d.name == ROUTE_REQUEST_TOTAL else 0.0)
        if d.name == ROUTE_RESPONSE_TOTAL:
            if d.labels.get("classification") == "failure":
                agg.record(key, t=t, failure=d.value)
            else:
                agg.record(key, t=t, success=d.value)
        elif d.name == ROUTE_REQUEST_TOTAL:
            agg.record(key, t=t, requests=d.value)
        elif d.buckets is not None:
            agg.record(key, t=t, latency=d.buckets, latency_bounds=bounds if bounds != BOUNDS else BOUNDS,
                       latency_sum=d.sum)

    async def serve_agent(self, messages: AsyncIterator[pb.AgentMessage],
                          node: str = "", encoded: bool = False) -> AsyncIterator[pb.ControllerMessage | bytes]:
        """The Connect stream: hello first, then reports/status/tap events in, identity and
        tap commands out. Raises ValueError when the first message is not a hello, and
        PermissionError when `node` (the node the caller's token is bound to; "" = not bound) is
        not the node the hello speaks for: certificates are issued for the hello's node's pods.
        `encoded`: identity messages come out serialized (bytes), encoded once for every agent
        at the same version (server.py sends bytes as they are)."""
        first = await anext(messages, None)
        if first is None:
            return
        if first.WhichOneof("msg") != "hello" or not first.hello.agent_id:
            raise ValueError("the first message on Connect must be an AgentHello with an agent_id")
        if node and first.hello.node != node:
            log.warning("event=agent_node_mismatch token_node=%s hello_node=%s", node, first.hello.node)
            raise PermissionError(f"this token was issued to a pod on node {node}: it cannot speak for node "
                                  f"{first.hello.node or '<none>'}")
        session = self.agent_connected(first.hello)
        if self._ingest_queue is None and self.config.ingest and self.config.ingest_turn_ms > 0:
            self._ingest_queue = asyncio.Queue(max(1, self.config.ingest_queue))
            self._tasks.append(asyncio.create_task(self._ingest_loop(self._ingest_queue), name="controller-ingest"))
        # First: what we hold of this agent's increment reports. It tells the agent we take
        # increments, and where to resume (0 from a controller that never heard of it: its whole
        # history). An agent from before increments ignores it and reports cumulative values.
        yield self.ack_message(session.agent_id)

        async def read() -> None:
            try:
                async for msg in messages:
                    if self._ingest_queue is not None and msg.WhichOneof("msg") == "metrics":
                        session.last_seen = time.time()
                        await self._ingest_queue.put((session, msg.metrics))  # full: waits
                        continue
                    self.agent_message(session, msg)
            except Exception as exc:  # noqa: BLE001 - any stream failure ends the session; the agent reconnects
                log.info("event=agent_stream_error agent_id=%s error=%r", session.agent_id, str(exc)[:200])
            finally:
                session.outbox.put_nowait(_CLOSE)

        reader = asyncio.create_task(read(), name=f"agent-reader-{session.agent_id}")
        try:
            while True:
                item = await session.outbox.get()
                if item is _CLOSE:
                    break
                if item is _ACK:
                    session.ack_queued = False
                    yield self.ack_message(session.agent_id)
                elif item is _IDENTITY:
                    session.identity_queued = False
                    if not self.ready:
                        # A controller that has not listed the cluster yet (just restarted) would
                        # hand every agent an empty identity, and every pod on every node would be
                        # counted `unknown` until the list arrived. Agents keep what they hold;
                        # _identity_once_synced sends it when the source has synced.
                        continue
                    feed = self.refresh_identity()
                    if encoded:
                        enc = feed.encoded_message_for(session.identity_epoch, session.identity_version,
                                                       session.identity_encodings)
                        if enc is None:
                            continue
                        message: pb.ControllerMessage | bytes = enc[0]
                        snapshot = enc[1]
                    else:
                        msg = feed.message_for(session.identity_epoch, session.identity_version)
                        if msg is None:
                            continue
                        message, snapshot = msg, msg.HasField("identity")
                    session.identity_epoch, session.identity_version = feed.epoch, feed.version
                    if snapshot:
                        self.metrics.identity_snapshots.inc()
                    else:
                        self.metrics.identity_deltas.inc()
                    yield message
                else:
                    yield item  # type: ignore[misc]
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self.agent_disconnected(session)

    async def _ingest_loop(self, queue: asyncio.Queue[tuple[AgentSession, pb.MetricsReport]]) -> None:
        """The streams' reports, in arrival order, at most `ingest_turn_ms` of them per loop turn:
        a thousand streams each ingesting its report in the same turn made turns of a second, and
        gRPC's new streams, identity sends and taps waited that long for each step."""
        budget = self.config.ingest_turn_ms / 1000
        while True:
            item = await queue.get()
            started = time.perf_counter()
            while True:
                session, report = item
                if self.sessions.get(session.agent_id) is session:  # a closed stream's: its ring replays it
                    try:
                        self.ingest_report(session, report)
                    except Exception as exc:  # noqa: BLE001 - as a stream's own failure: that session ends
                        log.info("event=agent_stream_error agent_id=%s error=%r", session.agent_id, str(exc)[:200])
                        session.outbox.put_nowait(_CLOSE)
                if queue.empty() or time.perf_counter() - started >= budget:
                    break
                item = queue.get_nowait()
            await asyncio.sleep(0)

    # ------------------------------------------------------------------ questions
    def captured_namespaces(self) -> list[str]:
        return self.registry.captured_namespaces(self.config.excluded_namespaces, self.config.captured_namespaces)

    def ready_nodes(self) -> set[str]:
        """Nodes with a ready agent connected."""
        return {s.node for s in self.sessions.values() if s.ready}

    def mesh_view(self) -> statmod.MeshView:
        return statmod.MeshView(
            ready_nodes=self.ready_nodes(),
            captured_namespaces=set(self.captured_namespaces()),
        )

    def stat(self, req: pb.StatRequest, now: float | None = None,
             store: SeriesStore | None = None) -> pb.StatResponse:
        started = time.perf_counter()
        try:
            return statmod.stat_summary(self.registry, store or self.aggregator, self.mesh_view(), req, now)
        finally:
            self.metrics.stat_latency.observe(time.perf_counter() - started)

    def edges(self, req: pb.EdgesRequest, now: float | None = None,
              store: SeriesStore | None = None) -> pb.EdgesResponse:
        return statmod.edges(self.registry, store or self.aggregator, req, now)

    def routes(self, req: pb.RoutesRequest, now: float | None = None,
               store: SeriesStore | None = None) -> pb.RoutesResponse:
        return routesmod.route_summary(self.registry, store or self.route_aggregator, req, now)

    # The API's entry points: the backend a request names (or the controller's default) answers.
    async def answer_stat(self, req: pb.StatRequest) -> pb.StatResponse:
        return await self._answer(req, promstore.PEER, self.stat, pb.StatResponse)

    async def answer_edges(self, req: pb.EdgesRequest) -> pb.EdgesResponse:
        return await self._answer(req, promstore.PEER, self.edges, pb.EdgesResponse)

    async def answer_routes(self, req: pb.RoutesRequest) -> pb.RoutesResponse:
        return await self._answer(req, promstore.ROUTE, self.routes, pb.RoutesResponse)

    async def _answer(self, req: Any, family: promstore.Family,
                      ask: Callable[[Any, float | None, SeriesStore | None], _Answer],
                      response: Callable[..., _Answer]) -> _Answer:
        try:
            store, now = await self.store_for(req.backend, family, req.window_seconds)
        except statmod.StatError as exc:
            return response(error=str(exc))
        answer = ask(req, now, store)
        if not answer.error:
            answer.warning = self.store_warning(store)
        return answer

    def store_warning(self, store: SeriesStore | None) -> str:
        """What a caller must be told about numbers from `store` ("" when nothing)."""
        if not isinstance(store, promstore.Snapshot):
            return ""
        ready = len(self.ready_nodes())
        if store.agents_scraped >= ready:
            return ""
        # Numbers from Prometheus are only as complete as its scrapes: say so, never silently.
        return (f"Prometheus holds current metrics of {store.agents_scraped} of the {ready} agents connected: "
                f"traffic through the others is missing (check its scrape targets and their credential)")

    async def store_for(self, backend: str, family: promstore.Family,
                        window_seconds: int) -> tuple[SeriesStore | None, float | None]:
        """None (the in-memory aggregators) or a Prometheus snapshot of `family` over the window.
        `backend` "" is the controller's default (`--stat-backend`): the API's callers name one,
        the dashboard always takes the default."""
        backend = backend or self.config.stat_backend
        if backend == promstore.MEMORY:
            if not self.config.ingest:
                raise statmod.StatError("the memory backend is off: this controller keeps no metrics (--no-ingest); "
                                        "ask --backend prometheus")
            if int(window_seconds) > self.config.retention_s:
                raise statmod.StatError(f"time window {int(window_seconds)}s is longer than this controller keeps "
                                        f"(--retention {self.config.retention_s}s)")
            return None, None
        prometheus = self._prometheus(backend)
        window = statmod.check_window(int(window_seconds))
        now = time.time()
        try:
            return await prometheus.snapshot(family, window, now), now
        except promstore.PrometheusError as exc:
            raise statmod.StatError(f"prometheus backend: {exc}") from None

    def _prometheus(self, backend: str) -> promstore.PrometheusStore:
        """The store a request naming `backend` (not memory) is answered from, or its one-line error."""
        if backend != promstore.PROMETHEUS:
            raise statmod.StatError(f"unknown backend {backend!r}: expected one of {', '.join(promstore.BACKENDS)}")
        if self.prometheus is None:
            raise statmod.StatError("the prometheus backend is not configured: start the controller with "
                                    "--prometheus-url (nodemesh install --set prometheusUrl=URL sets it)")
        return self.prometheus

    async def steps_for(self, backend: str, family: promstore.Family, step_s: int, range_s: int,
                        matchers: dict[str, str]) -> list[tuple[int, SeriesStore]] | None:
        """None (the in-memory aggregators' one-second buckets) or, from Prometheus, one snapshot
        per `step_s` over the last `range_s` seconds, oldest first: a time series as `store_for`
        gives one window. `matchers` narrow what Prometheus sums (label equalities)."""
        backend = backend or self.config.stat_backend
        if backend == promstore.MEMORY:
            return None
        prometheus = self._prometheus(backend)
        try:
            return list(await prometheus.steps(family, step_s, int(time.time()), range_s // step_s, matchers))
        except promstore.PrometheusError as exc:
            raise statmod.StatError(f"prometheus backend: {exc}") from None

    def check(self) -> pb.CheckResponse:
        now = time.time()
        by_node: dict[str, AgentSession] = {}
        for agent in self.sessions.values():
            cur = by_node.get(agent.node)
            # During a rolling update two agents share a node: report the ready, newer one.
            if cur is None or (agent.ready, agent.connected_at) > (cur.ready, cur.connected_at):
                by_node[agent.node] = agent
        nodes = sorted({n.name for n in self.registry.nodes()} | set(by_node))
        resp = pb.CheckResponse(controller_version=self.version, time_ms=int(now * 1000))
        for name in nodes:
            s = by_node.get(name)
            if s is None:
                resp.nodes.append(pb.NodeCheck(node=name))
                continue
            age_ms = int((now - s.last_report) * 1000) if s.last_report else -1
            connected = (now - s.last_seen) <= self.config.agent_stale_s
            resp.nodes.append(pb.NodeCheck(
                node=name, agent_connected=connected, agent_ready=s.ready,
                capture_installed=s.capture_installed, agent_version=s.version,
                last_report_age_ms=age_ms, clock_skew_ms=s.clock_skew_ms,
                capture_mode=s.capture_mode[0], capture_mode_reason=s.capture_mode[1],
            ))
        return resp

    async def answer_check(self) -> pb.CheckResponse:
        """check(), and the default stat backend: Prometheus asked whether it answers and how many
        agents' metrics it holds — within CHECK_BACKEND_TIMEOUT_S, so a Prometheus that hangs makes
        `check` (and the install's health wait, which asks Check with a 2 s deadline) say so
        instead of timing out itself."""
        resp = self.check()
        resp.stat_backend = self.config.stat_backend
        if self.config.stat_backend != promstore.PROMETHEUS or self.prometheus is None:
            resp.stat_backend_ok = True
            return resp
        resp.stat_backend_url = self.prometheus.url
        ready = len(self.ready_nodes())
        try:
            scraped = await self.prometheus.agents_scraped(time.time(), CHECK_BACKEND_TIMEOUT_S)
        except promstore.PrometheusError as exc:
            resp.stat_backend_detail = str(exc)
            return resp
        resp.stat_backend_ok = scraped >= ready
        resp.stat_backend_detail = f"holds metrics of {scraped} of the {ready} ready agents"
        return resp

    def agents(self) -> list[AgentSession]:
        return sorted(self.sessions.values(), key=lambda s: (s.node, s.agent_id))

    # ------------------------------------------------------------------ tap
    def tap_nodes(self, flt: pb.TapFilter) -> set[str]:
        """Nodes whose agents see the tap's requests as the target's own sightings (Linkerd's tap
        shows what the target's proxies saw): the nodes running the target's pods. A Service's
        requests are seen by its clients, wherever they run: every node with an agent."""
        nodes: set[str] = set()
        for res in (flt.target,):
            if not res.type:
                continue
            type_ = statmod.canonical_type(res.type)
            if type_ == "service":
                nodes.update(s.node for s in self.sessions.values())
                continue
            ns = res.namespace or "default"
            if type_ == "namespace":
                pods = [p for p in self.registry.pods() if p.namespace == (res.name or ns)]
            elif res.name:
                info = self.registry.resource(type_, ns, res.name)
                pods = info.pods if info else []
            else:
                pods = [p for r in self.registry.resources(type_, ns) for p in r.pods]
            nodes.update(p.node for p in pods if p.node and p.running)
        return nodes

    def _open_tap_where_needed(self, tap: TapSession) -> None:
        nodes = self.tap_nodes(tap.filter)
        for s in self.sessions.values():
            if s.node in nodes and s.agent_id not in tap.agents:
                tap.agents.add(s.agent_id)
                s.send(tap.open_message())
                log.info("event=tap_open tap_id=%s agent_id=%s node=%s", tap.tap_id, s.agent_id, s.node)

    def validate_tap(self, flt: pb.TapFilter) -> None:
        if not flt.target.type:
            raise statmod.StatError("tap needs a target resource")
        try:
            tapfilter.check_fields(flt)  # method, path prefix, scheme, rate: whoever sent the filter
        except tapfilter.TapFilterError as exc:
            raise statmod.StatError(str(exc)) from None
        for flag, res in (("target", flt.target), ("--to", flt.to)):
            if not res.type:
                continue
            type_ = statmod.canonical_type(res.type)
            if type_ == "all":
                raise statmod.StatError(f"'all' is not a valid {flag} for tap")
            if type_ != "namespace":
                statmod._check_namespace(self.registry, res.namespace or "default")
                if res.name and self.registry.resource(type_, res.namespace or "default", res.name) is None:
                    raise statmod.StatError(
                        f'{type_} "{res.name}" not found in namespace "{res.namespace or "default"}"')

    def check_tap_capacity(self) -> None:
        """Raise TapLimitError when --tap-max-taps taps are open: every tap costs every agent it is
        opened on a match per request, so their number is bounded."""
        if len(self._taps) >= self.config.tap_max_taps:
            raise TapLimitError(f"{len(self._taps)} taps are open, the most this controller allows "
                                f"(--tap-max-taps {self.config.tap_max_taps}): close one and retry")

    async def tap(self, flt: pb.TapFilter) -> AsyncGenerator[pb.TapEvent, None]:
        """Merged TapEvents for `flt` until the caller stops iterating (closing the tap on every
        agent). Raises StatError for a bad filter before anything is opened."""
        self.validate_tap(flt)
        self.check_tap_capacity()
        max_rps = flt.max_rps if flt.max_rps > 0 else self.config.tap_max_rps
        tap = TapSession(flt, max_rps)
        self._taps[tap.tap_id] = tap
        self.metrics.open_taps.set(len(self._taps))
        try:
            self._open_tap_where_needed(tap)
            while True:
                event = await tap.queue.get()
                yield event
        finally:
            del self._taps[tap.tap_id]
            self.metrics.open_taps.set(len(self._taps))
            for agent_id in tap.agents:
                s = self.sessions.get(agent_id)
                if s is not None:
                    s.send(tap.close_message())
            log.info("event=tap_closed tap_id=%s agents=%d forwarded=%d dropped=%d", tap.tap_id,
                     len(tap.agents), tap.forwarded, tap.dropped)

    def _tap_event(self, session: AgentSession, event: pb.TapEvent) -> None:
        tap = self._taps.get(event.tap_id)
        if tap is None:
            # A tap we no longer have (closed, or opened by a previous controller): stop it,
            # once per tap, not once per straggling event.
            if event.tap_id not in session.stale_taps_closed:
                session.stale_taps_closed.add(event.tap_id)
                session.send(pb.ControllerMessage(tap_close=pb.TapClose(tap_id=event.tap_id)))
            return
        if tap.offer(session.agent_id, event):
            self.metrics.tap_events.inc()
