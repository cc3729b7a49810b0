"""Live connections handed from a draining agent to the newer one beside it (a rolling update).

Draining alone ends a connection at its next safe point, and an opaque TCP stream has none: it
was cut when the grace ran out (issue 12: a TCP echo, downloads, gRPC streams, all cut ~30 s
after the upgrade began). Here the old worker instead gives the connection's two sockets — the
client's and the upstream's — to a worker of the new agent, over an abstract unix socket
(SCM_RIGHTS), with what the new process needs to carry on (`ConnectionMeta`: who, where to,
which endpoint, which protocol, when it started). The kernel sockets do not change: no byte is
lost or replayed, the peers see nothing, and an IP_TRANSPARENT upstream keeps its options, its
conntrack entry (and zone) and so its return path.

When a connection can move (`movable`): its bytes are all somewhere the new process will find
them. The worker stops reading both sides (the unread bytes wait in the kernel, and go with the
sockets) and waits until our user-space write buffers are empty (bytes the kernel already took
go with the sockets too); then it sends. Which connections:

- opaque TCP / TLS (and an HTTP/1 connection upgraded to something else, a WebSocket): always;
- HTTP/1: between requests — the last response ended, no request begun (the HTTP/1 mode calls
  `WorkerContext.at_boundary` at that moment, so even a busy keep-alive connection is caught);
  the new agent's HTTP/1 mode starts fresh there, as a new connection's would;
- HTTP/2 and gRPC: not moved (see docs/agent.md, "Upgrades"); they drain with GOAWAY as before.

What does not move in time keeps the drain's behaviour. No newer agent (a plain restart, an
uninstall): nothing changes. Metrics continue: the old agent counts the bytes so far and takes
the connection out of its open ones without a close (`ConnectionEnd.handed_over`); the new one
adds it to its open ones without a new open (`ConnectionMeta.adopted`) and counts its close.

Rendezvous: each worker of a ready agent listens on `@nodemesh/handover/<agent pid>.<index>.v1`
(SOCK_SEQPACKET: one message, one connection, its fds attached to it); a draining worker picks a
listener of another agent (presence.py reads /proc/net/unix), the same index if there is one. The
`.v1` suffix is the wire version: a draining agent never hands to a listener it cannot speak to.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
import struct
import time
from typing import Any

from nodemesh.agent.http1_relay import Http1Mode
from nodemesh.agent.http2 import H2Classifier
from nodemesh.agent.http2_relay import Http2Mode
from nodemesh.agent.observe import ConnectionEnd, ConnectionMeta, RequestHead
from nodemesh.agent.relay import Connection, WorkerContext, _Upstream
from nodemesh.agent.tcp import TcpMode
from nodemesh.redirector import presence

log = logging.getLogger("nodemesh.agent.handover")

KIND = "handover"
VERSION = "v1"
FREEZE_MAX_S = 2.0      # a connection whose write buffers do not empty in this long is not moved now...
RETRY_AFTER_S = 1.0     # ...but tried again this much later (a slow reader catches up)
SEND_TIMEOUT_S = 2.0    # a successor that takes no message for this long is given up on
# Connections frozen at once. Each waits, not relaying, until it is sent; sending (and adopting, on
# the other side) costs about a millisecond of CPU per connection on a busy node, so thousands
# frozen together would each wait seconds. In batches each waits about a batch's worth.
FREEZE_BATCH = 64
RECEIVE_BACKLOG = 1024  # messages a successor may hold unread before our send blocks
SUCCESSOR_WAIT_S = 2.0  # another agent runs but its workers do not listen for hand-overs yet: wait
MAX_MESSAGE = 64 * 1024  # one connection's state; fits a unix socket's default send buffer (208 KB)
TCP, HTTP1, HTTP2 = "tcp", "http1", "http2"
# A connection whose client has said nothing yet (relay.py waits for its first bytes to detect):
# it moves as it is, and the new agent detects (and counts) it when the client speaks.
UNDETECTED = "undetected"


def listener_name(agent_id: int, index: int) -> str:
    return f"{presence.PREFIX}{KIND}/{agent_id}.{index}.{VERSION}"


def successors(agent_id: int) -> list[str]:
    """Hand-over listeners of other agents on this node (ours excluded), by name."""
    own = f"{presence.PREFIX}{KIND}/{agent_id}."
    return [n for n in presence.present(KIND) if n.endswith("." + VERSION) and not n.startswith(own)]


def other_agent_present(agent_id: int) -> bool:
    """Another agent announces itself on this node (presence.py): a successor may be starting."""
    return any(n != presence.address(presence.AGENT, agent_id) for n in presence.present(presence.AGENT))


async def find_successor(agent_id: int, index: int, wait_s: float = SUCCESSOR_WAIT_S) -> Successor | None:
    """A newer agent's worker to hand our connections to; None (drain as before) when no other
    agent runs — a restart, an uninstall — or when none of its workers listens within `wait_s`
    (an agent that does not hand over, or one still starting while we were told to stop)."""
    deadline = time.monotonic() + wait_s
    while True:
        successor = Successor.find(agent_id, index)
        if successor is not None or time.monotonic() >= deadline or not other_agent_present(agent_id):
            return successor
        await asyncio.sleep(0.1)


def movable(conn: Connection, frozen: bool = False) -> str | None:
    """The mode the connection moves in (TCP, HTTP1, HTTP2), or None if it cannot move now.
    `frozen`: it is ours already (checked again just before it is sent)."""
    mode = conn.mode
    if conn.mtls is not None:
        return None  # the TLS session's state lives in this process (agent/tunnel.py): it drains here
    if mode is None and not conn.opened and conn.meta is not None and not conn.finished \
            and conn.frozen == frozen and conn.detect_timer is None:
        if conn.client is None or conn.up is None or conn.client_lost or conn.up_lost:
            return None
        if conn.client_eof or conn.up_eof or conn.shed or conn.lingering:
            return None
        if conn.pending or conn.up_pending or conn.paused_for_connect or conn.connect_task is not None:
            return None
        return UNDETECTED
    if mode is None or conn.finished or conn.frozen != frozen or not conn.opened or conn.meta is None:
        return None
    if conn.splice is not None:   # opaque TCP moved by the kernel (agent/splice.py)
        return TCP if conn.splice.movable() and not conn.client_lost and not conn.up_lost else None
    if conn.client is None or conn.up is None or conn.client_lost or conn.up_lost:
        return None
    # Half-closed, answering for itself, or bytes still held here: not a state the new side rebuilds.
    if conn.client_eof or conn.up_eof or conn.client_shut or conn.lingering or conn.shed:
        return None
    if conn.pending or conn.up_pending or conn.paused_for_connect or conn.connect_task is not None:
        return None
    if isinstance(mode, TcpMode):
        return TCP
    if isinstance(mode, Http1Mode):
        if mode.opaque:
            return TCP           # upgraded (WebSocket) or no longer HTTP/1: bytes only from here
        if mode.client_opaque or mode.hold or mode.error_status or not mode.exchange.idle:
            return None
        return HTTP1
    if isinstance(mode, Http2Mode):
        # Any moment will do: the classifier's state travels (H2Classifier.snapshot), frames in flight
        # included. Not once our own GOAWAY went out (draining: the client is leaving anyway).
        if mode.relay.failed or mode.drain_state or mode.inject:
            return None
        return HTTP2
    return None


def encode(conn: Connection, kind: str) -> bytes:
    meta = dataclasses.asdict(conn.meta)  # type: ignore[arg-type]
    meta.pop("adopted", None)
    state: dict[str, Any] = {"mode": kind, "meta": meta}
    if kind == HTTP1:
        state["ordinal"] = conn.mode.exchange.ordinal  # type: ignore[union-attr]
    elif kind == HTTP2:
        state["h2"] = conn.mode.relay.snapshot()  # type: ignore[union-attr]
    return json.dumps(state, separators=(",", ":")).encode()


def decode(data: bytes) -> tuple[str, ConnectionMeta, dict[str, Any]]:
    """(mode, meta, the rest) of one message; ValueError if it is not one we understand."""
    try:
        state = json.loads(data)
        kind = state["mode"]
        raw = dict(state["meta"])
        for key in ("source", "original_destination", "destination", "endpoint"):
            if raw.get(key) is not None:
                host, port = raw[key]
                raw[key] = (str(host), int(port))
        meta = ConnectionMeta(**raw)
        # The types the relay and telemetry compute with (a peer of our uid sent it, but still).
        meta.conn_id = int(meta.conn_id)
        meta.started, meta.first_bytes_at = float(meta.started), float(meta.first_bytes_at)
        if not isinstance(meta.protocol, str) or not isinstance(meta.sni, str | None):
            raise TypeError("protocol/sni")
        if kind == HTTP1:
            state["ordinal"] = int(state.get("ordinal", 0))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"bad hand-over message: {exc!r}") from None
    if kind not in (TCP, HTTP1, HTTP2, UNDETECTED) or meta.direction not in ("outbound", "inbound"):
        raise ValueError(f"bad hand-over message: mode={kind!r} direction={meta.direction!r}")
    if kind == HTTP2:
        try:
            state["relay"] = H2Classifier.restored(state["h2"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"bad hand-over message: HTTP/2 state: {exc!r}") from None
    return kind, meta, state


# -- the draining side -----------------------------------------------------------------------------


class Successor:
    """Our link to a newer agent's worker: one SEQPACKET connection, one message per connection."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self.broken = False

    @classmethod
    def find(cls, agent_id: int, index: int) -> Successor | None:
        names = successors(agent_id)
        if not names:
            return None
        same = [n for n in names if n.split("/")[-1].split(".")[1] == str(index)]
        for name in same + [n for n in names if n not in same]:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                sock.settimeout(SEND_TIMEOUT_S)
                sock.connect("\0" + name)
            except OSError:
                sock.close()
                continue
            return cls(sock, name)
        return None

    def send(self, conn: Connection, kind: str) -> bool:
        """True once the successor has the connection; False if not (it stays ours)."""
        message = encode(conn, kind)
        if len(message) > MAX_MESSAGE:
            return False  # an HTTP/2 header block of a megabyte mid-flight: drained instead
        fds = conn.splice.fds() if conn.splice is not None else [
            conn.client.get_extra_info("socket").fileno(),  # type: ignore[union-attr]
            conn.up.get_extra_info("socket").fileno()]       # type: ignore[union-attr]
        try:
            socket.send_fds(self.sock, [message], fds)
        except OSError as exc:
            log.warning("event=handover_send_failed successor=@%s error=%r", self.name, exc)
            self.broken = True
            return False
        return True

    def close(self) -> None:
        self.sock.close()


