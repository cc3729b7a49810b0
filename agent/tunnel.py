"""Node-to-node mTLS (issue 13, item 2; opt-in: `--mtls`, needs `--cert-dir`).

A cross-node connection from a local pod A to a remote pod B leaves the source agent as TLS 1.3
to `B_IP:TUNNEL_PORT` (15008, the port ztunnel's HBONE uses), from A's own address as every
upstream does. B's node captures it inbound like any connection to a local pod, so the
destination agent receives it on :4143 with original destination port 15008 and terminates it:

* the source agent presents **A's own workload certificate** (made on A's node, agent/certs.py)
  and requires **B's**; the destination agent presents B's and requires A's. So each side learns
  the other's identity from a certificate chained to the mesh's root, not from an address.
* the destination agent checks that the client certificate's SPIFFE ID is the identity of the pod
  owning the source address (`ns/<ns>/sa/<sa>`): a pod that spoofs another's address has no
  certificate for it, and a certificate for one workload cannot speak from another's address.
  Mismatch, or no certificate: the connection is reset and counted.
* the first bytes inside a per-connection tunnel are an HTTP/1.1 `CONNECT <B_IP>:<port> HTTP/1.1`
  head (HBONE's request, without HTTP/2): the port B was dialled on (a carrier's stream opens with
  an OPEN frame instead, below). The agent does not wait for an answer
  (no extra round trip); a failed upstream on B's side closes the tunnel.
* after the head, the destination agent treats the plaintext as any inbound connection (protocol
  detection, HTTP classification, counting) and relays it to B as usual.

Why the workload's certificate rather than a node certificate plus an identity header (ztunnel's
choice too): the identity a receiver accepts is then one the CA bound to the source pod's own
node, so a compromised node can speak only as the pods it runs, and the receiver verifies
identity cryptographically per connection instead of trusting what another node asserts.

Connections are multiplexed (agent/mux.py, the default; `--no-tunnel-mux` turns it off): the
TLS session above is a *carrier* per (source pod, destination pod), negotiated with ALPN
`nodemesh-mux/1`, and each proxied connection is a *stream* on it — an OPEN frame naming the
target port instead of the CONNECT head, DATA, FIN per direction, RST, and per-stream credit
(WINDOW) so one slow reader stalls only its own stream. A new connection between two pods that
already have a carrier costs one frame instead of a TLS handshake and a TCP connection. Identity
is unchanged: the carrier's handshake is the one described above, from the source pod's address
with its certificate, verified by the receiver against the pod owning that address once per
carrier; every stream on it is that pod's, and the receiver counts and taps each stream as the
inbound connection it is, with that identity. Why per pod pair and not per node pair (as
ztunnel's HBONE pools per source identity and destination node): the certificate presented must
name the source workload — one carrier per node pair would need a node certificate plus an
asserted identity per stream, which a compromised node could forge for any pod; and per
destination *pod* keeps the inbound capture unchanged (the carrier is dialled to the pod's own
address, captured on its node like any connection to it). The carriers are:

* pooled per pair in the source worker (`Tunnel.carriers`), at most `mux.MAX_STREAMS` streams
  each — past that a second carrier is opened for the pair (no waiting);
* closed after `mux.IDLE_S` without a stream (close_notify, then FIN); the destination reaps one
  left idle `mux.SERVER_IDLE_S`;
* retired on certificate renewal: a carrier made with a context that is no longer the source
  pod's current one takes no new stream and closes after its last (`drained`); when the
  destination pod's certificate was renewed, its agent answers the next OPEN with GOAWAY (the
  stream is still served) and the source does the same. So no connection fails across a rotation;
* lost as a per-connection tunnel is: a TCP reset, a FIN without close_notify, a TLS error or a
  framing error resets every stream on it (each connection ends as today's tunnel loss ends one),
  and the pair's next connection opens a new carrier.

Compatibility: an agent without the multiplexer (or with `--no-tunnel-mux`) does not choose the
ALPN; the source then closes that session (the old agent logs it as refused `bad_head`), notes
`mux_unsupported`, and uses per-connection tunnels to that pod pair for `NO_MUX_TTL_S`. A new
agent still takes per-connection tunnels (a client offering no ALPN) exactly as before.
Per-connection tunnels, when used: a TLS 1.3 handshake per connection (ECDSA P-256, ~1 RTT before
the first byte); a source pod's next connection to the same destination pod **resumes** the
session (a TLS 1.3 ticket the far agent issued, kept here per (source pod, destination pod) for at
most SESSION_TTL_S; carriers resume from the same cache): no certificate signature or chain check
on either side, about half the handshake's CPU (measured: docs/bench.md "mTLS"). Identity holds:
a resumed session carries the certificates verified at its full handshake (the receiver checks
the client's SPIFFE ID against the source address every time), and a renewed certificate on
either side ends resumption (the cache is keyed by this side's context; the far side's new context
cannot read tickets of its old one). A ticket is only readable by the agent process (worker) that
issued it: with several workers, a connection landing on another worker does a full handshake.

Fail-open stays the default: a source pod without a certificate yet, a destination namespace that
is not captured, or a tunnel that cannot be set up (no mTLS agent on B's node: refused) falls
back to a plaintext connection, counted.

Half-close crosses the tunnel: the end of one direction is TLS 1.3's `close_notify`, which closes
only its sender's write side (RFC 8446 §6.1: the peer may keep sending), and the TCP FIN follows
once both directions are done. So a client that shuts down its write side still reads the
server's whole answer, and the server learns of the EOF. The signal is an authenticated record
inside the session — an attacker on the path cannot forge or truncate it: a bare TCP FIN is not
it. Both ends are therefore sans-IO TLS (`TlsSession` over memory BIOs) on plain transports:
asyncio's (and uvloop's) SSL transports cannot write EOF and answer a received close_notify by
closing both directions.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from nodemesh.agent.certs import CertReader, peer_identity
from nodemesh.agent.mux import MUX_ALPN, Carrier, ClientCarrier, ServerCarrier
from nodemesh.api import spiffe

if TYPE_CHECKING:
    from nodemesh.agent.podindex import PodIndex
    from nodemesh.agent.relay import Connection

log = logging.getLogger("nodemesh.agent.tunnel")

TUNNEL_PORT = 15008
TUNNEL_SNI = "tunnel.nodemesh.invalid"  # any name: identity is checked on the URI SAN, not the host name
HANDSHAKE_TIMEOUT_S = 5.0
SESSION_TTL_S = 300.0      # a resumable session is kept at most this long (certificates rotate anyway)
MAX_SESSIONS = 4096        # (source pod, destination pod) pairs remembered per worker
HEAD_TIMEOUT_S = 5.0
MAX_HEAD = 1024
NO_MUX_TTL_S = 300.0      # a pair whose far agent took no carrier uses per-connection tunnels this long


def connect_head(destination: tuple[str, int]) -> bytes:
    return b"CONNECT %s:%d HTTP/1.1\r\n\r\n" % (destination[0].encode(), destination[1])


def parse_head(data: bytes) -> tuple[tuple[str, int] | None, bytes, str]:
    """(target, rest, error) from what arrived inside the tunnel: target None and error "" means
    more bytes are needed; an error means refuse."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None, b"", ("tunnel head too long" if len(data) > MAX_HEAD else "")
    line = data[:end].split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != b"CONNECT" or parts[2] != b"HTTP/1.1":
        return None, b"", "not a CONNECT head"
    host, _, port = parts[1].rpartition(b":")
    try:
        return (host.decode("ascii"), int(port)), data[end + 4:], ""
    except (UnicodeDecodeError, ValueError):
        return None, b"", "bad CONNECT target"


