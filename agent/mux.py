"""The multiplexed mTLS tunnel (issue 13, item 2): many proxied connections on one TLS session.

A *carrier* is one TLS 1.3 session between two agents, per (source pod, destination pod), made
exactly as agent/tunnel.py makes a per-connection tunnel (from the source pod's address to
`B_IP:15008`, the source pod's workload certificate, the client's SPIFFE ID checked against the
pod owning the source address) but negotiated with ALPN `nodemesh-mux/1`. Inside it, each proxied
connection is a *stream*: frames of an 8-byte header (stream id u32, type u8, flags u8 = 0,
payload length u16) and a payload of at most 65,535 bytes.

  OPEN    (source → destination) a new stream; payload: the target port (u16), then the source
          pod's own port of the connection (u16; 0: unknown), so the destination counts and taps
          the stream as from the pod's real port, not the carrier's. Data may follow at once (no
          round trip); the target address is the carrier's destination pod.
  DATA    bytes of one direction of one stream.
  FIN     the end of one direction (half-close); the other keeps flowing.
  RST     the stream is reset (either side); the other streams are untouched.
  WINDOW  payload: u32, more credit for the stream's receiver → sender direction.
  GOAWAY  (destination → source, stream 0) take no new streams here: this side's certificate was
          renewed or its agent drains; the streams in flight finish.

Flow control is per stream and per direction, as yamux and HTTP/2 do: a sender may have at most
`WINDOW` (256 KiB) unacknowledged bytes of a stream in flight; the receiver gives credit back
(WINDOW frames, every `WINDOW // 4` bytes) only for bytes it handed to the relay while the relay
reads — the relay pausing a stream's reading (its far socket's write buffer is full) stops that
stream's credit, so one slow reader stalls only its own stream, never the carrier. The other way
round, bytes written beyond a stream's credit wait in the stream (its "write buffer"), and past
`STREAM_HIGH` the relay is told `pause_writing` (it stops reading that stream's source socket);
the carrier's own TCP transport backing up pauses every stream's writers.

A peer breaking the protocol (unknown type, flags, bad lengths, DATA beyond the window or after
FIN, a frame for a stream never opened) loses the carrier: every stream on it is reset, counted
`carrier_closed{reason=protocol_error}`; nothing is trusted past the first bad frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import ssl
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nodemesh.agent.relay import Connection
    from nodemesh.agent.tunnel import Plan, TlsSession, Tunnel

log = logging.getLogger("nodemesh.agent.mux")

MUX_ALPN = "nodemesh-mux/1"
HEAD = struct.Struct("!IBBH")    # stream id, type, flags, payload length
OPEN, DATA, FIN, RST, WINDOW, GOAWAY = 1, 2, 3, 4, 5, 6
MAX_PAYLOAD = 0xFFFF
WINDOW_SIZE = 256 * 1024         # per stream and direction
MAX_CREDIT = (1 << 31) - 1
STREAM_HIGH = 64 * 1024          # a stream's bytes waiting for credit before its writer is paused
STREAM_LOW = 16 * 1024
MAX_STREAMS = 128                # concurrent streams per carrier; more: another carrier (pool)
# What a destination holds per carrier before refusing OPENs (RST, counted): more than the source
# opens, since a stream the source has finished (its FIN out) may still be live here a moment.
SERVER_MAX_STREAMS = 4 * MAX_STREAMS
IDLE_S = 30.0                    # a source's carrier with no stream closes after this
SERVER_IDLE_S = 600.0            # the destination reaps a carrier left idle this long (its source gone quiet)
MAX_STREAM_ID = 0xFFFFFFFF
_U16 = struct.Struct("!H")
_PORTS = struct.Struct("!HH")    # OPEN: target port, source port
_U32 = struct.Struct("!I")


class MuxError(Exception):
    """The peer broke the framing: the carrier is closed."""


class _NoSocket:
    """What a stream answers for "socket": the relay's socket options (TCP_NODELAY, SO_LINGER 0
    before an abort) concern the carrier, shared by every stream, so they are not applied; a
    stream's abort is its RST."""

    def setsockopt(self, *args: Any) -> None:
        pass

    def fileno(self) -> int:
        raise OSError(errno.ENOTSOCK, "a multiplexed stream has no socket of its own")