def _flushed(conn: Connection) -> bool:
    """Nothing of a frozen connection is held here any more: its write buffers (or pipes) are empty."""
    if conn.splice is not None:
        return conn.splice.buffered() == 0
    return conn.client.get_write_buffer_size() == 0 and conn.up.get_write_buffer_size() == 0  # type: ignore[union-attr]


class _Gone(asyncio.Protocol):
    """What our transports of a handed-over connection report to: nothing, it lives elsewhere."""

    def data_received(self, data: bytes) -> None:
        pass


class Handover:
    """A draining worker's hand-over of its connections to a `Successor` (driven by drain.py)."""

    def __init__(self, successor: Successor, contexts: list[WorkerContext]) -> None:
        self.successor = successor
        self.contexts = contexts
        self.freezing: dict[Connection, tuple[str, float]] = {}
        self.retry_at: dict[Connection, float] = {}
        self.handed = {TCP: 0, HTTP1: 0, HTTP2: 0, UNDETECTED: 0}
        self.not_moved: list[Connection] = []   # sent nothing for them: drain.py drains them
        self.given_up = 0
        self.started = time.monotonic()
        self.last_at = 0.0
        self.freeze_max_s = 0.0

    def begin(self) -> None:
        for ctx in self.contexts:
            ctx.at_boundary = self.offer
        self.sweep()

    @property
    def broken(self) -> bool:
        return self.successor.broken

    def offer(self, conn: Connection) -> None:
        """Freeze `conn` for a hand-over if it can move now (sent once its buffers are empty)."""
        if self.successor.broken or conn in self.freezing or len(self.freezing) >= FREEZE_BATCH:
            return
        kind = movable(conn)
        if kind is None:
            return
        retry = self.retry_at.get(conn)
        if retry is not None and time.monotonic() < retry:
            return
        conn.frozen = True
        if conn.splice is not None:
            conn.splice.pause()      # the pipes still empty into the sockets
        else:
            conn.client.pause_reading()  # type: ignore[union-attr]
            conn.up.pause_reading()      # type: ignore[union-attr]
        self.freezing[conn] = (kind, time.monotonic())

    def sweep(self) -> None:
        """Offer every connection that can move, then send the frozen ones whose buffers emptied."""
        self._offer_all()
        now = time.monotonic()
        for conn, (kind, since) in list(self.freezing.items()):
            if conn.finished or conn.client_lost or conn.up_lost \
                    or (conn.splice is None and (conn.client is None or conn.up is None)):
                del self.freezing[conn]  # it ended meanwhile, on its own
                continue
            if _flushed(conn) and not self.successor.broken:
                del self.freezing[conn]
                kind = movable(conn, frozen=True) or ""  # the drain may have written meanwhile (GOAWAY)
                if kind and self.successor.send(conn, kind):
                    self._release(conn)
                    self.handed[kind] += 1
                    self.last_at = time.monotonic()
                    self.freeze_max_s = max(self.freeze_max_s, self.last_at - since)
                else:
                    self._thaw(conn)
                    self.not_moved.append(conn)
                    self.retry_at[conn] = float("inf")
            elif self.successor.broken or now - since > FREEZE_MAX_S:
                del self.freezing[conn]
                self.given_up += 1
                self.retry_at[conn] = now + RETRY_AFTER_S
                self._thaw(conn)

        if len(self.freezing) < FREEZE_BATCH // 2:
            self._offer_all()  # the next batch freezes now, to be sent on the next sweep

    def _offer_all(self) -> None:
        if self.successor.broken:
            return
        for ctx in self.contexts:
            for conn in list(ctx.live):
                if len(self.freezing) >= FREEZE_BATCH:
                    return
                self.offer(conn)

    @staticmethod
    def _thaw(conn: Connection) -> None:
        """Not moved after all: reading resumes where flow control allows it (drain goes on)."""
        conn.frozen = False
        if conn.splice is not None:
            if not conn.throttled:
                conn.splice.resume()
            return
        client, up = conn.client, conn.up
        if client is None or up is None:
            return
        if up.get_write_buffer_size() <= up.get_write_buffer_limits()[1]:
            client.resume_reading()
        if client.get_write_buffer_size() <= client.get_write_buffer_limits()[1]:
            up.resume_reading()

    @staticmethod
    def _release(conn: Connection) -> None:
        """The sockets are the successor's now: close our references (the kernel sockets stay
        open, theirs) and forget the connection, counting it as handed over, not closed."""
        ctx, meta = conn.ctx, conn.meta
        client, up, spliced = conn.client, conn.up, conn.splice
        assert meta is not None
        if spliced is None:
            assert client is not None and up is not None
            client.set_protocol(_Gone())
            up.set_protocol(_Gone())
        conn.finished = True
        if isinstance(conn.mode, Http2Mode):
            conn.mode.relay.streams.clear()  # they go on (and end) over there, not "connection closed"
        if conn.mode is not None:
            conn.mode.close(True)  # HTTP/1, TCP: nothing in flight; only timers
        if conn.opened:  # an undetected one was never counted here: nothing to take back
            ctx.observer.connection_close(conn.obs, ConnectionEnd(
                conn.read_bytes, conn.write_bytes, time.monotonic(), None, handed_over=True))
        ctx.picker.release(meta.destination)
        if conn.slow:
            conn.slow = False
            ctx.admission.unmark_slow(meta.source[0])
        ctx.admission.release(meta.source[0])
        conn.load.conns.discard(conn)
        ctx.forget(conn)
        if spliced is not None:
            conn.splice = None
            spliced.release()   # closes our duplicates only: the successor holds the sockets
        else:
            client.abort()  # type: ignore[union-attr]  # drops our fd only: the successor holds the socket
            up.abort()      # type: ignore[union-attr]
        conn.detach()

    def defers(self, conn: Connection) -> bool:
        """Whether drain.py should hold back this connection's own drain for a while: an HTTP/2
        one would get our GOAWAY and could no longer move; an idle HTTP/1 one would be closed
        after half a second, before its turn came among thousands."""
        return isinstance(conn.mode, Http1Mode | Http2Mode) and not self.successor.broken

    def take_not_moved(self) -> list[Connection]:
        out, self.not_moved = self.not_moved, []
        return out

    def finish(self) -> dict[str, Any]:
        for ctx in self.contexts:
            ctx.at_boundary = None
        for conn in list(self.freezing):
            self._thaw(conn)
        self.freezing.clear()
        self.successor.close()
        return {"tcp": self.handed[TCP], "http1": self.handed[HTTP1], "http2": self.handed[HTTP2],
                "undetected": self.handed[UNDETECTED],
                "given_up": self.given_up,
                "ms": round((self.last_at - self.started) * 1000, 1) if self.last_at else 0.0,
                "freeze_max_ms": round(self.freeze_max_s * 1000, 1)}