@dataclass
class TunnelStats:
    """Counted per worker, and handed to `sink` (the worker's telemetry: the agent's
    `nodemesh_tunnel_events_total{event,reason}` on /metrics); the relay's own metrics count the
    connections themselves."""

    originated: int = 0          # outbound connections sent through a tunnel
    resumed: int = 0             # of which resumed a TLS session (no full handshake)
    terminated: int = 0          # inbound tunnels accepted (identity verified)
    fallback: dict[str, int] = field(default_factory=dict)   # outbound sent in plaintext, by reason
    refused: dict[str, int] = field(default_factory=dict)    # inbound tunnels refused, by reason
    # Multiplexed carriers (agent/mux.py): carrier_opened, carrier_accepted, carrier_closed by
    # reason, mux_unsupported (the far agent speaks only the per-connection protocol).
    events: dict[tuple[str, str], int] = field(default_factory=dict)
    sink: Callable[[str, str], None] | None = None

    def add(self, event: str) -> None:
        """originated, resumed or terminated: one more."""
        setattr(self, event, getattr(self, event) + 1)
        if self.sink is not None:
            self.sink(event, "")

    def note(self, event: str, reason: str = "") -> None:
        """A carrier event (agent/mux.py)."""
        self.events[(event, reason)] = self.events.get((event, reason), 0) + 1
        if self.sink is not None:
            self.sink(event, reason)

    def count(self, table: dict[str, int], reason: str) -> None:
        """A fallback or a refusal, by reason."""
        table[reason] = table.get(reason, 0) + 1
        if self.sink is not None:
            self.sink("fallback" if table is self.fallback else "refused", reason)