_NO_SOCKET = _NoSocket()


class Stream(asyncio.Transport):
    """One proxied connection on a carrier, as the relay sees a transport."""

    def __init__(self, carrier: Carrier, sid: int, protocol: asyncio.Protocol, sockname: tuple[str, int],
                 peername: tuple[str, int] | None = None) -> None:
        super().__init__()
        self.carrier, self.id, self.protocol, self.sockname = carrier, sid, protocol, sockname
        self.peername = peername       # the source pod's (address, port) of this stream, when known
        self.credit = WINDOW_SIZE      # what we may still send
        self.window = WINDOW_SIZE      # what the peer may still send us
        self.out = bytearray()         # written beyond the credit
        self.inbox: list[bytes] = []   # arrived while reading was paused
        self.unacked = 0               # handed to the protocol, credit not yet given back
        self.reading = True
        self.fin_queued = self.fin_sent = self.got_fin = self.eof_delivered = False
        self.closing = False
        self.done = False
        self.writing_paused = False

    # ---------------------------------------------------------------- what the relay calls
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self.done or self.fin_queued:
            return
        if self.out or self.credit <= 0:
            self.out += data
        else:
            n = min(self.credit, len(data))
            self.credit -= n
            self.carrier.send_data(self.id, bytes(data[:n]) if n < len(data) else bytes(data))
            if n < len(data):
                self.out += data[n:]
        self.update_writing()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if not self.done and not self.fin_queued:
            self.fin_queued = True
            self.flush()

    def close(self) -> None:
        if self.done or self.closing:
            return
        self.closing = True
        self.fin_queued = True
        self.inbox.clear()
        self.flush()

    def abort(self) -> None:
        if self.done:
            return
        self.carrier.send_frame(RST, self.id)
        self.finish(None)

    def is_closing(self) -> bool:
        return self.done or self.closing

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        if self.reading or self.done:
            return
        self.reading = True
        while self.inbox and self.reading and not self.done:
            chunk = self.inbox.pop(0)
            self.protocol.data_received(chunk)
            self.consumed(len(chunk))
        if self.reading and not self.done:
            if self.unacked:
                self.give_credit()
            if self.got_fin and not self.inbox and not self.eof_delivered:
                self.deliver_eof()

    def is_reading(self) -> bool:
        return self.reading and not self.done

    def get_write_buffer_size(self) -> int:
        return len(self.out)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return STREAM_LOW, STREAM_HIGH

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # the stream's limits are the window's; the carrier's transport keeps its own

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return _NO_SOCKET
        if name == "sockname":
            return self.sockname   # the target the stream was opened to, as a captured accept's local address
        if name == "peername" and self.peername is not None:
            return self.peername   # the carrier's source address, the connection's own port
        if name == "ssl_object":
            return self.carrier.tls.obj
        if name == "peercert":
            return self.carrier.tls.obj.getpeercert()
        raw = self.carrier.raw
        return raw.get_extra_info(name, default) if raw is not None else default

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol  # type: ignore[assignment]

    # ---------------------------------------------------------------- the carrier's side
    def flush(self) -> None:
        """Send what the credit allows, then the FIN once nothing is left."""
        if self.done:
            return
        if self.out and self.credit > 0:
            n = min(self.credit, len(self.out))
            self.credit -= n
            self.carrier.send_data(self.id, bytes(self.out[:n]))
            del self.out[:n]
        if not self.out and self.fin_queued and not self.fin_sent:
            self.fin_sent = True
            self.carrier.send_frame(FIN, self.id)
        if self.closing and self.fin_sent:
            self.finish(None)
            return
        self.update_writing()

    def update_writing(self) -> None:
        """Tell the writer to pause past STREAM_HIGH waiting (or while the carrier backs up), and
        to resume at STREAM_LOW."""
        if self.done:
            return
        if self.writing_paused:
            if not self.carrier.write_paused and len(self.out) <= STREAM_LOW:
                self.writing_paused = False
                self.protocol.resume_writing()
        elif self.carrier.write_paused or len(self.out) > STREAM_HIGH:
            self.writing_paused = True
            self.protocol.pause_writing()

    def credited(self, increment: int) -> None:
        self.credit += increment
        if self.credit > MAX_CREDIT:
            raise MuxError("stream credit overflow")
        self.flush()

    def received(self, payload: bytes) -> None:
        if self.got_fin:
            raise MuxError("DATA after FIN")
        if len(payload) > self.window:
            raise MuxError(f"DATA beyond the stream's window ({len(payload)} > {self.window})")
        self.window -= len(payload)
        if self.closing:
            self.consumed(len(payload))   # we closed: dropped, but the peer's credit comes back
        elif self.reading and not self.inbox:
            self.protocol.data_received(payload)
            self.consumed(len(payload))
        else:
            self.inbox.append(payload)

    def consumed(self, n: int) -> None:
        self.unacked += n
        if self.unacked >= WINDOW_SIZE // 4 and (self.reading or self.closing):
            self.give_credit()

    def give_credit(self) -> None:
        if self.done or self.got_fin or not self.unacked:
            return
        self.window += self.unacked
        self.carrier.send_frame(WINDOW, self.id, _U32.pack(self.unacked))
        self.unacked = 0

    def fin_received(self) -> None:
        if self.got_fin:
            raise MuxError("a second FIN")
        self.got_fin = True
        if self.closing:
            return
        if self.reading and not self.inbox:
            self.deliver_eof()

    def deliver_eof(self) -> None:
        self.eof_delivered = True
        if not self.protocol.eof_received():
            self.close()

    def finish(self, exc: Exception | None) -> None:
        """The stream is over (closed and flushed, aborted, reset, or its carrier lost)."""
        if self.done:
            return
        self.done = True
        self.out.clear()
        self.inbox.clear()
        self.carrier.forget(self)
        asyncio.get_running_loop().call_soon(self.protocol.connection_lost, exc)


