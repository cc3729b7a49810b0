"""The agent's link to the controller: one long-lived `Controller.Connect` stream (grpc.aio).

Up: AgentHello first, then every `report_interval_s` a MetricsReport (the node's cumulative
series) and an AgentStatus, and TapEvents as they come. Down: an IdentitySnapshot, then
IdentityDeltas, and TapOpen/TapClose. A delta that does not fit the identity held (a gap in the
versions) is answered with an IdentityResync: the controller sends the whole identity again.
On any failure the link reconnects with exponential backoff and full jitter. Nothing in the data
plane waits on this: with the controller down, traffic flows and counts keep accumulating; the
next report after reconnecting carries them all (reports are cumulative).

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
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _pkg_version
from typing import TYPE_CHECKING

import grpc
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.metrics import to_series
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.api.model import GRPC_CHANNEL_OPTIONS, LATENCY_BUCKETS_MS

if TYPE_CHECKING:
    from nodemesh.agent.node import NodeTelemetry

log = logging.getLogger("nodemesh.agent.report")

try:
    AGENT_VERSION = _pkg_version("nodemesh")
except PackageNotFoundError:  # run from a copy, not installed as a distribution
    AGENT_VERSION = "0.0.0"

_TAP_QUEUE_MAX = 10_000


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ControllerLink:
    def __init__(self, config: AgentConfig, node: NodeTelemetry, *, backoff_base_s: float = 0.25,
                 backoff_max_s: float = 10.0) -> None:
        self.config = config
        self.node = node
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.connected = False
        self.connects = 0                    # successful stream starts, for tests and logs
        self.tap_events_dropped = 0
        self._seq = 0
        self._task: asyncio.Task[None] | None = None
        self._outbox: asyncio.Queue[pb.AgentMessage | None] | None = None
        self._stopping = False
        self._reviews: dict[int, asyncio.Future[pb.ScrapeReviewResult]] = {}  # ScrapeReview id -> answer
        self._review_ids = 0
        self._plaintext_warned = False

    def start(self) -> None:
        self.node.add_tap_sink(self._on_tap_event)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Send one last report (bounded wait), then end the stream."""
        self._stopping = True
        self.node.remove_tap_sink(self._on_tap_event)
        if self._outbox is not None and self.connected:
            self._outbox.put_nowait(self._metrics_message())
            self._outbox.put_nowait(None)  # ends the request stream: a clean half-close
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._task), 2.0)  # type: ignore[arg-type]
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    # ------------------------------------------------------------------ messages
    def _metrics_message(self) -> pb.AgentMessage:
        self._seq += 1
        store = self.node.store
        report = pb.MetricsReport(agent_id=self.node.agent_id, seq=self._seq, time_ms=int(time.time() * 1000),
                                  latency_bounds_ms=list(LATENCY_BUCKETS_MS),
                                  series=to_series(store.snapshot(), store.created_ms))
        return pb.AgentMessage(metrics=report)

    def _status_message(self) -> pb.AgentMessage:
        return pb.AgentMessage(status=pb.AgentStatus(ready=self.node.ready,
                                                     capture_installed=self.node.capture_installed,
                                                     time_ms=int(time.time() * 1000)))

    def _hello_message(self) -> pb.AgentMessage:
        c = self.config
        return pb.AgentMessage(hello=pb.AgentHello(
            agent_id=self.node.agent_id, node=c.node, version=AGENT_VERSION,
            start_time_ms=self.node.start_time_ms, node_ip=c.node_ip, pod_cidrs=list(c.pod_cidrs)))

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
        fut: asyncio.Future[pb.ScrapeReviewResult] = asyncio.get_running_loop().create_future()
        self._reviews[self._review_ids] = fut
        fut.add_done_callback(lambda _f, rid=self._review_ids: self._reviews.pop(rid, None))
        box.put_nowait(pb.AgentMessage(scrape_review=pb.ScrapeReview(id=self._review_ids, token=token)))
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
    async def _requests(self, box: asyncio.Queue[pb.AgentMessage | None]) -> AsyncIterator[pb.AgentMessage]:
        yield self._hello_message()
        yield self._metrics_message()
        yield self._status_message()
        while True:
            msg = await box.get()
            if msg is None:
                return
            if msg.WhichOneof("msg") == "metrics":
                # Series changed before this report may be evicted once it is out (node.evict).
                self.node.reported_at = time.monotonic()
            yield msg

    async def _ticker(self, box: asyncio.Queue[pb.AgentMessage | None]) -> None:
        while True:
            await asyncio.sleep(self.config.report_interval_s)
            box.put_nowait(self._metrics_message())
            box.put_nowait(self._status_message())

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
            except (OSError, grpc.RpcError) as exc:
                log.info("event=controller_disconnected addr=%s error=%r", self.config.controller, exc)
            except Exception:  # a bug here must not end reporting for the agent's life
                log.exception("event=controller_link_failed addr=%s", self.config.controller)
            finally:
                self.connected = False
                self._outbox = None
                for fut in list(self._reviews.values()):  # asked on this stream: never answered now
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
        return grpc.aio.secure_channel(self.config.controller, grpc.ssl_channel_credentials(root_certificates=roots),
                                       options=GRPC_CHANNEL_OPTIONS)

    async def _session(self) -> None:
        async with self._channel() as channel:
            stub = pb_grpc.ControllerStub(channel)
            box: asyncio.Queue[pb.AgentMessage | None] = asyncio.Queue()
            call = stub.Connect(self._requests(box), metadata=self._metadata())
            ticker: asyncio.Task[None] | None = None
            try:
                await call.wait_for_connection()
                self._outbox = box
                self.connected = True
                ticker = asyncio.get_running_loop().create_task(self._ticker(box))
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
                if ticker is not None:
                    ticker.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await ticker
                call.cancel()

    def _handle(self, msg: pb.ControllerMessage) -> None:
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
        elif which == "scrape_review_result":
            fut = self._reviews.get(msg.scrape_review_result.id)
            if fut is not None and not fut.done():
                fut.set_result(msg.scrape_review_result)
