"""The agent's link to the controller: one long-lived `Controller.Connect` stream (grpc.aio).

Up: AgentHello first, then every `report_interval_s` a MetricsReport and an AgentStatus, and
TapEvents as they come. Down: a ReportAck (a controller that takes increments), an
IdentitySnapshot, then IdentityDeltas, ReportAcks and TapOpen/TapClose. A delta that does not fit
the identity held (a gap in the versions) is answered with an IdentityResync: the controller sends
the whole identity again. On any failure the link reconnects with exponential backoff and full
jitter. Nothing in the data plane waits on this.

Reports are *increments* kept in a ring (agent/history.py): every interval, connected or not, the
link closes one entry (what the node counted in it, seq + time) into the ring. A controller's first
ReportAck on a stream says which seq it holds; the link sends every retained entry above it (to a
controller that restarted: the whole ring, minutes of history), then each new entry live, with the
current gauges. So a controller restart or outage loses no counts, each lands in the second it
was counted, and the controller drops any seq it already stored. A controller whose first message
is not a ReportAck (one from before increments) gets cumulative reports, as before.

Taps live as long as the stream that opened them: when it breaks, the agent closes them all (the
controller re-opens what its users still watch).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import time
import zlib
from collections.abc import AsyncIterator, Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _pkg_version
from typing import Any, Protocol

import grpc
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.history import Entry, ReportRing
from nodemesh.agent.metrics import NodeStore, to_series
from nodemesh.agent.podindex import PodIndex
from nodemesh.agent.seriesrefs import SeriesRefTable
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.api.model import (
    GRPC_CHANNEL_OPTIONS,
    GRPC_MAX_MESSAGE_BYTES,
    LATENCY_BUCKETS_MS,
    REPORT_HISTORY_BYTES,
    REPORT_HISTORY_DROPPED,
    REPORT_HISTORY_SECONDS,
)


class ReportedNode(Protocol):
    """What the controller link needs of the node's telemetry (`node.NodeTelemetry` is the one).

    A protocol, not an import: `node` imports this module (lazily, only when a controller is set), so
    importing `node` back here would make the two a loop.
    """

    agent_id: str
    start_time_ms: int
    ready: bool
    capture_installed: bool
    capture_mode: tuple[str, str]     # (mode, reason): agent/capture.py ebpf_capture_state
    reported_at: float | None
    store: NodeStore
    index: PodIndex

    def apply_identity(self, message: pb.IdentitySnapshot | pb.IdentityDelta | pb.ControllerMessage) -> bool: ...
    def open_tap(self, tap_id: str, filt: pb.TapFilter) -> None: ...
    def close_tap(self, tap_id: str) -> None: ...
    def close_all_taps(self) -> None: ...
    def add_tap_sink(self, sink: Callable[[pb.TapEvent], None]) -> None: ...
    def remove_tap_sink(self, sink: Callable[[pb.TapEvent], None]) -> None: ...

log = logging.getLogger("nodemesh.agent.report")

try:
    AGENT_VERSION = _pkg_version("nodemesh")
except PackageNotFoundError:  # run from a copy, not installed as a distribution
    AGENT_VERSION = "0.0.0"

_TAP_QUEUE_MAX = 10_000
# Reports queued on a stream and not yet taken by it. A controller that stops reading (stuck, or too
# slow: gRPC's flow control parks the request iterator) would otherwise grow the outbox by a report
# and a status every interval for as long as it stays connected, memory the ring's bounds never see.
# Past this, new intervals stay only in the ring (bounded by age and bytes) and go out from there,
# oldest first, once the stream takes its backlog: nothing counted twice, nothing held twice.
_REPORTS_QUEUED_MAX = 10
_LEGACY, _INCREMENTS = "cumulative", "increments"  # what the controller of this stream takes
# What the stream sends: messages, history entries (decompressed only as the stream takes them, so
# a replay of minutes holds one report in memory at a time, not all of them), None = half-close.
Outgoing = pb.AgentMessage | Entry | None


# Identity encodings the agent offers in its hello: a controller that knows them sends a big
# snapshot compressed (ControllerMessage.identity_compressed, ~10x smaller); an older one ignores them.
IDENTITY_ENCODINGS = ("zlib",)


def inflate_identity(c: pb.CompressedIdentity, limit: int = GRPC_MAX_MESSAGE_BYTES) -> pb.ControllerMessage:
    """The identity or identity_delta message a CompressedIdentity holds. Raises ValueError for an
    encoding we did not offer, data that is not zlib or is cut short, more than `limit` bytes (or
    than its own `size`) once inflated, or anything but an identity message inside."""
    if c.encoding not in IDENTITY_ENCODINGS:
        raise ValueError(f"identity encoding {c.encoding!r} was not offered")
    bound = min(limit, c.size) if c.size else limit
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(c.data, bound + 1)
    except zlib.error as exc:
        raise ValueError(f"compressed identity does not inflate: {exc}") from None
    if len(data) > bound or inflater.unconsumed_tail:
        raise ValueError(f"compressed identity inflates past {bound} bytes")
    if not inflater.eof:
        raise ValueError("compressed identity is cut short")
    try:
        msg = pb.ControllerMessage.FromString(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, whatever the runtime
        raise ValueError(f"compressed identity does not parse: {exc}") from None
    if msg.WhichOneof("msg") not in ("identity", "identity_delta"):
        raise ValueError(f"compressed identity holds {msg.WhichOneof('msg')!r}, not an identity")
    return msg


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ControllerLink:
    def __init__(self, config: AgentConfig, node: ReportedNode, *, backoff_base_s: float = 0.25,
                 backoff_max_s: float = 10.0) -> None:
        self.config = config
        self.node = node
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.connected = False
        self.connects = 0                    # successful stream starts, for tests and logs
        self.tap_events_dropped = 0
        self._seq = 0                        # cumulative reports (a controller without acks)
        self.ring = ReportRing(config.report_history_s, config.report_history_max_bytes)
        self._entry_seq = 0                  # increment reports: the ring's seq
        self.mode: str | None = None         # per stream: _INCREMENTS or _LEGACY, once the controller spoke
        self.controller_epoch = 0            # of the controller whose ReportAck we last had
        self.replayed = 0                    # entries sent again after a (re)connect, for tests and logs
        self._series_refs: SeriesRefTable | None = None  # this stream's, when its controller takes refs
        self._task: asyncio.Task[None] | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._outbox: asyncio.Queue[Outgoing] | None = None
        self.reports_queued = 0              # report messages in the outbox, not yet taken by the stream
        self._behind_after: int | None = None  # entries above this seq wait in the ring (outbox full)
        self.reports_held_back = 0           # intervals kept out of a full outbox, for tests and logs
        self._stopping = False
        self._reviews: dict[int, asyncio.Future[pb.ScrapeReviewResult]] = {}  # ScrapeReview id -> answer
        self._review_ids = 0
        self._csrs: dict[int, asyncio.Future[pb.CertificateIssued]] = {}  # CSR id -> answer
        self.on_trust_bundle: Callable[[bytes], None] | None = None  # agent/certs.py, when it runs
        self._plaintext_warned = False
        self._ca_missing = False  # --controller-ca not there yet: said once, not at every retry
        self.identity_refused = 0            # compressed identity messages that did not decode
        self.identity_inflated = 0           # compressed identity messages applied, for tests and logs

    def start(self) -> None:
        self.node.add_tap_sink(self._on_tap_event)
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run())
        self._tick_task = loop.create_task(self._tick_loop())

    async def stop(self) -> None:
        """Send one last report (bounded wait), then end the stream."""
        self._stopping = True
        self.node.remove_tap_sink(self._on_tap_event)
        if self._tick_task is not None:
            self._tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick_task
            self._tick_task = None
        entry = self._close_interval()  # the last counts go into the ring whatever happens next
        if self._outbox is not None and self.connected:
            if self.mode == _INCREMENTS:
                self._catch_up(self._outbox)
                self._put_report(self._outbox, self._live_message(entry))
            elif self.mode == _LEGACY:
                self._put_report(self._outbox, self._metrics_message())
            self._outbox.put_nowait(None)  # ends the request stream: a clean half-close
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._task), 2.0)  # type: ignore[arg-type]
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    # ------------------------------------------------------------------ increments
    def _close_interval(self) -> pb.MetricsReport:
        """What the node counted since the last call, as the next ring entry (kept, not sent)."""
        self._entry_seq += 1
        store = self.node.store
        report = pb.MetricsReport(agent_id=self.node.agent_id, seq=self._entry_seq,
                                  time_ms=int(time.time() * 1000), latency_bounds_ms=list(LATENCY_BUCKETS_MS),
                                  series=to_series(store.take_pending()), increments=True)
        self.ring.append(report)
        self._export_ring()
        return report

    def _export_ring(self) -> None:
        """The ring's size and losses on the agent's own /metrics."""
        ring, series = self.ring, self.node.store.series
        series[REPORT_HISTORY_BYTES][()] = ring.bytes
        oldest = next(iter(ring), None)
        series[REPORT_HISTORY_SECONDS][()] = (time.time() - oldest.time_ms / 1000) if oldest else 0.0
        series[REPORT_HISTORY_DROPPED][()] = ring.dropped_unacked

    def _live_message(self, report: pb.MetricsReport) -> pb.AgentMessage:
        """A fresh entry as sent live: with the current gauges (a replayed entry has none)."""
        live = pb.MetricsReport()
        live.CopyFrom(report)
        live.series.extend(to_series(self.node.store.gauges()))
        return pb.AgentMessage(metrics=live)

    async def _tick_loop(self) -> None:
        """Every interval, connected or not: one entry into the ring, sent at once when live."""
        while True:
            await asyncio.sleep(self.config.report_interval_s)
            try:
                entry = self._close_interval()
            except Exception:  # a bug here must not end counting for the agent's life
                log.exception("event=report_interval_failed")
                continue
            box = self._outbox
            if box is None or not self.connected or self.mode is None:
                continue
            if self.reports_queued >= _REPORTS_QUEUED_MAX:
                self._hold_back(entry)
                continue
            if self.mode == _INCREMENTS:
                self._catch_up(box)
                self._put_report(box, self._live_message(entry))
            else:  # _LEGACY: each report is the whole count, the newest replaces any held back
                self._behind_after = None
                self._put_report(box, self._metrics_message())
            box.put_nowait(self._status_message())

    def _put_report(self, box: asyncio.Queue[Outgoing], msg: pb.AgentMessage | Entry) -> None:
        self.reports_queued += 1
        box.put_nowait(msg)

    def _hold_back(self, entry: pb.MetricsReport) -> None:
        """The stream has not taken what is queued: this interval waits in the ring."""
        self.reports_held_back += 1
        if self._behind_after is None:
            self._behind_after = entry.seq - 1
            log.warning("event=report_backlog queued=%d seq=%d: the controller is not reading; intervals "
                        "wait in the history ring", self.reports_queued, entry.seq)

    def _catch_up(self, box: asyncio.Queue[Outgoing]) -> None:
        """Intervals held back while the outbox was full go out first, from the ring, oldest first
        (those the ring evicted meanwhile are counted there as dropped)."""
        after = self._behind_after
        if after is None:
            return
        self._behind_after = None
        held = self.ring.since(after)[:-1]  # the newest is the live entry, sent with the gauges
        for old in held:
            self._put_report(box, old)
        log.info("event=report_backlog_cleared sending=%d from_seq=%d", len(held), after + 1)

    def _on_ack(self, ack: pb.ReportAck) -> None:
        if self.mode is None:
            # The stream's first message: this controller takes increments and holds every seq up
            # to ack.seq. Send what it lacks, oldest first, before anything live.
            self.mode = _INCREMENTS
            if ack.controller_epoch != self.controller_epoch:
                log.info("event=controller_instance epoch=%d acked=%d", ack.controller_epoch, ack.seq)
            self.controller_epoch = ack.controller_epoch
            # It may also take series refs: labels once per stream, and then the series as
            # packed columns (agent/seriesrefs.py).
            self._series_refs = SeriesRefTable(columns=ack.series_columns) if ack.series_refs else None
            self.ring.ack(ack.seq)
            lacking = self.ring.since(ack.seq)
            if lacking and lacking[0].seq > ack.seq + 1:
                log.warning("event=report_history_gap controller_has=%d first_retained=%d", ack.seq, lacking[0].seq)
            box = self._outbox
            if box is None:
                return
            for entry in lacking:
                self._put_report(box, entry)
            self.replayed += len(lacking)
            if lacking:
                log.info("event=report_replay entries=%d first_seq=%d last_seq=%d acked=%d", len(lacking),
                         lacking[0].seq, lacking[-1].seq, ack.seq)
            box.put_nowait(self._status_message())
        elif ack.seq > self.ring.acked:
            self.ring.ack(ack.seq)

    # ------------------------------------------------------------------ messages
    def _metrics_message(self) -> pb.AgentMessage:
        """A cumulative report, for a controller that does not take increments."""
        self._seq += 1
        store = self.node.store
        report = pb.MetricsReport(agent_id=self.node.agent_id, seq=self._seq, time_ms=int(time.time() * 1000),
                                  latency_bounds_ms=list(LATENCY_BUCKETS_MS),
                                  series=to_series(store.snapshot(), store.created_ms))
        return pb.AgentMessage(metrics=report)

    def _status_message(self) -> pb.AgentMessage:
        return pb.AgentMessage(status=pb.AgentStatus(ready=self.node.ready,
                                                     capture_installed=self.node.capture_installed,
                                                     capture_mode=self.node.capture_mode[0],
                                                     capture_mode_reason=self.node.capture_mode[1],
                                                     time_ms=int(time.time() * 1000)))

    def _hello_message(self) -> pb.AgentMessage:
        c = self.config
        return pb.AgentMessage(hello=pb.AgentHello(
            agent_id=self.node.agent_id, node=c.node, version=AGENT_VERSION,
            start_time_ms=self.node.start_time_ms, node_ip=c.node_ip, pod_cidrs=list(c.pod_cidrs),
            identity_encodings=IDENTITY_ENCODINGS))

    def _on_tap_event(self, event: pb.TapEvent) -> None:
        box = self._outbox
        if box is None or not self.connected or box.qsize() >= _TAP_QUEUE_MAX:
            self.tap_events_dropped += 1  # tap is live: nobody wants a backlog replayed later
            return
        box.put_nowait(pb.AgentMessage(tap_event=event))

    def review_scrape(self, token: str) -> asyncio.Future[pb.ScrapeReviewResult]:
        """Ask the controller whether a scraper's token may read /metrics (agent/scrapeauth.py).
        Raises ConnectionError when there is no stream to ask on."""
        box = self._outbox
        if box is None or not self.connected:
            raise ConnectionError("no controller link")
        self._review_ids += 1
        rid = self._review_ids
        fut: asyncio.Future[pb.ScrapeReviewResult] = asyncio.get_running_loop().create_future()
        self._reviews[rid] = fut
        fut.add_done_callback(lambda _f: self._reviews.pop(rid, None))
        box.put_nowait(pb.AgentMessage(scrape_review=pb.ScrapeReview(id=rid, token=token)))
        return fut

    def request_certificate(self, pod_uid: str, csr_der: bytes) -> asyncio.Future[pb.CertificateIssued]:
        """Ask the controller to sign a CSR for a pod of this node (agent/certs.py). Raises
        ConnectionError when there is no stream to ask on."""
        box = self._outbox
        if box is None or not self.connected:
            raise ConnectionError("no controller link")
        self._review_ids += 1
        fut: asyncio.Future[pb.CertificateIssued] = asyncio.get_running_loop().create_future()
        self._csrs[self._review_ids] = fut
        rid = self._review_ids
        fut.add_done_callback(lambda _f: self._csrs.pop(rid, None))
        box.put_nowait(pb.AgentMessage(csr=pb.CertificateSigningRequest(id=self._review_ids, pod_uid=pod_uid,
                                                                        csr_der=csr_der)))
        return fut

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if not self.config.token_file:
            return ()
        try:
            with open(self.config.token_file) as f:  # re-read per connect: tokens rotate
                # The first word: a controller's token file may list more tokens, with roles.
                token = next(iter(f.read().split()), "")
        except OSError as exc:
            log.warning("event=token_unreadable path=%s error=%r", self.config.token_file, exc)
            return ()
        return (("authorization", f"Bearer {token}"),)

    # ------------------------------------------------------------------ the stream
    async def _requests(self, box: asyncio.Queue[Outgoing]) -> AsyncIterator[pb.AgentMessage]:
        yield self._hello_message()
        yield self._status_message()
        # Reports start once the controller said what it takes (its first message: _handle).
        while True:
            msg = await box.get()
            if msg is None:
                return
            if isinstance(msg, Entry):  # history, replayed
                report = msg.report()
                report.replayed = True
                msg = pb.AgentMessage(metrics=report)
            if msg.WhichOneof("msg") == "metrics":
                self.reports_queued = max(0, self.reports_queued - 1)
                # Series changed before this report may be evicted once it is out (node.evict).
                self.node.reported_at = time.monotonic()
                refs = self._series_refs
                if refs is not None and msg.metrics.increments:
                    refs.compact(msg.metrics)  # a copy (live) or decoded from the ring: ours
            yield msg

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            connects_before = self.connects
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:  # the controller is away, or refused us
                log.info("event=controller_disconnected addr=%s code=%s details=%r", self.config.controller,
                         exc.code().name, exc.details())
            except FileNotFoundError as exc:
                if exc.filename != self.config.controller_ca:
                    log.info("event=controller_disconnected addr=%s error=%r", self.config.controller, exc)
                elif not self._ca_missing:
                    # Expected right after an install: the CA ConfigMap ships empty and the
                    # controller fills it on its first start; the kubelet then projects the file.
                    self._ca_missing = True
                    log.warning("event=controller_ca_missing path=%s detail='waiting for the controller to "
                                "publish its CA (ConfigMap nodemesh-controller-ca); no plaintext fallback'",
                                exc.filename)
            except (OSError, grpc.RpcError) as exc:
                log.info("event=controller_disconnected addr=%s error=%r", self.config.controller, exc)
            except Exception:  # a bug here must not end reporting for the agent's life
                log.exception("event=controller_link_failed addr=%s", self.config.controller)
            finally:
                self.connected = False
                self._outbox = None
                self.reports_queued = 0  # that stream's queue is gone: the next ack replays from the ring
                self._behind_after = None
                self.mode = None
                self._series_refs = None  # refs live as long as their stream
                pending: list[asyncio.Future[Any]] = [*self._reviews.values(), *self._csrs.values()]
                for fut in pending:  # asked on this stream: never answered now
                    if not fut.done():
                        fut.set_exception(ConnectionError("controller link lost"))
                # The taps were the disconnected controller's; it re-opens them on reconnect.
                self.node.close_all_taps()
            if self._stopping:
                return
            # A session that got connected resets the backoff: the next failure is a new outage.
            attempt = 0 if self.connects > connects_before else attempt + 1
            delay = random.uniform(0, min(self.backoff_max_s, self.backoff_base_s * (2 ** attempt)))
            await asyncio.sleep(delay)

    def _channel(self) -> grpc.aio.Channel:
        """The channel to the controller: TLS verified against --controller-ca (re-read per connect:
        a rotated CA is picked up at the next reconnect), else plaintext (loopback, tests)."""
        ca = self.config.controller_ca
        if not ca:
            if self.config.token_file and not self._plaintext_warned and not _loopback(self.config.controller):
                self._plaintext_warned = True
                log.warning("event=controller_plaintext addr=%s warning='the bearer token is sent without TLS: "
                            "pass --controller-ca'", self.config.controller)
            return grpc.aio.insecure_channel(self.config.controller, options=GRPC_CHANNEL_OPTIONS)
        with open(ca, "rb") as f:  # OSError: this attempt fails, the link retries with backoff
            roots = f.read()
        if self._ca_missing:
            self._ca_missing = False
            log.info("event=controller_ca_found path=%s", ca)
        return grpc.aio.secure_channel(self.config.controller, grpc.ssl_channel_credentials(root_certificates=roots),
                                       options=GRPC_CHANNEL_OPTIONS)

    async def _session(self) -> None:
        async with self._channel() as channel:
            stub = pb_grpc.ControllerStub(channel)
            box: asyncio.Queue[Outgoing] = asyncio.Queue()
            call = stub.Connect(self._requests(box), metadata=self._metadata())
            try:
                await call.wait_for_connection()
                self.mode = None
                self._outbox = box
                self.connected = True
                accepted = False
                async for msg in call:
                    if not accepted:
                        # Only the controller's first message (identity) proves it accepted us: a
                        # refused stream (bad token) must keep backing off, not reset the backoff.
                        accepted = True
                        self.connects += 1
                        log.info("event=controller_connected addr=%s agent_id=%s", self.config.controller,
                                 self.node.agent_id)
                    self._handle(msg)
            finally:
                box.put_nowait(None)  # ends the request generator, which may be parked on box.get()
                call.cancel()

    def _handle(self, msg: pb.ControllerMessage) -> None:
        which = msg.WhichOneof("msg")
        if which == "report_ack":
            self._on_ack(msg.report_ack)
            return
        if which == "scrape_review_result":  # an answer, never what a controller opens with
            fut = self._reviews.get(msg.scrape_review_result.id)
            if fut is not None and not fut.done():
                fut.set_result(msg.scrape_review_result)
            return
        if which == "certificate":
            cfut = self._csrs.get(msg.certificate.id)
            if cfut is not None and not cfut.done():
                cfut.set_result(msg.certificate)
            return
        if which == "trust_bundle":
            if self.on_trust_bundle is not None:
                self.on_trust_bundle(msg.trust_bundle.roots_pem)
            return
        if self.mode is None and self._outbox is not None:
            # A controller from before increments opens with the identity: cumulative reports.
            self.mode = _LEGACY
            log.info("event=controller_takes_cumulative addr=%s", self.config.controller)
            self._put_report(self._outbox, self._metrics_message())
        if which == "identity_compressed":
            try:
                msg = inflate_identity(msg.identity_compressed)
            except ValueError as exc:
                # Keep what we hold: asking again would bring the same bytes back.
                self.identity_refused += 1
                log.warning("event=identity_refused addr=%s error=%s", self.config.controller, exc)
                return
            self.identity_inflated += 1
            which = msg.WhichOneof("msg")
        if which in ("identity", "identity_delta"):
            if not self.node.apply_identity(msg) and self._outbox is not None:
                index = self.node.index
                self._outbox.put_nowait(pb.AgentMessage(identity_resync=pb.IdentityResync(
                    epoch=index.epoch, version=index.version, reason="delta does not apply")))
        elif which == "tap_open":
            self.node.open_tap(msg.tap_open.tap_id, msg.tap_open.filter)
        elif which == "tap_close":
            self.node.close_tap(msg.tap_close.tap_id)