class Carrier(asyncio.Protocol):
    """One TLS session carrying streams; the raw TCP transport's protocol. The source side
    (`client=True`) opens streams; the destination side accepts them (`on_open`)."""

    def __init__(self, tunnel: Tunnel, tls: TlsSession, client: bool, context: ssl.SSLContext) -> None:
        self.tunnel, self.tls, self.client, self.context = tunnel, tls, client, context
        self.raw: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.buf = bytearray()
        self.highest = 0            # the highest stream id opened so far
        self.write_paused = False
        self.closed = False
        self.draining = False       # no new streams: the carrier closes after its last one
        self.idle_timer: asyncio.TimerHandle | None = None
        self.peer_id = ""           # the far side's verified SPIFFE ID
        self.on_closed: Callable[[Carrier], None] | None = None
        self.pending = 0            # openers waiting on this carrier (source side, counted against MAX_STREAMS)

    # ---------------------------------------------------------------- sending
    def _write(self, plain: bytes) -> None:
        raw = self.raw
        if raw is None or self.closed or raw.is_closing():
            return
        try:
            raw.write(self.tls.send(plain))
        except ssl.SSLError as exc:
            self.lose("tls_error", exc)

    def send_frame(self, kind: int, sid: int, payload: bytes = b"") -> None:
        self._write(HEAD.pack(sid, kind, 0, len(payload)) + payload)

    def send_data(self, sid: int, data: bytes) -> None:
        if len(data) <= MAX_PAYLOAD:
            self._write(HEAD.pack(sid, DATA, 0, len(data)) + data)
            return
        view = memoryview(data)
        self._write(b"".join(HEAD.pack(sid, DATA, 0, len(view[i:i + MAX_PAYLOAD])) + view[i:i + MAX_PAYLOAD]
                             for i in range(0, len(data), MAX_PAYLOAD)))

    # ---------------------------------------------------------------- streams
    @property
    def usable(self) -> bool:
        return not self.closed and not self.draining and len(self.streams) + self.pending < MAX_STREAMS \
            and self.highest < MAX_STREAM_ID

    def open_stream(self, port: int, protocol: asyncio.Protocol, target: tuple[str, int],
                    source_port: int = 0) -> Stream:
        """Source side: a new stream to `port` on the destination pod, for the source pod's
        connection from `source_port`; the protocol is told connection_made before this returns."""
        self.highest += 1
        stream = Stream(self, self.highest, protocol, target)
        self.streams[stream.id] = stream
        self._cancel_idle()
        self.send_frame(OPEN, stream.id, _PORTS.pack(port, source_port))
        protocol.connection_made(stream)
        if self.write_paused:
            stream.update_writing()
        return stream

    def forget(self, stream: Stream) -> None:
        if self.streams.pop(stream.id, None) is not None and not self.streams and not self.closed:
            if self.draining:
                self.close("drained")
            else:
                self._arm_idle()

    def _arm_idle(self) -> None:
        self._cancel_idle()
        self.idle_timer = asyncio.get_running_loop().call_later(IDLE_S if self.client else SERVER_IDLE_S,
                                                                self._idle)

    def _cancel_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _idle(self) -> None:
        self.idle_timer = None
        if not self.streams and not self.pending:
            self.close("idle")

    def drain(self) -> None:
        """Take no new streams; close once the last one ends."""
        if self.draining or self.closed:
            return
        log.info("event=carrier_draining peer=%s streams=%d pending=%d", self.peer_id or "?", len(self.streams),
                 self.pending)
        self.draining = True
        if not self.streams and not self.pending:
            self.close("drained")

    # ---------------------------------------------------------------- receiving
    def frames(self, plain: bytes) -> None:
        buf = self.buf
        buf += plain
        at, n = 0, len(buf)
        while n - at >= HEAD.size and not self.closed:
            sid, kind, flags, length = HEAD.unpack_from(buf, at)
            end = at + HEAD.size + length
            if end > n:
                break
            payload = bytes(buf[at + HEAD.size:end])
            at = end
            try:
                self.frame(sid, kind, flags, payload)
            except MuxError as exc:
                self.protocol_error(str(exc))
                return
        del buf[:at]

    def frame(self, sid: int, kind: int, flags: int, payload: bytes) -> None:
        if flags:
            raise MuxError(f"flags {flags:#x} on a frame of type {kind}")
        if kind == DATA:
            stream = self._stream(sid)
            if stream is not None:
                stream.received(payload)
            elif payload:
                self.send_frame(RST, sid)   # the stream is gone here (closed or aborted): stop it there
        elif kind == WINDOW:
            if len(payload) != 4 or not (increment := _U32.unpack(payload)[0]):
                raise MuxError("bad WINDOW frame")
            stream = self._stream(sid)
            if stream is not None:
                stream.credited(increment)
        elif kind == FIN:
            if payload:
                raise MuxError("FIN with a payload")
            stream = self._stream(sid)
            if stream is not None:
                stream.fin_received()
        elif kind == RST:
            if payload:
                raise MuxError("RST with a payload")
            stream = self._stream(sid)
            if stream is not None:
                stream.finish(ConnectionResetError(errno.ECONNRESET, "stream reset by the far agent"))
        elif kind == OPEN:
            if self.client:
                raise MuxError("OPEN from the destination side")
            if len(payload) not in (2, 4) or sid <= self.highest:
                raise MuxError(f"bad OPEN of stream {sid} (last opened {self.highest})")
            self.highest = sid
            port, source_port = _PORTS.unpack(payload) if len(payload) == 4 else (_U16.unpack(payload)[0], 0)
            self.on_open(sid, port, source_port)
        elif kind == GOAWAY:
            if not self.client or sid or payload:
                raise MuxError("bad GOAWAY")
            self.drain()
        else:
            raise MuxError(f"unknown frame type {kind}")

    def _stream(self, sid: int) -> Stream | None:
        stream = self.streams.get(sid)
        if stream is None and (sid == 0 or sid > self.highest):
            raise MuxError(f"frame for stream {sid}, never opened")
        return stream

    def on_open(self, sid: int, port: int, source_port: int = 0) -> None:
        raise MuxError("OPEN on a source-side carrier")

    # ---------------------------------------------------------------- the TLS transport
    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            plain, closed = self.tls.receive(data)
        except ssl.SSLError as exc:
            self.lose("tls_error", exc)
            return
        out = self.tls.output()
        if out and self.raw is not None:
            self.raw.write(out)
        self.received(plain, closed)

    def received(self, plain: bytes, closed: bool) -> None:
        if plain:
            self.frames(plain)
        if closed and not self.closed:
            # The far agent ended the session (close_notify): streams still on it are lost.
            self.close("peer_closed")

    def eof_received(self) -> bool | None:
        self.lose("lost", ConnectionResetError(errno.ECONNRESET, "carrier ended without close_notify"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.lose("lost", exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in list(self.streams.values()):
            stream.update_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            stream.update_writing()

    # ---------------------------------------------------------------- the end
    def protocol_error(self, detail: str) -> None:
        log.warning("event=mux_protocol_error peer=%s detail=%r", self.peer_id or "?", detail[:160])
        self.lose("protocol_error", ConnectionResetError(errno.ECONNRESET, f"tunnel protocol error: {detail}"))

    def close(self, reason: str) -> None:
        """End the carrier in order (close_notify, FIN); streams still on it (normally none) are reset."""
        if self.closed:
            return
        raw = self.raw
        if raw is not None and not raw.is_closing():
            with contextlib.suppress(ssl.SSLError, ValueError):
                raw.write(self.tls.shut())
        self._end(reason, ConnectionResetError(errno.ECONNRESET, f"tunnel carrier closed ({reason})"))
        if raw is not None:
            raw.close()

    def lose(self, reason: str, exc: Exception | None) -> None:
        """The carrier is gone (reset, TLS error, protocol error): every stream is reset."""
        if self.closed:
            return
        self._end(reason, exc if exc is not None else ConnectionResetError(errno.ECONNRESET, "tunnel carrier lost"))
        if self.raw is not None:
            self.raw.abort()

    def _end(self, reason: str, exc: Exception) -> None:
        self.closed = True
        self._cancel_idle()
        self.tunnel.stats.note("carrier_closed", reason)
        for stream in list(self.streams.values()):
            stream.finish(exc)
        self.streams.clear()
        self.buf.clear()
        if self.on_closed is not None:
            self.on_closed(self)


class ClientCarrier(Carrier):
    """The source agent's end: dials, handshakes (offering MUX_ALPN), checks the server's
    certificate against the plan; `ready` resolves once streams may be opened (or fails). `mux`
    False after the handshake: the far agent did not choose MUX_ALPN (an agent that speaks only
    the per-connection protocol)."""

    def __init__(self, tunnel: Tunnel, plan: Plan) -> None:
        from nodemesh.agent.tunnel import TUNNEL_SNI, TlsSession

        super().__init__(tunnel, TlsSession(plan.context, server_side=False, server_hostname=TUNNEL_SNI,
                                            session=plan.session), True, plan.context)
        self.plan = plan
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ready.add_done_callback(_consume)
        self.mux = False
        self.refused = ""           # the server was not who it must be: never fall back for it
        self.ticket_kept = False

    async def dial(self, source_ip: str | None, destination_ip: str, port: int, timeout_s: float) -> None:
        from nodemesh.agent.sockets import upstream_socket
        from nodemesh.agent.tunnel import HANDSHAKE_TIMEOUT_S

        loop = asyncio.get_running_loop()
        sock, _transparent = upstream_socket(source_ip, 0)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (destination_ip, port)), timeout_s)
            await loop.create_connection(lambda: self, sock=sock)
            sock.detach()  # the transport owns the fd now (relay.py _connect)
            await asyncio.wait_for(asyncio.shield(self.ready), min(timeout_s, HANDSHAKE_TIMEOUT_S))
        except (OSError, TimeoutError) as exc:
            self._failed(exc)
            if self.raw is None:
                sock.close()
        except asyncio.CancelledError:
            self._failed(ConnectionResetError(errno.ECONNRESET, "agent stopping"))
            if self.raw is None:
                sock.close()
            raise

    def _failed(self, exc: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
        if not self.closed:
            self.closed = True
            self._cancel_idle()
            if self.on_closed is not None:
                self.on_closed(self)
        if self.raw is not None:
            self.raw.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport  # type: ignore[assignment]
        if self.closed:   # retired while it was dialling
            self.raw.abort()  # type: ignore[union-attr]
            return
        self.raw.write(self.tls.start())  # type: ignore[union-attr]

    def _end(self, reason: str, exc: Exception) -> None:
        super()._end(reason, exc)
        if not self.ready.done():   # retired (drain, stop) before its handshake finished
            self.ready.set_exception(exc)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.ready.done():
            super().data_received(data)
            self._keep_ticket()
            return
        try:
            plain, closed = self.tls.receive(data)
        except ssl.SSLError as exc:
            self._failed(exc)
            return
        out = self.tls.output()
        if out and self.raw is not None:
            self.raw.write(out)
        if not self.tls.handshaken:
            return
        try:
            self.peer_id = self.tunnel.check_server(self.tls.obj, self.plan, count=False)
        except ssl.SSLError as exc:
            self.refused = str(exc)
            self.tunnel.stats.count(self.tunnel.stats.fallback, "server_identity")
            self._failed(exc)
            return
        if self.tls.obj.session_reused:
            self.tunnel.stats.add("resumed")
        self.mux = self.tls.obj.selected_alpn_protocol() == MUX_ALPN
        if not self.mux:
            # The far agent speaks only the per-connection protocol: this session carries nothing.
            self.ready.set_result(None)
            self.close("no_mux")
            return
        self.tunnel.stats.note("carrier_opened")
        self.ready.set_result(None)
        self._arm_idle()
        self.received(plain, closed)

    def _keep_ticket(self) -> None:
        if not self.ticket_kept and not self.closed:
            session = self.tls.obj.session
            if session is not None and session.has_ticket:
                self.ticket_kept = True
                self.tunnel.keep_session(self.plan, session)

    def eof_received(self) -> bool | None:
        if not self.ready.done():
            self._failed(ConnectionResetError(errno.ECONNRESET, "tunnel closed during its handshake"))
            return False
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self._failed(exc or ConnectionResetError(errno.ECONNRESET, "tunnel closed during its handshake"))
            return
        super().connection_lost(exc)


class ServerCarrier(Carrier):
    """The destination agent's end, handed the raw transport once the TLS handshake chose
    MUX_ALPN and the client's identity was verified (agent/tunnel.py's `_TlsServerShim`). Each
    OPEN becomes an inbound Connection of `make_connection`, to `target_ip:port`."""

    def __init__(self, tunnel: Tunnel, raw: asyncio.Transport, tls: TlsSession, context: ssl.SSLContext,
                 client_id: str, target_ip: str, pod_uid: str, make_connection: Callable[[], Connection]) -> None:
        super().__init__(tunnel, tls, False, context)
        self.raw = raw
        self.peer_id = client_id
        self.target_ip, self.pod_uid = target_ip, pod_uid
        self.make_connection = make_connection
        self.goaway_sent = False
        self._arm_idle()

    def on_open(self, sid: int, port: int, source_port: int = 0) -> None:
        stats = self.tunnel.stats
        if len(self.streams) >= SERVER_MAX_STREAMS:
            stats.count(stats.refused, "too_many_streams")
            self.send_frame(RST, sid)
            return
        stats.add("terminated")
        conn = self.make_connection()
        conn.forced_original = (self.target_ip, port)
        conn.mtls = self.peer_id
        peer = self.raw.get_extra_info("peername") if source_port and self.raw is not None else None
        stream = Stream(self, sid, conn, (self.target_ip, port), (peer[0], source_port) if peer else None)
        self.streams[sid] = stream
        self._cancel_idle()
        conn.connection_made(stream)
        if self.write_paused:
            stream.update_writing()
        if not self.goaway_sent and (conn.ctx.draining or
                                     self.tunnel.certs.context(self.pod_uid, server=True) is not self.context):
            # Our certificate was renewed (or this agent drains): the source opens its next streams
            # on a new carrier; this one finishes what it carries.
            self.goaway_sent = True
            log.info("event=carrier_goaway peer=%s reason=%s", self.peer_id,
                     "draining" if conn.ctx.draining else "certificate_renewed")
            self.send_frame(GOAWAY, 0)


def _consume(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