# -- the receiving side ----------------------------------------------------------------------------


class Receiver:
    """A ready worker's hand-over listener: adopts what a draining agent sends."""

    def __init__(self, contexts: dict[str, WorkerContext], agent_id: int, index: int) -> None:
        self.contexts = contexts
        self.name = listener_name(agent_id, index)
        self.sock: socket.socket | None = None
        self.peers: dict[socket.socket, int] = {}
        self.adopted = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> bool:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.bind("\0" + self.name)
            sock.listen(RECEIVE_BACKLOG)
        except OSError as exc:
            sock.close()
            log.warning("event=handover_unavailable address=@%s error=%r", self.name, exc)
            return False
        sock.setblocking(False)
        self.sock = sock
        loop.add_reader(sock.fileno(), self._accept)
        return True

    def close(self) -> None:
        """Draining ourselves: no more hand-overs to us (a message already queued is still read)."""
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def _accept(self) -> None:
        assert self.sock is not None
        try:
            peer, _ = self.sock.accept()
        except OSError:
            return
        # Only a process of our own user (root, an agent) may hand us connections: any process of
        # the host network namespace can reach an abstract socket.
        uid = struct.unpack("3i", peer.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != os.geteuid():
            log.warning("event=handover_refused peer_uid=%d", uid)
            peer.close()
            return
        peer.setblocking(False)
        self.peers[peer] = 0
        asyncio.get_running_loop().add_reader(peer.fileno(), self._read, peer)

    def _read(self, peer: socket.socket) -> None:
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(peer, MAX_MESSAGE, 2)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("event=handover_read_failed error=%r", exc)
                data, fds, flags = b"", [], 0
            if not data and not fds:
                self._peer_done(peer)
                return
            self.peers[peer] += 1
            self._message(data, fds, flags)

    def _peer_done(self, peer: socket.socket) -> None:
        asyncio.get_running_loop().remove_reader(peer.fileno())
        count = self.peers.pop(peer, 0)
        peer.close()
        log.info("event=handover_received connections=%d total=%d", count, self.adopted)

    def _message(self, data: bytes, fds: list[int], flags: int) -> None:
        socks = [socket.socket(fileno=fd) for fd in fds]
        try:
            if len(socks) != 2 or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                raise ValueError(f"bad hand-over message: {len(socks)} fds, flags {flags:#x}")
            kind, meta, state = decode(data)
            ctx = self.contexts[meta.direction]
        except ValueError as exc:
            log.warning("event=handover_rejected error=%s", exc)
            for s in socks:
                s.close()  # the connection ends: better than a half-known one
            return
        task = asyncio.get_running_loop().create_task(self._adopt(ctx, kind, meta, state, socks[0], socks[1]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _adopt_streams(conn: Connection, relay: H2Classifier) -> None:
        """The classifier carries on where the old agent's stopped; its open streams are requests
        here now (counted there: `adopted`), ended and counted here."""
        mode: Http2Mode = conn.mode  # type: ignore[assignment]
        mode.relay = relay
        observer = conn.ctx.observer
        for s in relay.streams.values():
            s.obs = observer.request_start(conn.obs, RequestHead(
                s.method, s.scheme, s.authority, s.path, [], s.grpc, s.stream_id, s.started,
                adopted=True, status=s.status))

    async def _adopt(self, ctx: WorkerContext, kind: str, meta: ConnectionMeta, state: dict[str, Any],
                     client_sock: socket.socket, up_sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        meta.conn_id = ctx.next_id()
        meta.adopted = kind != UNDETECTED  # an undetected one is counted here, when it is detected
        meta.first_bytes_at = 0.0
        conn = Connection(ctx, meta.direction)
        conn.meta = meta
        ctx.admission.admit(meta.source[0])  # counted; never shed: it is open already
        conn.load = ctx.admission.fairness.load_for(meta.source[0])
        ctx.admission.fairness.opened(conn.load, conn)
        ctx.picker.acquire(meta.destination)
        ctx.live.add(conn)
        if kind != UNDETECTED:
            conn.opened = True
            conn.obs = ctx.observer.connection_open(meta)
            conn.mode = ctx.mode_factory(kind, conn)
        if kind == HTTP1 and isinstance(conn.mode, Http1Mode):
            conn.mode.exchange.ordinal = state["ordinal"]
        elif kind == HTTP2:
            self._adopt_streams(conn, state["relay"])
        client_sock.setblocking(False)
        up_sock.setblocking(False)
        try:
            # The client first: bytes it sends before the upstream transport exists wait in
            # `pending` (relay.py); the other way round, upstream bytes would have nowhere to go.
            await loop.connect_accepted_socket(lambda: conn, sock=client_sock)
            client_sock.detach()  # the transport owns the fd (relay.py _connect: never close it twice)
        except OSError as exc:
            client_sock.close()
            up_sock.close()
            conn.client_lost = True
            conn.up_lost = True
            conn.error = f"handover: {type(exc).__name__}"
            conn._maybe_finish()  # the relay's own end of a connection: counted, forgotten
            return
        try:
            await loop.create_connection(lambda: _Upstream(conn), sock=up_sock)
            up_sock.detach()
        except OSError as exc:
            up_sock.close()
            conn.upstream_lost(exc)
            return
        self.adopted += 1
        if ctx.draining:
            conn.drain()