@dataclass(frozen=True, slots=True)
class Plan:
    context: ssl.SSLContext
    expected: tuple[str, str]    # (namespace, service account) the server's certificate must name
    server_id: str               # that identity as a SPIFFE ID (the connection's labels until verified)
    pair: tuple[str, str] = ("", "")        # (source pod uid, destination pod uid): the session cache's key
    session: ssl.SSLSession | None = None   # a session to resume, when one is cached for the pair


class Tunnel:
    """A worker's mTLS: which outbound connections to tunnel, and the inbound tunnel terminator."""

    def __init__(self, index: PodIndex, certs: CertReader, clock: Callable[[], float] = time.monotonic,
                 sink: Callable[[str, str], None] | None = None, *, mux: bool = False,
                 port: int = TUNNEL_PORT) -> None:
        self.index = index
        # Multiplexed carriers (agent/mux.py) for what this side originates; `certs` must then
        # offer MUX_ALPN (CertReader(alpn=...)), which is also what makes the inbound side take them.
        self.mux = mux
        self.port = port
        self.carriers: dict[tuple[str, str], list[ClientCarrier]] = {}
        self._no_mux: dict[tuple[str, str], float] = {}   # pairs whose far agent chose no MUX_ALPN, until
        self.certs = certs
        self.stats = TunnelStats(sink=sink)
        self.clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        # The mesh's trust domain, learned from the identities verified (the agent is not told
        # it): names the server a connection is planned to reach before its handshake.
        self.trust_domain = spiffe.DEFAULT_TRUST_DOMAIN
        # Resumable sessions: (src uid, dst uid) -> (the client context it belongs to, session, expiry).
        self._sessions: dict[tuple[str, str], tuple[ssl.SSLContext, ssl.SSLSession, float]] = {}

    # ------------------------------------------------------------------ outbound (source node)
    def required(self, ip: str) -> bool:
        """Is `ip` a pod of a namespace that takes cross-node connections only over mTLS?"""
        owner = self.index.owner(ip)
        required = self.index.config.mtls_required_namespaces
        return bool(required) and owner is not None and owner.labels[0] in required

    def plan(self, source: tuple[str, int], destination: tuple[str, int]) -> Plan | None:
        """Tunnel this connection? Only local pod → pod of another node, in a captured namespace,
        with a certificate for the source pod on this node. Raises ConnectionRefusedError when it
        cannot be tunnelled but the destination's namespace requires mTLS (fail closed)."""
        index = self.index
        dst = index.owner(destination[0])
        if dst is None or dst.local:
            return None
        src = index.owner(source[0])
        if src is None or not src.local:
            self._no_tunnel(destination, "source_not_a_local_pod")
            return None
        dst_pod = index.pod_by_uid(dst.uid)
        if dst_pod is None or index.uncaptured(dst_pod.namespace):
            self._no_tunnel(destination, "destination_not_captured")
            return None
        context = self.certs.context(src.uid, server=False)
        if context is None:
            self._no_tunnel(destination, "no_certificate")
            return None
        expected = (dst_pod.namespace, dst_pod.service_account or "default")
        try:
            server_id = str(spiffe.workload_id(self.trust_domain, *expected))
        except ValueError:
            server_id = f"{spiffe.SCHEME}{self.trust_domain}/ns/{expected[0]}/sa/{expected[1]}"
        pair = (src.uid, dst.uid)
        return Plan(context, expected, server_id, pair, self._session_for(pair, context))

    def _session_for(self, pair: tuple[str, str], context: ssl.SSLContext) -> ssl.SSLSession | None:
        hit = self._sessions.get(pair)
        if hit is None:
            return None
        if hit[0] is not context or hit[2] < self.clock():
            del self._sessions[pair]  # our certificate was renewed, or it is old: a full handshake
            return None
        return hit[1]

    def keep_session(self, plan: Plan, session: ssl.SSLSession | None) -> None:
        """A ticket arrived on a tunnel of `plan`: the pair's next connection may resume it."""
        if session is None or not session.has_ticket:
            return
        sessions = self._sessions
        if plan.pair not in sessions and len(sessions) >= MAX_SESSIONS:
            sessions.pop(next(iter(sessions)))  # the oldest entry (insertion order)
        sessions[plan.pair] = (plan.context, session, self.clock() + SESSION_TTL_S)

    def _no_tunnel(self, destination: tuple[str, int], reason: str) -> None:
        if self.required(destination[0]):
            self.stats.count(self.stats.refused, f"required:{reason}")
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"mTLS required by the destination's namespace: {reason}")
        self.stats.count(self.stats.fallback, reason)

    def refuse_plaintext(self, direction: str, peer: tuple[str, int], original: tuple[str, int]) -> bool:
        """A plaintext connection from another node to a pod of a namespace requiring mTLS."""
        if direction != "inbound" or not self.required(original[0]):
            return False
        self.stats.count(self.stats.refused, "plaintext_to_required")
        log.info("event=mtls_refused src=%s:%d reason=plaintext_to_required dst=%s:%d", *peer, *original)
        return True

    def check_server(self, ssl_object: ssl.SSLObject, plan: Plan, count: bool = True) -> str:
        """The server's SPIFFE ID if it is the one planned, else raise ssl.SSLError. `count`: one
        more connection originated (a carrier's handshake counts its streams instead)."""
        seen = peer_identity(ssl_object)
        self._learn_trust_domain(seen)
        if _names(seen) != plan.expected:
            raise ssl.SSLError(f"tunnel server is {seen or 'anonymous'}, expected ns/{plan.expected[0]}/sa/"
                               f"{plan.expected[1]}")
        if count:
            self.stats.add("originated")
        return seen

    def _learn_trust_domain(self, spiffe_id: str) -> None:
        with contextlib.suppress(ValueError):
            self.trust_domain = spiffe.parse(spiffe_id).trust_domain

    async def open(self, conn: Connection, peer: tuple[str, int], destination: tuple[str, int], plan: Plan,
                   upstream: Callable[[Connection], asyncio.Protocol], timeout_s: float) -> bool:
        """Connect `conn`'s upstream through a tunnel to `destination`'s node. False: no tunnel
        there (refused, handshake failed: no mTLS agent on that node) — the caller dials in
        plaintext (fail-open). Raises ssl.SSLError when the server is not who it must be."""
        from nodemesh.agent.sockets import upstream_socket

        if self.mux and self._no_mux.get(plan.pair, 0.0) < self.clock():
            opened = await self._open_stream(conn, peer, destination, plan, upstream, timeout_s)
            if opened is not None:
                return opened
            # The far agent speaks only the per-connection protocol: a tunnel of its own, below.
        loop = asyncio.get_running_loop()
        sock, _transparent = upstream_socket(peer[0] if conn.ctx.transparent_ok else None, 0)
        done: asyncio.Future[None] = loop.create_future()
        done.add_done_callback(_consume)
        proto = _TunnelUpstream(conn, upstream(conn), self, plan, connect_head(destination), done)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (destination[0], self.port)), timeout_s)
            with contextlib.suppress(OSError):  # the handshake's small flights must not wait for ACKs
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.create_connection(lambda: proto, sock=sock)
            sock.detach()  # the transport owns the fd now (relay.py _connect: never close it twice)
            await asyncio.wait_for(asyncio.shield(done), min(timeout_s, HANDSHAKE_TIMEOUT_S))
        except (OSError, TimeoutError) as exc:
            if proto.raw is not None:
                proto.raw.abort()
            else:
                sock.close()
            if proto.refused or self.required(destination[0]):
                raise
            self._fell_back(destination, exc)
            return False
        return True

    async def _open_stream(self, conn: Connection, peer: tuple[str, int], destination: tuple[str, int], plan: Plan,
                           upstream: Callable[[Connection], asyncio.Protocol], timeout_s: float) -> bool | None:
        """`conn`'s upstream as a stream on the pair's carrier (agent/mux.py), opening one if
        none is usable. True: connected; False: no tunnel there (fall back, as `open`); None: the
        far agent did not choose MUX_ALPN (the caller opens a per-connection tunnel)."""
        source_ip = peer[0] if conn.ctx.transparent_ok else None
        for _attempt in range(2):
            carrier = self._carrier(plan, source_ip, destination[0], timeout_s)
            carrier.pending += 1
            try:
                await asyncio.wait_for(asyncio.shield(carrier.ready), timeout_s + HANDSHAKE_TIMEOUT_S)
            except (OSError, TimeoutError) as exc:
                if carrier.refused:
                    conn.secured(None)
                if carrier.refused or self.required(destination[0]):
                    raise
                self._fell_back(destination, exc)
                return False
            finally:
                carrier.pending -= 1
            if not carrier.mux:
                no_mux = self._no_mux
                if plan.pair not in no_mux and len(no_mux) >= MAX_SESSIONS:
                    no_mux.pop(next(iter(no_mux)))  # the oldest entry (insertion order)
                no_mux[plan.pair] = self.clock() + NO_MUX_TTL_S
                self.stats.note("mux_unsupported")
                return None
            if carrier.closed:
                continue  # lost while this opener waited (far agent restarting): once more, on a new one
            conn.secured(carrier.peer_id)
            self.stats.add("originated")
            carrier.open_stream(destination[1], upstream(conn), destination, peer[1])
            return True
        raise ConnectionResetError(errno.ECONNRESET, "tunnel carrier lost while opening")

    def _fell_back(self, destination: tuple[str, int], exc: BaseException) -> None:
        """No tunnel could be set up to `destination`'s node (no mTLS agent there): the caller
        dials in plaintext (fail-open), counted."""
        self.stats.count(self.stats.fallback, "no_tunnel")
        log.debug("event=mtls_fallback dst=%s:%d error=%r", destination[0], destination[1], str(exc)[:120])

    def _carrier(self, plan: Plan, source_ip: str | None, destination_ip: str, timeout_s: float) -> ClientCarrier:
        """The pair's carrier with room for one more stream, made with the current certificate;
        carriers made with an older one take no new streams (they drain). None: a new one, dialling."""
        for carrier in list(self.carriers.get(plan.pair, ())):
            if carrier.context is not plan.context and not carrier.draining:
                log.info("event=carrier_retired pair=%s/%s reason=certificate_renewed", *plan.pair)
                carrier.drain()   # our certificate (or the trust bundle) was renewed since
        # (Fetched after the drains: a drained carrier closing took the pair's list with it.)
        carriers = self.carriers.setdefault(plan.pair, [])
        for carrier in carriers:
            if carrier.usable and carrier.context is plan.context:
                return carrier
        carrier = ClientCarrier(self, plan)
        carrier.on_closed = self._carrier_closed
        carriers.append(carrier)
        task = asyncio.get_running_loop().create_task(carrier.dial(source_ip, destination_ip, self.port, timeout_s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return carrier

    def _carrier_closed(self, carrier: Carrier) -> None:
        assert isinstance(carrier, ClientCarrier)
        carriers = self.carriers.get(carrier.plan.pair)
        if carriers is not None and carrier in carriers:
            carriers.remove(carrier)
            if not carriers:
                del self.carriers[carrier.plan.pair]

    # ------------------------------------------------------------------ inbound (destination node)
    def is_tunnel(self, direction: str, original: tuple[str, int]) -> bool:
        return direction == "inbound" and original[1] == self.port

    def accept(self, conn: Connection, transport: asyncio.Transport, peer: tuple[str, int],
               original: tuple[str, int], make_connection: Callable[[], Connection]) -> None:
        """A tunnel arrived (nothing read yet): from now on its bytes go through a TLS server
        (`_TlsServerShim`); once the client is verified and the CONNECT head read, the plaintext
        goes to a new inbound Connection (`make_connection`) as if it had arrived as is.

        Not `loop.start_tls`: under uvloop it never resumes reading a transport paused before it
        (tried: the handshake times out), and not pausing loses the ClientHello to the old protocol."""
        conn.finished = True  # the raw connection's protocol object is done with: TLS takes the socket
        index = self.index
        dst = index.owner(original[0])
        context = self.certs.context(dst.uid, server=True) if dst is not None and dst.local else None
        if context is None:
            self._refuse(transport, peer, "no_certificate" if dst is not None and dst.local else "not_a_local_pod",
                         original[0])
            return
        shim = _TlsServerShim(self, transport, context, peer, original, make_connection, dst.uid)  # type: ignore[union-attr]
        transport.set_protocol(shim)

    def _refuse(self, transport: asyncio.Transport, peer: tuple[str, int], reason: str, detail: str = "") -> None:
        self.stats.count(self.stats.refused, reason)
        log.info("event=mtls_refused src=%s:%d reason=%s detail=%r", peer[0], peer[1], reason, detail)
        transport.abort()

    def verify_client(self, client_id: str, peer: tuple[str, int]) -> bool:
        """Is `client_id` (from a certificate chained to our root) the identity of the pod that
        owns the source address? A spoofed address, or a certificate used elsewhere: no."""
        src = self.index.owner(peer[0])
        src_pod = self.index.pod_by_uid(src.uid) if src is not None else None
        if src_pod is None:
            return False
        self._learn_trust_domain(client_id)
        return _names(client_id) == (src_pod.namespace, src_pod.service_account or "default")

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for carriers in list(self.carriers.values()):
            for carrier in list(carriers):
                carrier.close("stopping")


class _TunnelUpstream(asyncio.Protocol):
    """The upstream side of a tunnel (source node): a sans-IO TLS client on the plain TCP
    transport. Handshake, check the server's certificate, write the CONNECT head; then the
    relay's own upstream protocol (`inner`) gets the plaintext and writes through a
    `TlsTransport` (so it can half-close)."""

    def __init__(self, conn: Connection, inner: asyncio.Protocol, tunnel: Tunnel, plan: Plan, head: bytes,
                 done: asyncio.Future[None]) -> None:
        self.conn, self.inner, self.tunnel, self.plan, self.head, self.done = conn, inner, tunnel, plan, head, done
        self.tls = TlsSession(plan.context, server_side=False, server_hostname=TUNNEL_SNI, session=plan.session)
        self.ticket_kept = False
        self.raw: asyncio.Transport | None = None
        self.wrapped: TlsTransport | None = None
        self.refused = ""
        self.eof = False
        self.error: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = cast(asyncio.Transport, transport)
        self.raw.write(self.tls.start())

    def _fail(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
        if self.raw is not None:
            self.raw.abort()

    def data_received(self, data: bytes) -> None:
        raw = self.raw
        assert raw is not None
        handshaking = not self.tls.handshaken
        try:
            plain, closed = self.tls.receive(data)
        except ssl.SSLError as exc:
            if self.wrapped is None:
                self._fail(exc)
            else:
                self.error = exc
                raw.abort()
            return
        out = self.tls.output()
        if out:
            raw.write(out)
        if handshaking:
            if not self.tls.handshaken:
                return
            try:
                self.conn.secured(self.tunnel.check_server(self.tls.obj, self.plan))
            except ssl.SSLError as exc:
                self.conn.secured(None)
                self.refused = str(exc)
                self.tunnel.stats.count(self.tunnel.stats.fallback, "server_identity")
                self._fail(exc)
                return
            if self.tls.obj.session_reused:
                self.tunnel.stats.add("resumed")
            raw.write(self.tls.send(self.head))
            self.wrapped = TlsTransport(raw, self.tls, self.inner)
            if not self.done.done():
                self.done.set_result(None)
            self.inner.connection_made(self.wrapped)
        if not self.ticket_kept and not handshaking:
            # TLS 1.3 tickets come after the handshake, with the server's first records.
            session = self.tls.obj.session
            if session is not None and session.has_ticket:
                self.ticket_kept = True
                self.tunnel.keep_session(self.plan, session)
        if plain:
            self.inner.data_received(plain)
        if closed:
            self._eof()

    def _eof(self) -> None:
        if not self.eof and self.wrapped is not None:
            self.eof = True
            self.inner.eof_received()

    def eof_received(self) -> bool | None:
        if self.wrapped is None:
            self._fail(ConnectionResetError(errno.ECONNRESET, "tunnel closed during its handshake"))
            return False
        self._eof()  # a FIN without close_notify: the far agent is gone; what came is all there is
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.wrapped is None:
            self._fail(exc or ConnectionResetError(errno.ECONNRESET, "tunnel closed during its handshake"))
            return
        self.inner.connection_lost(exc or self.error)

    def pause_writing(self) -> None:
        if self.wrapped is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.wrapped is not None:
            self.inner.resume_writing()


def _consume(future: asyncio.Future[None]) -> None:
    """A handshake that failed after its opener stopped waiting (timeout): nothing to report."""
    if not future.cancelled():
        future.exception()


def _names(spiffe_id: str) -> tuple[str, str] | None:
    try:
        parsed = spiffe.parse(spiffe_id)
    except ValueError:
        return None
    return parsed.namespace, parsed.service_account


class TlsSession:
    """One end of a TLS session over memory BIOs (sans-IO): bytes in, plaintext out; plaintext in,
    bytes out. `shut()` ends what this end sends (close_notify) and keeps reading."""

    def __init__(self, context: ssl.SSLContext, server_side: bool = True, server_hostname: str | None = None,
                 session: ssl.SSLSession | None = None) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                    server_hostname=server_hostname, session=session)
        self.handshaken = False
        self.shut_down = False   # close_notify sent: nothing more may be written

    def start(self) -> bytes:
        """A client's first flight (ClientHello)."""
        with contextlib.suppress(ssl.SSLWantReadError):
            self.obj.do_handshake()
        return self.outgoing.read()

    def receive(self, data: bytes) -> tuple[bytes, bool]:
        """(plaintext, peer closed the TLS session). Raises ssl.SSLError on a failed handshake or a
        corrupt record. What must be sent back is in `output()`."""
        self.incoming.write(data)
        if not self.handshaken:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                return b"", False
            self.handshaken = True
        chunks = []
        closed = False
        while True:
            try:
                chunk = self.obj.read(1 << 16)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            chunks.append(chunk)
        return b"".join(chunks), closed

    def send(self, data: bytes) -> bytes:
        self.obj.write(data)
        return self.outgoing.read()

    def output(self) -> bytes:
        return self.outgoing.read()

    def shut(self) -> bytes:
        """close_notify: the end of this direction (TLS 1.3 half-close; the peer may still send,
        and we still read). Idempotent."""
        if not self.shut_down:
            self.shut_down = True
            with contextlib.suppress(ssl.SSLError, ValueError):
                self.obj.unwrap()
        return self.outgoing.read()

    close = shut  # before the TCP FIN


TlsServer = TlsSession  # the destination agent's end (server_side=True is the default)


class _TlsServerShim(asyncio.Protocol):
    """The raw socket's protocol once a tunnel arrived: handshake, client check, CONNECT head, then
    decrypts for the Connection (which writes through `TlsTransport`)."""

    def __init__(self, tunnel: Tunnel, raw: asyncio.Transport, context: ssl.SSLContext, peer: tuple[str, int],
                 original: tuple[str, int], make_connection: Callable[[], Connection], pod_uid: str = "") -> None:
        self.tunnel, self.raw, self.peer, self.original = tunnel, raw, peer, original
        self.make_connection = make_connection
        self.context, self.pod_uid = context, pod_uid
        self.tls = TlsSession(context, server_side=True)
        self.conn: Connection | None = None
        self.client_id = ""
        self.head = b""
        self.done = False
        self.eof = False  # the client's end of stream delivered (close_notify, or a bare FIN)
        self.timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            HANDSHAKE_TIMEOUT_S + HEAD_TIMEOUT_S, self._timeout)

    def _timeout(self) -> None:
        self.timer = None
        if self.conn is None and not self.done:
            self._fail("timeout")

    def _fail(self, reason: str, detail: str = "") -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.tunnel._refuse(self.raw, self.peer, reason, detail)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        was_handshaken = self.tls.handshaken
        try:
            plain, closed = self.tls.receive(data)
        except ssl.SSLError as exc:
            self._fail("handshake" if not was_handshaken else "tls_error", str(exc)[:160])
            return
        out = self.tls.output()
        if out:
            self.raw.write(out)
        if self.tls.handshaken and not was_handshaken:
            client_id = peer_identity(self.tls.obj)
            if not self.tunnel.verify_client(client_id, self.peer):
                self._fail("identity_mismatch", f"{client_id or 'anonymous'} from {self.peer[0]}")
                return
            self.client_id = client_id
            if self.tls.obj.selected_alpn_protocol() == MUX_ALPN:
                self._carry(plain, closed)
                return
        conn = self.conn
        if conn is None:
            self.head += plain
            target, rest, error = parse_head(self.head)
            if error:
                self._fail("bad_head", error)
                return
            if target is None:
                if closed:
                    self._fail("bad_head", "closed before its head")
                return
            if target[0] != self.original[0]:
                # A tunnel reaches the pod whose certificate terminated it, nothing else.
                self._fail("wrong_target", f"{target[0]} via {self.original[0]}")
                return
            self._start(target)
            conn, plain = self.conn, rest
        if plain and not conn.finished:  # type: ignore[union-attr]
            conn.data_received(plain)  # type: ignore[union-attr]
        if closed:
            self._eof()

    def _carry(self, plain: bytes, closed: bool) -> None:
        """The client chose the multiplexed protocol: the socket is a carrier (agent/mux.py) now,
        its streams inbound connections of their own, all with the identity verified here."""
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.tunnel.stats.note("carrier_accepted")
        carrier = ServerCarrier(self.tunnel, self.raw, self.tls, self.context, self.client_id, self.original[0],
                                self.pod_uid, self.make_connection)
        self.raw.set_protocol(carrier)
        carrier.received(plain, closed)

    def _start(self, target: tuple[str, int]) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.tunnel.stats.add("terminated")
        conn = self.make_connection()
        conn.forced_original = target
        conn.mtls = self.client_id
        self.conn = conn
        conn.connection_made(TlsTransport(self.raw, self.tls, conn))

    def _eof(self) -> None:
        """The client's end of stream (its close_notify: a half-close, we keep writing)."""
        if not self.eof and self.conn is not None and not self.conn.finished:
            self.eof = True
            self.conn.eof_received()

    def eof_received(self) -> bool | None:
        if self.conn is None:
            self._fail("bad_head", "closed before its head")
            return False
        self._eof()  # a bare FIN (no close_notify): the source agent is gone; what came is all
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.conn is not None:
            self.conn.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.pause_writing()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.resume_writing()


class TlsTransport(asyncio.Transport):
    """What the relay writes to on either end of a tunnel: the raw transport, with writes
    encrypted. `write_eof()` is close_notify (the TCP connection stays open for the other
    direction); `close()` sends it unless sent, then the FIN."""

    def __init__(self, raw: asyncio.Transport, tls: TlsSession, protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self.raw, self.tls, self.protocol = raw, tls, protocol

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data and not self.raw.is_closing() and not self.tls.shut_down:
            self.raw.write(self.tls.send(bytes(data)))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if not self.raw.is_closing():
            self.raw.write(self.tls.shut())

    def close(self) -> None:
        if not self.raw.is_closing():
            with contextlib.suppress(Exception):
                self.raw.write(self.tls.close())
        self.raw.close()

    def abort(self) -> None:
        self.raw.abort()

    def is_closing(self) -> bool:
        return self.raw.is_closing()

    def pause_reading(self) -> None:
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.raw.resume_reading()

    def is_reading(self) -> bool:
        return self.raw.is_reading()

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.raw.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.raw.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.tls.obj
        if name == "peercert":
            return self.tls.obj.getpeercert()
        return self.raw.get_extra_info(name, default)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol
