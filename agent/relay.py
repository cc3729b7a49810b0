"""One proxied connection: the accepted client side, its upstream, and the bytes between them.

`Connection` is the asyncio Protocol for the accepted socket. On accept it learns the original
destination, picks the endpoint, and starts the upstream connect at once (so a server that
speaks first is heard) while protocol detection waits for the client's first bytes. Once the
protocol is known a *mode* (tcp.TcpMode, http1_relay.Http1Mode, http2_relay.Http2Mode) owns
what happens to the bytes, seeing the connection only as a `seam.ModeHost`; this module owns the
lifecycle, flow control and half-close.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, cast

from nodemesh.agent.admission import SHED_SLOW, Admission, capacity_for
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.detect import HTTP1, HTTP2, NEED_MORE, TCP, Detection, detect, settle_on_timeout
from nodemesh.agent.endpoints import EndpointPicker
from nodemesh.agent.fairness import BYTES_PER_WORK_SHIFT, MAX_HELD, SourceLoad
from nodemesh.agent.http2 import goaway_frame, settings_frame
from nodemesh.agent.observe import ConnectionEnd, ConnectionMeta, Observer
from nodemesh.agent.seam import Mode, ModeHost, not_connected
from nodemesh.agent.sockets import original_destination, set_reset_on_close, upstream_socket
from nodemesh.agent.splice import HAVE_SPLICE, MAX_SPLICED, Splice, sockmap_accelerated
from nodemesh.agent.tcp import TcpMode

log = logging.getLogger("nodemesh.agent.relay")

MAX_DETECT_BYTES = 64 * 1024   # no protocol decided after this many bytes: opaque
ENHANCE_YOUR_CALM = 0xB
SHED_503 = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n"
            b"Retry-After: 1\r\n\r\n")
SHED_408 = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
LINGER_S = 2.0   # after an answer of our own: how long to read (and drop) what the client still sends
_NOBODY = SourceLoad("")   # a connection's source before it is accepted: time spent there is nobody's


def looks_like_h2_server_preface(data: bytes) -> bool:
    """A SETTINGS frame on stream 0: what an HTTP/2 server writes first."""
    return len(data) >= 9 and data[3] == 4 and data[5:9] == b"\0\0\0\0" and data[4] in (0, 1)


class WorkerContext:
    """What every connection of a worker shares: config, observer, endpoint picker, live set."""

    def __init__(self, config: AgentConfig, observer: Observer, picker: EndpointPicker,
                 mode_factory: Callable[[str, ModeHost], Mode], admission: Admission | None = None) -> None:
        self.config = config
        # Shared by the worker's listeners (their connections take fds from the same limit).
        self.admission = admission if admission is not None else Admission(capacity_for(1 << 20))
        self.observer = observer
        self.picker = picker
        self.mode_factory = mode_factory
        self.live: set[Connection] = set()
        self.draining = False
        self.listen_ports = frozenset((config.outbound_port, config.inbound_port, config.admin_port))
        self.opaque_ports = frozenset(config.opaque_ports)
        self.transparent_ok = config.transparent   # set False after the kernel refuses once
        # Identity hooks (agent/telemetry.py). `identity_gate(source, destination)`: None to go on,
        # or a future to wait for (bounded) while an unknown local-pod address's identity is on its
        # way. `learn_endpoint(local, dialled)`: the pod kube-proxy chose when the agent dialled an
        # address it could not resolve (conntrack), or None.
        self.identity_gate: Callable[[str, str], asyncio.Future[str] | None] | None = None
        self.learn_endpoint: Callable[[tuple[str, int], tuple[str, int]], tuple[str, int] | None] | None = None
        # `count_retry(via, outcome)`: a failed upstream connect retried (relay._dial), via another
        # "endpoint" or the "service" address as dialled; outcome "connected" or "failed".
        self.count_retry: Callable[[str, str], None] | None = None
        # `count_splice(outcome)`: a bulk opaque connection handed to splice(2) ("spliced"), or
        # kept on the copying path ("fds", "sockmap", "unavailable"); agent/splice.py.
        self.count_splice: Callable[[str], None] = _uncounted
        self._ids = itertools.count(1)
        self.on_idle: Callable[[], None] | None = None  # drain: called when live becomes empty
        self.tunnel: Any = None  # agent.tunnel.Tunnel with --mtls: cross-node connections over mTLS
        # Draining beside a newer agent (agent/handover.py): a mode calls this where its connection
        # could be handed over (HTTP/1: the last response ended, no request begun).
        self.at_boundary: Callable[[Connection], None] | None = None

    def next_id(self) -> int:
        return next(self._ids)

    def forget(self, conn: Connection) -> None:
        self.live.discard(conn)
        if not self.live and self.on_idle is not None:
            self.on_idle()


class Connection(asyncio.Protocol):
    __slots__ = (
        "client",
        "client_eof",
        "client_lost",
        "client_shut",
        "connect_task",
        "connecting",
        "ctx",
        "detect_timer",
        "direction",
        "drain_requested",
        "error",
        "finished",
        "forced_original",
        "frozen",
        "linger_timer",
        "lingering",
        "load",
        "meta",
        "mode",
        "mtls",
        "obs",
        "observer",
        "opened",
        "paused_for_connect",
        "pending",
        "pending_len",
        "read_bytes",
        "send_client",
        "send_upstream",
        "shed",
        "slow",
        "splice",
        "throttled",
        "up",
        "up_eof",
        "up_lost",
        "up_pending",
        "write_bytes",
    )

    def __init__(self, ctx: WorkerContext, direction: str) -> None:
        self.ctx = ctx
        self.direction = direction
        self.client: asyncio.Transport | None = None
        self.up: asyncio.Transport | None = None
        self.mode: Mode | None = None
        self.meta: ConnectionMeta | None = None
        self.observer = ctx.observer
        self.obs: Any = None
        # The mode's way to forward bytes (seam.ModeHost): each transport's own write, once connected.
        self.send_client: Callable[[bytes], None] = not_connected
        self.send_upstream: Callable[[bytes], None] = not_connected
        self.pending: list[bytes] = []
        self.pending_len = 0
        self.read_bytes = 0
        self.write_bytes = 0
        self.client_eof = False
        self.up_eof = False
        self.client_lost = False
        self.client_shut = False       # write_eof() sent to the client: writing now would raise
        self.up_lost = False
        self.finished = False
        self.frozen = False            # being handed over: reading stays paused on both sides
        self.opened = False
        self.detect_timer: asyncio.TimerHandle | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.error: str | None = None
        self.drain_requested = False
        self.paused_for_connect = False
        self.connecting = False
        self.up_pending: list[bytes] = []
        self.shed: str | None = None   # admission refused it: answer clearly, connect nothing
        self.lingering = False         # our own answer is out: drop what the client sends, then close
        self.linger_timer: asyncio.TimerHandle | None = None
        self.slow = False              # counted as slow by admission (first request late)
        self.load = _NOBODY            # this connection's source's time in the worker (fairness.py)
        self.throttled = False         # reading paused: the source spent its time budget
        # mTLS (agent/tunnel.py): the peer's verified SPIFFE ID — the client's on an inbound
        # tunnel, the server's on an outbound one; None when the connection is not mTLS.
        self.mtls: str | None = None
        self.forced_original: tuple[str, int] | None = None  # the target a tunnel's CONNECT named
        self.splice: Splice | None = None  # opaque TCP moved by the kernel (agent/splice.py), once taken over

    # -- accept ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.client = transport
        self.send_client = transport.write
        if self.meta is not None:
            return  # taken over from a draining agent: accepted there (agent/handover.py)
        ctx = self.ctx
        sock = transport.get_extra_info("socket")
        peer = transport.get_extra_info("peername")
        if peer is None:
            # The client reset between the handshake and our accept (probes, scanners with
            # SO_LINGER 0): no peer address any more. Close it here; an exception out of this
            # callback would leave the transport, and its fd, open for good.
            self.finished = True
            transport.abort()
            return
        if self.forced_original is not None:
            original = self.forced_original
        else:
            original, _natted = original_destination(sock)
            if ctx.tunnel is not None and ctx.tunnel.is_tunnel(self.direction, original):
                with contextlib.suppress(OSError):  # the handshake's small flights must not wait for ACKs
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                ctx.tunnel.accept(self, transport, peer, original, lambda: Connection(ctx, self.direction))
                return
            if ctx.tunnel is not None and ctx.tunnel.refuse_plaintext(self.direction, peer, original):
                self.finished = True
                set_reset_on_close(sock)
                transport.abort()
                return
        if original[1] in ctx.listen_ports:
            # Dialled the agent's own ports (nodeIP:4140 from a pod or the node): proxying would
            # dial ourselves, again and again. Capture never redirects these ports (the plan skips
            # them), so this is never a pod's real traffic. Not `natted` alone: conntrack answers
            # SO_ORIGINAL_DST for any tracked connection, NAT or not, so a direct dial looked natted
            # and one `curl nodeIP:4140` looped forever.
            self._refuse_self_dial(peer, original)
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        gate = ctx.identity_gate(peer[0], original[0]) if ctx.identity_gate is not None else None
        if gate is not None and not gate.done():
            # An address of this node's pods that we cannot name yet: hold the connection (bounded)
            # until its identity arrives, so it is counted and routed knowing who it is.
            transport.pause_reading()
            accepted = time.monotonic()
            gate.add_done_callback(lambda _: self._accepted(peer, original, accepted))
            return
        self._accepted(peer, original, 0.0)

    def _accepted(self, peer: tuple[str, int], original: tuple[str, int], held_since: float) -> None:
        if self.finished:
            return  # the client went away while we waited for its identity
        ctx = self.ctx
        assert self.client is not None
        fairness = ctx.admission.fairness
        self.load = load = fairness.load_for(peer[0])
        if load.throttled and len(load.held) < MAX_HELD:
            # The source spent its share of this tick: hold its new connection (nothing dialled,
            # reading paused) until the next tick lifts the throttle, as the identity wait does.
            self.client.pause_reading()
            since = held_since or time.monotonic()
            load.held.append(lambda: self._accepted(peer, original, since))
            return
        destination = ctx.picker.pick(original[0], original[1])
        if destination[1] in ctx.listen_ports:
            self._refuse_self_dial(peer, original)  # a Service in front of the agent's own ports
            return
        shed = ctx.admission.admit(peer[0])
        if shed:
            destination = original
        self.meta = ConnectionMeta(
            conn_id=ctx.next_id(), direction=self.direction, source=(peer[0], peer[1]),
            original_destination=original, destination=destination, started=held_since or time.monotonic(),
            first_bytes_at=held_since if self.pending else 0.0, mtls=self.mtls,
        )
        ctx.live.add(self)
        fairness.opened(load, self)
        loop = asyncio.get_running_loop()
        if shed:
            # No upstream: the client gets the answer its protocol understands (see _answer_shed).
            self.shed = shed
            self.error = f"shed: {shed}"
            if original[1] in ctx.opaque_ports:
                self._decide(Detection(TCP))
            else:
                self.detect_timer = loop.call_later(ctx.config.detect_timeout_s, self._detect_timeout)
            if held_since and not self.opened:
                self._after_wait()  # held (identity, throttle) with reading paused: read its first bytes now
            return
        ctx.picker.acquire(destination)
        plan = None
        if ctx.tunnel is not None and self.direction == "outbound":
            # Decided now, not in _connect: the connection's series carry the tunnel's identity
            # labels from their first count (agent/tunnel.py; fallback moves them back).
            try:
                plan = ctx.tunnel.plan(peer, destination)
            except ConnectionRefusedError:  # mTLS required by the destination, and not possible
                self.error = "connect: ECONNREFUSED"
                self._upstream_failed()
                return
            if plan is not None:
                self.mtls = self.meta.mtls = plan.server_id
        if original[1] in ctx.opaque_ports:
            self._decide(Detection(TCP))
        else:
            self.detect_timer = loop.call_later(ctx.config.detect_timeout_s, self._detect_timeout)
        self.connecting = True
        self.connect_task = loop.create_task(self._connect(peer, destination, plan))
        if held_since:
            self._after_wait()

    def secured(self, peer_id: str | None) -> None:
        """The connection's mTLS peer (agent/tunnel.py) is `peer_id` (None: not in a tunnel after
        all); telemetry moves its series if it had counted them already."""
        self.mtls = peer_id
        meta = self.meta
        if meta is None or meta.mtls == peer_id:
            return
        meta.mtls = peer_id
        if self.opened and self.obs is not None:
            self.ctx.observer.connection_secured(self.obs, peer_id)

    def _refuse_self_dial(self, peer: tuple[str, int], original: tuple[str, int]) -> None:
        log.debug("event=refused_self_dial src=%s:%s dst=%s:%s", peer[0], peer[1], *original)
        self.finished = True
        self.client.abort()  # type: ignore[union-attr]

    def _after_wait(self) -> None:
        """Bytes (or an EOF) that came with the accept while we waited: handle them now."""
        assert self.client is not None
        self.client.resume_reading()
        if self.pending and self.mode is None:
            result = detect(b"".join(self.pending))
            if result.protocol != NEED_MORE or self.pending_len >= MAX_DETECT_BYTES:
                self._decide(result if result.protocol != NEED_MORE else Detection(TCP))
        if self.client_eof:
            self.eof_received()

    async def _connect(self, peer: tuple[str, int], destination: tuple[str, int], plan: Any = None) -> None:
        ctx = self.ctx
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        try:
            # Through an mTLS tunnel (agent/tunnel.py) when planned and the far node takes it.
            if plan is None or not await ctx.tunnel.open(self, peer, destination, plan, _Upstream,
                                                         ctx.config.connect_timeout_s):
                if plan is not None:
                    self.secured(None)  # fell back to plaintext (fail-open)
                sock, destination = await self._dial(peer, destination)
                if ctx.learn_endpoint is not None and self.meta is not None \
                        and destination == self.meta.original_destination:
                    self._learn_endpoint(sock, destination)
                await loop.create_connection(lambda: _Upstream(self), sock=sock)
                # The transport owns the fd now (libuv closes it with the transport). Our socket
                # object must never close it too: uvloop attaches it to the transport only once the
                # connection is made, and an upstream reset in between left it owning a number
                # libuv had already closed — collected later, it closed whatever the kernel had
                # given that number since (another connection's socket: "File descriptor N is
                # used by transport", EBADF in connection_made, connections counted open for good,
                # and libuv aborting under connect storms against resetting upstreams).
                sock.detach()
        except (OSError, TimeoutError) as exc:
            if sock is not None:
                sock.close()
            self.connecting = False
            code = getattr(exc, "errno", None)
            self.error = f"connect: {errno.errorcode.get(code, 'timeout') if code else 'timeout'}"
            self._upstream_failed()
        except asyncio.CancelledError:
            if sock is not None:
                sock.close()
            self.connecting = False
            self.up_lost = True
            self._maybe_finish()
            raise
        except Exception as exc:  # noqa: BLE001 - anything else must fail this connection, never leak it
            # Seen under connect storms: uvloop refused a new socket's fd with `RuntimeError: File
            # descriptor N is used by transport` (its bookkeeping still held a transport for that
            # number; aiohappyeyeballs catches the same, MagicStack/uvloop#653). Here the cause was
            # our own socket object closing an fd a second time (the detach() above); this stays
            # for any other way in. Uncaught, the task died and its connection stayed open for good.
            log.warning("event=upstream_connect_error error=%r", exc)
            if sock is not None:
                sock.close()
            self.connecting = False
            self.error = f"connect: {type(exc).__name__}"
            self._upstream_failed()
        else:
            self.connecting = False
            # Both sides may have ended while create_connection was returning (a Splice taken
            # over in upstream_made ends at once on a reset): _maybe_finish skipped it then.
            self._maybe_finish()
        finally:
            self.connect_task = None  # done: don't keep the finished task and its frame per connection

    def _cancel_connect(self) -> None:
        """Stop the upstream connect, if one is under way. A task cancelled before its first step
        never runs its body (CancelledError is thrown in at the coroutine's first line, outside
        _connect's handlers), so its cleanup — not connecting any more, finish — is done here:
        otherwise `connecting` stays set and _maybe_finish never finishes the connection — counted
        open for good, its endpoint and admission slot never released (a mode that closes both
        sides in the callback that created the task, a client gone in the same loop iteration)."""
        task = self.connect_task
        if task is None or task.done():
            return
        task.cancel()
        if inspect.getcoroutinestate(task.get_coro()) == inspect.CORO_CREATED:  # type: ignore[arg-type]
            self.connecting = False
            self.up_lost = True
            self.connect_task = None
            asyncio.get_running_loop().call_soon(self._maybe_finish)  # as _connect's handler would, later

    def reap_if_stuck(self) -> bool:
        """Housekeeping's safety net (housekeeping.py, every few seconds): a connection whose
        client is gone and whose upstream is gone or never came, with no connect under way, should
        have finished; if it has not (a state-machine bug: the connect task cancelled before it ran
        was one), finish it now, loudly, instead of holding its count, endpoint and admission slot
        for good. True when it was stuck and is finished now."""
        if self.finished or not self.client_lost or self.meta is None:
            return False
        task = self.connect_task
        if self.connecting and task is not None and not task.done():
            return False  # a connect, or its cancellation, still under way
        if self.up is not None and not self.up_lost:
            return False  # the upstream's close is still to be delivered
        log.warning("event=connection_reaped conn_id=%d direction=%s connecting=%s task=%s opened=%s mode=%s "
                    "error=%s", self.meta.conn_id, self.direction, self.connecting,
                    "none" if task is None else "done", self.opened, type(self.mode).__name__, self.error)
        self.connecting = False
        self._maybe_finish()
        return self.finished

    async def _dial(self, peer: tuple[str, int], destination: tuple[str, int]) -> tuple[socket.socket, tuple[str, int]]:
        """A socket connected to `destination`, and the address it is connected to. When the agent
        chose this endpoint for a Service address and the connect fails (refused, unreachable,
        timed out: an endpoint gone, e.g. with its node, still listed until the deltas arrive), it
        tries once more — another ready endpoint, else the Service address as dialled (kube-proxy
        decides). Safe: no client byte has gone upstream yet (they wait in `pending` until the
        upstream is connected). The connect timeout is split, so the worst case stays
        `connect_timeout_s`: half for the first try, what is left for the second."""
        ctx = self.ctx
        loop = asyncio.get_running_loop()
        meta = self.meta
        original = meta.original_destination if meta is not None else destination
        retry = destination != original
        budget = ctx.config.connect_timeout_s
        deadline = loop.time() + budget
        timeout = budget / 2 if retry else budget
        via = ""
        # The caller's own port when the capture NATed it to us (sockets.upstream_socket).
        keep_port = peer[1] if not self._accepted_on(original) else 0
        while True:
            sock, transparent = upstream_socket(peer[0] if ctx.transparent_ok else None, keep_port)
            if ctx.transparent_ok and not transparent:
                ctx.transparent_ok = False
                log.warning("event=transparent_unavailable fallback=node_address")
            try:
                await asyncio.wait_for(loop.sock_connect(sock, destination), timeout)
            except (OSError, TimeoutError) as exc:
                sock.close()
                if keep_port and getattr(exc, "errno", None) == errno.EADDRNOTAVAIL:
                    keep_port = 0  # that tuple is still ours in TIME_WAIT: let the kernel pick a port
                    continue
                if via and ctx.count_retry is not None:
                    ctx.count_retry(via, "failed")
                if not retry or self.client_lost or self.shed:
                    raise
                retry = False
                failed = destination
                destination = ctx.picker.retry(original[0], original[1], failed)
                if destination == original and self._accepted_on(original):
                    raise  # not NATed (a direct dial of our listener): as dialled would be ourselves
                via = "service" if destination == original else "endpoint"
                self._redirected(failed, destination)
                timeout = max(deadline - loop.time(), 0.0)
                continue
            except BaseException:
                sock.close()
                raise
            if via and ctx.count_retry is not None:
                ctx.count_retry(via, "connected")
            return sock, destination

    def _accepted_on(self, address: tuple[str, int]) -> bool:
        client = self.client
        sockname = client.get_extra_info("sockname") if client is not None else None
        return sockname is not None and tuple(sockname[:2]) == address

    def _redirected(self, failed: tuple[str, int], destination: tuple[str, int]) -> None:
        """The connection now goes to `destination` instead of `failed` (see _dial)."""
        picker, meta = self.ctx.picker, self.meta
        picker.release(failed)
        picker.acquire(destination)
        if meta is not None:
            meta.destination = destination
            if self.opened:
                self.ctx.observer.connection_endpoint(self.obs, destination)

    def _learn_endpoint(self, sock: socket.socket, dialled: tuple[str, int]) -> None:
        """We dialled what the client dialled (no endpoint known to us): ask who answers."""
        try:
            local = sock.getsockname()
        except OSError:
            return
        endpoint = self.ctx.learn_endpoint(local, dialled)  # type: ignore[misc]
        if endpoint is None or self.meta is None:
            return
        self.meta.endpoint = endpoint
        if self.opened:
            self.ctx.observer.connection_endpoint(self.obs, endpoint)

    # -- detection ---------------------------------------------------------------------------

    def _detect_timeout(self) -> None:
        self.detect_timer = None
        if self.mode is not None or self.opened:
            return
        if not self.pending and not self.shed:
            # The client has said nothing yet (a pool's connection opened ahead of its first
            # request; a client slowed by its node's load): there is nothing to settle on. Keep
            # waiting for whoever speaks first: the client's first bytes are detected when they
            # come, with a fresh timeout (data_received); a server's greeting decides opaque TCP at
            # once (upstream_data). Deciding TCP here relayed every request such a connection later
            # carried as opaque bytes, uncounted, and let a late slowloris through without its 408.
            return
        protocol = settle_on_timeout(b"".join(self.pending)) if self.pending else TCP
        if protocol == HTTP1 and not self.shed:
            # A request head arriving this slowly (a slowloris sends a byte a second): HTTP/1 from
            # here on, so the header timeout answers 408 instead of the connection running on as
            # opaque TCP. A source may hold only so many of these at once.
            if self.ctx.admission.mark_slow(self.meta.source[0]):  # type: ignore[union-attr]
                self.slow = True
            else:
                self.shed = SHED_SLOW
                self.error = f"shed: {SHED_SLOW}"
                self._abandon_upstream()
        self._decide(Detection(protocol))

    def _abandon_upstream(self) -> None:
        """A connection shed after its upstream connect began: drop the upstream."""
        self.ctx.picker.release(self.meta.destination)  # type: ignore[union-attr]
        if self.up is not None and not self.up_lost:
            self.up.abort()
        else:
            self._cancel_connect()

    # -- what a mode may do (seam.ModeHost) ----------------------------------------------------

    def head_arrived(self) -> None:
        """The first request head is complete (called by the HTTP/1 mode): no longer slow."""
        if self.slow:
            self.slow = False
            self.ctx.admission.unmark_slow(self.meta.source[0])  # type: ignore[union-attr]

    @property
    def header_timeout_s(self) -> float:
        return self.ctx.config.header_timeout_s

    def at_boundary(self) -> None:
        if self.ctx.at_boundary is not None:
            self.ctx.at_boundary(self)

    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(delay, callback)

    def detach(self) -> None:
        """Drop the references that make cycles (transport <-> protocol, mode <-> connection) so
        reference counting frees the connection at once: left to the cycle collector, whose full
        passes are rare in a worker with many long-lived objects, 9,000 closed connections still
        held ~30 MB. At its end, or once handed over (handover.py)."""
        self.mode = None
        self.client = None
        self.up = None
        self.send_client = self.send_upstream = not_connected
        self.obs = None

    # -- opaque TCP by splice(2) (agent/splice.py) -----------------------------------------------

    def try_splice(self) -> bool:
        """Hand this opaque TCP connection's sockets to a `Splice` if it can go now: nothing of it
        held here (pending bytes, write buffers), no half-close yet, not mTLS, not being handed
        over, fds to spare. True: not yet, ask again after the next chunk; False: done, or never."""
        if self.splice is not None or not self.ctx.config.splice or not HAVE_SPLICE:
            return False
        if self.mtls is not None or self.frozen or self.finished or self.shed or self.lingering \
                or self.client_lost or self.up_lost or self.client_eof or self.up_eof or self.client_shut:
            return False
        client, up = self.client, self.up
        if client is None or up is None:
            return up is None and self.connecting   # the upstream is still connecting
        if self.read_bytes + self.write_bytes < self.ctx.config.splice_after_bytes:
            return True   # not bulk (yet): a pipe pair is not worth its pages (splice.py)
        if self.pending or self.up_pending or self.paused_for_connect:
            return True
        if Splice.live >= MAX_SPLICED:
            return True   # ask again after the next chunk: one may have ended
        if client.get_write_buffer_size() or up.get_write_buffer_size():
            return True
        if client.get_extra_info("sslcontext") is not None or up.get_extra_info("sslcontext") is not None:
            return False
        admission = self.ctx.admission
        count = self.ctx.count_splice
        if admission.open * 3 > admission.capacity:
            count("fds")
            return False   # a spliced connection holds 6 fds, not 2 (admission.capacity_for counts 2)
        if sockmap_accelerated():
            count("sockmap")
            return False   # the pod<->agent hop's bytes bypass the TCP receive queue (splice.py)
        cdup = udup = None
        try:
            cdup = socket.socket(fileno=os.dup(client.get_extra_info("socket").fileno()))
            udup = socket.socket(fileno=os.dup(up.get_extra_info("socket").fileno()))
            sp = Splice(asyncio.get_running_loop(), cdup, udup, self._spliced, self._splice_ended)
        except OSError as exc:
            log.debug("event=splice_unavailable error=%r", exc)
            count("unavailable")
            for dup in (cdup, udup):
                if dup is not None:
                    dup.close()
            return False
        count("spliced")
        # The transports give up their sockets: no more callbacks into this connection, and
        # closing them closes their fds (and libuv's epoll entries); the duplicates are the
        # Splice's alone. Nothing was buffered in them (checked above), so nothing is lost.
        for transport in (client, up):
            transport.pause_reading()
            transport.set_protocol(_Released())
            transport.abort()
        self.client = self.up = None
        self.send_client = self.send_upstream = not_connected
        self.splice = sp
        sp.start(paused=self.throttled)
        return False

    def _spliced(self, from_up: bool, n: int) -> bool:
        """Bytes a Splice moved: counted as the copying path counts them, and the source's work."""
        if from_up:
            self.write_bytes += n
        else:
            self.read_bytes += n
        load = self.load
        load.work += 1 + (n >> BYTES_PER_WORK_SHIFT)
        if load.work > load.budget:
            self.over_budget(load)
        return not self.throttled

    def _splice_ended(self, error: str | None, upstream_side: bool) -> None:
        if error is not None and self.error is None:
            self.error = f"upstream: {error}" if upstream_side else error
        if error is None:
            self.client_eof = self.up_eof = True
        self.client_lost = self.up_lost = True
        self.splice = None
        self._maybe_finish()

    def _answer_shed(self, protocol: str) -> None:
        """Refused by admission: 503 for HTTP/1 (408 for a slow head), GOAWAY ENHANCE_YOUR_CALM for
        HTTP/2 (after an empty SETTINGS, as a server starts), a reset for anything else."""
        client = self.client
        if client is None or self.client_lost or client.is_closing():
            return
        if protocol == HTTP1:
            answer = SHED_408 if self.shed == SHED_SLOW else SHED_503
        elif protocol == HTTP2:
            answer = settings_frame() + goaway_frame(0, ENHANCE_YOUR_CALM)
        else:
            set_reset_on_close(client.get_extra_info("socket"))
            client.abort()
            return
        self.write_bytes += len(answer)
        client.write(answer)
        self.linger_close()

    def linger_close(self) -> None:
        """Our own answer (shed 503/408/GOAWAY, a 400/408 of the HTTP/1 mode) is written: drop the
        upstream, send FIN after the answer, and read (and drop) what the client still sends for up
        to LINGER_S before closing. Closing with the client's bytes unread, or with more on the way
        (a slowloris writes a byte a second), makes the kernel answer them with a reset, which can
        destroy our answer before the client reads it (measured: 190 of 2,000 slowloris clients got
        a reset instead of their 408). nginx's lingering_close, for the same reason."""
        if self.up is not None and not self.up_lost:
            self.up.close()
        else:
            self._cancel_connect()
        client = self.client
        if client is None or self.client_lost or client.is_closing():
            return
        self.lingering = True
        if self.client_eof:
            client.close()
            return
        if not self.client_shut and client.can_write_eof():
            client.write_eof()
            self.client_shut = True
        client.resume_reading()
        self.paused_for_connect = False
        self.linger_timer = asyncio.get_running_loop().call_later(LINGER_S, self._linger_done)

    def _linger_done(self) -> None:
        self.linger_timer = None
        if self.client is not None and not self.client_lost:
            self.client.close()

    def _decide(self, detection: Detection) -> None:
        if self.detect_timer is not None:
            self.detect_timer.cancel()
            self.detect_timer = None
        meta = self.meta
        assert meta is not None
        meta.protocol = detection.protocol
        meta.sni = detection.sni
        self.obs = self.ctx.observer.connection_open(meta)
        self.opened = True
        if self.shed:
            self.pending = []
            self.pending_len = 0
            self.up_pending = []
            self._answer_shed(detection.protocol)
            return
        self.mode = self.ctx.mode_factory(detection.protocol, self)
        if self.up is not None:
            self._flush_pending()
            self._hand_reads()
        elif self.pending_len >= MAX_DETECT_BYTES and self.client is not None and not self.client_lost:
            # Upstream not there yet: stop reading past one detection buffer until it is. Not
            # before: a paused transport would not notice the client resetting meanwhile.
            self.client.pause_reading()
            self.paused_for_connect = True
        if self.up_pending:
            held, self.up_pending = self.up_pending, []
            self.mode.upstream_data(b"".join(held))
        if self.drain_requested:
            self.mode.drain()

    def _hand_reads(self) -> None:
        """A mode that reads from the transports itself (seam.DirectReads, HTTP/1) gets them now
        that both sides are there and nothing is pending: one Python call per read instead of
        two (docs/bench.md "Hot path steps", step 8). Only transports still reading into this
        connection and its plain _Upstream. A tunnel's TLS layer hands its plaintext to the
        connection (or its _Upstream) itself, not through the transport's protocol: those reads
        keep taking this connection's path, which stays complete for them."""
        mode, client, up = self.mode, self.client, self.up
        take = getattr(mode, "reader_protocols", None)
        if take is None or client is None or up is None or self.pending or self.up_pending or self.frozen \
                or self.lingering or self.client_lost or self.up_lost:
            return
        up_proto = up.get_protocol()
        if client.get_protocol() is not self or type(up_proto) is not _Upstream:
            return
        client_reads, up_reads = take(self, up_proto)
        client.set_protocol(client_reads)
        up.set_protocol(up_reads)

    def _flush_pending(self) -> None:
        if self.pending:
            data = b"".join(self.pending)
            self.pending = []
            self.pending_len = 0
            self.mode.client_data(data)  # type: ignore[union-attr]
            if self.meta is not None:
                self.meta.first_bytes_at = 0.0  # only requests that were in these bytes waited
        if self.client_eof and self.up is not None and not self.up_lost:
            self._half_close_upstream()

    # -- client side -------------------------------------------------------------------------

    def over_budget(self, load: SourceLoad) -> None:
        """This connection's source spent its time budget for this tick (fairness.py): pause all
        its connections until housekeeping's next tick."""
        if self.ctx.admission.fairness.over_budget(load):
            for conn in load.conns:
                conn.throttle()

    def throttle(self) -> None:
        if self.throttled or self.lingering:
            return  # (lingering: our answer is out and what the client sends must be read and dropped)
        self.throttled = True
        if self.splice is not None:
            self.splice.pause()
            return
        client, up = self.client, self.up
        if client is not None and not self.client_lost and not client.is_closing():
            client.pause_reading()
        if up is not None and not self.up_lost and not up.is_closing():
            up.pause_reading()

    def unthrottle(self) -> None:
        """Resume both sides, unless flow control (a full write buffer on the other side, the
        upstream still connecting) holds one: its resume_writing resumes it later."""
        if not self.throttled:
            return
        self.throttled = False
        if self.frozen:
            return  # being handed over (handover.py): it resumes, or not, there
        if self.splice is not None:
            self.splice.resume()
            return
        client, up = self.client, self.up
        client_ok = client is not None and not self.client_lost and not client.is_closing()
        up_ok = up is not None and not self.up_lost and not up.is_closing()
        if client_ok and not self.paused_for_connect and not (up_ok and _backed_up(up)):  # type: ignore[arg-type]
            client.resume_reading()  # type: ignore[union-attr]
        if up_ok and not (client_ok and _backed_up(client)):  # type: ignore[arg-type]
            up.resume_reading()  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        load = self.load
        load.work += 1 + (len(data) >> BYTES_PER_WORK_SHIFT)   # fairness.py: what the worker spends on it
        if load.work > load.budget:
            self.over_budget(load)   # pauses reading after this read; this one is handled below
        self.read_bytes += len(data)
        mode = self.mode
        if mode is not None and self.up is not None:
            mode.client_data(data)
            return
        if self.lingering or (self.opened and mode is None):
            return  # our answer is out (or shed and answered): what follows is dropped
        self.pending.append(data)
        self.pending_len += len(data)
        if self.meta is None:
            return  # still waiting for an identity (reading is paused; this came with the accept)
        if not self.meta.first_bytes_at and self.up is None:
            self.meta.first_bytes_at = time.monotonic()  # the upstream is still connecting
        if mode is None:
            buffered = b"".join(self.pending) if len(self.pending) > 1 else data
            result = detect(buffered)
            if result.protocol == NEED_MORE:
                if self.pending_len < MAX_DETECT_BYTES:
                    if self.detect_timer is None:  # first bytes after a silent detection timeout
                        self.detect_timer = asyncio.get_running_loop().call_later(
                            self.ctx.config.detect_timeout_s, self._detect_timeout)
                    return
                result = Detection(TCP)
            self._decide(result)
        elif self.client is not None and not self.paused_for_connect and self.pending_len >= MAX_DETECT_BYTES:
            self.client.pause_reading()
            self.paused_for_connect = True

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.meta is None:
            return True  # waiting for an identity: handled once accepted
        if self.lingering:
            self.client.close()  # type: ignore[union-attr]
            return True
        if self.mode is None and not self.opened:
            result = detect(b"".join(self.pending))
            self._decide(result if result.protocol != NEED_MORE else Detection(TCP))
        elif self.up is not None and not self.up_lost and not self.pending:
            self._half_close_upstream()
        if self.up_eof or self.up_lost:
            self.close_both()
        return True

    def _half_close_upstream(self) -> None:
        up = self.up
        if up is not None and up.can_write_eof() and not up.is_closing():
            up.write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client_lost = True
        if self.meta is None:
            self.finished = True  # gone while waiting for its identity: nothing opened, nothing counted
            return
        if exc is not None and self.error is None:
            self.error = type(exc).__name__
        self._cancel_connect()
        if self.up is not None and not self.up_lost:
            if exc is not None:
                self.up.abort()
            else:
                self.up.close()
        self._maybe_finish()

    def pause_writing(self) -> None:
        if self.up is not None:
            self.up.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None and not self.up_lost and not self.frozen and not self.throttled:
            self.up.resume_reading()

    # -- upstream side -----------------------------------------------------------------------

    def upstream_made(self, transport: asyncio.Transport) -> None:
        if self.client_lost or self.shed:
            transport.close()
            return
        self.up = transport
        self.send_upstream = transport.write
        if self.mode is not None:
            self._flush_pending()
            self._hand_reads()
        if self.paused_for_connect and self.client is not None:
            self.paused_for_connect = False
            if not self.throttled:
                self.client.resume_reading()
        if self.throttled:
            transport.pause_reading()
        if isinstance(self.mode, TcpMode) and self.mode.spliceable:
            self.mode.spliceable = self.try_splice()

    def upstream_data(self, data: bytes) -> None:
        self.write_bytes += len(data)
        mode = self.mode
        if mode is None:
            if self.up_pending or looks_like_h2_server_preface(data):
                # An HTTP/2 server sends SETTINGS as soon as it accepts: hold it until the
                # client's preface (or the detection timeout) decides.
                self.up_pending.append(data)
                return
            # The server spoke first: not HTTP. Decide now instead of waiting for the timeout.
            self._decide(Detection(TCP))
            mode = self.mode
        mode.upstream_data(data)  # type: ignore[union-attr]

    def _release_held(self) -> None:
        """The server finished speaking before the client's first bytes decided the protocol:
        what it sent (held SETTINGS-like bytes) goes to the client now, as opaque TCP."""
        if self.mode is None and self.up_pending and self.meta is not None:
            self._decide(Detection(TCP))

    def upstream_eof(self) -> bool:
        self.up_eof = True
        self._release_held()
        client = self.client
        if client is not None and not self.client_lost and not self.client_shut and client.can_write_eof() \
                and not client.is_closing():
            client.write_eof()
            self.client_shut = True
        if self.client_eof:
            self.close_both()
        return True

    def upstream_lost(self, exc: Exception | None) -> None:
        self.up_lost = True
        if exc is not None and self.error is None:
            self.error = f"upstream: {type(exc).__name__}"
        if self.client is not None and not self.client_lost and not self.lingering:
            if exc is None:
                self._release_held()
            if exc is not None:
                set_reset_on_close(self.client.get_extra_info("socket"))
                self.client.abort()
            else:
                self.client.close()
        self._maybe_finish()

    def _upstream_failed(self) -> None:
        self.up_lost = True
        if self.mode is None and self.meta is not None:
            self._decide(Detection(TCP))
        client = self.client
        if client is not None and not self.client_lost:
            # Behave like the destination refused: the client sees a reset, not an accepted
            # connection that silently closes.
            set_reset_on_close(client.get_extra_info("socket"))
            client.abort()
        self._maybe_finish()

    # -- both --------------------------------------------------------------------------------

    def write_client(self, data: bytes) -> None:
        """Bytes the agent itself sends to the client (error responses, GOAWAY)."""
        if self.client is not None and not self.client_lost and not self.client.is_closing() \
                and not self.client_shut:
            self.write_bytes += len(data)
            self.client.write(data)

    def close_both(self) -> None:
        if self.splice is not None:
            self.splice.close(None, False)
            return
        if self.client is not None and not self.client_lost:
            self.client.close()
        if self.up is not None and not self.up_lost:
            self.up.close()
        else:
            self._cancel_connect()

    def abort_both(self) -> None:
        if self.splice is not None:
            self.splice.close(None, False)
            return
        if self.client is not None and not self.client_lost:
            self.client.abort()
        if self.up is not None and not self.up_lost:
            self.up.abort()
        else:
            self._cancel_connect()

    def drain(self) -> None:
        """The agent is shutting down: let this connection end at its next safe point."""
        self.drain_requested = True
        if self.mode is not None:
            self.mode.drain()

    def _maybe_finish(self) -> None:
        if self.finished or not self.client_lost:
            return
        if self.up is not None and not self.up_lost:
            return
        if self.connecting:
            return  # cancellation in flight: _connect finishes us
        self.finished = True
        if self.detect_timer is not None:
            self.detect_timer.cancel()
            self.detect_timer = None
        if self.linger_timer is not None:
            self.linger_timer.cancel()
            self.linger_timer = None
        ctx = self.ctx
        meta = self.meta
        assert meta is not None
        if not self.opened:
            result = detect(b"".join(self.pending)) if self.pending else Detection(TCP)
            meta.protocol = result.protocol if result.protocol != NEED_MORE else TCP
            self.obs = ctx.observer.connection_open(meta)
            self.opened = True
        if self.mode is not None:
            self.mode.close(self.up_eof)
        ctx.observer.connection_close(
            self.obs, ConnectionEnd(self.read_bytes, self.write_bytes, time.monotonic(), self.error)
        )
        if not self.shed:
            ctx.picker.release(meta.destination)
        if self.slow:
            self.slow = False
            ctx.admission.unmark_slow(meta.source[0])
        ctx.admission.release(meta.source[0])
        self.load.conns.discard(self)
        ctx.forget(self)
        self.detach()
        self.connect_task = None
        self.pending = []
        self.up_pending = []


def _uncounted(outcome: str) -> None:
    """A context's splice decisions when nobody counts them (tests, tools)."""


def _backed_up(transport: asyncio.Transport) -> bool:
    """More buffered for writing than the low-water mark: its peer's reading stays paused."""
    return transport.get_write_buffer_size() > transport.get_write_buffer_limits()[0]


class _Released(asyncio.Protocol):
    """What a transport whose socket a Splice took over calls: nothing of the connection."""

    __slots__ = ()


class _Upstream(asyncio.Protocol):
    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.conn.upstream_made(transport)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        conn.upstream_data(data)
        load = conn.load
        load.work += 1 + (len(data) >> BYTES_PER_WORK_SHIFT)
        if load.work > load.budget:
            conn.over_budget(load)

    def eof_received(self) -> bool:
        return self.conn.upstream_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.upstream_lost(exc)

    def pause_writing(self) -> None:
        client = self.conn.client
        if client is not None and not self.conn.client_lost:
            client.pause_reading()

    def resume_writing(self) -> None:
        client = self.conn.client
        conn = self.conn
        if client is not None and not conn.client_lost and not conn.paused_for_connect and not conn.frozen \
                and not conn.throttled:
            client.resume_reading()


__all__ = ["HTTP1", "HTTP2", "Connection", "Mode", "WorkerContext"]
