"""The multiplexed mTLS tunnel (agent/mux.py) between two real relays over loopback (no root):
the source agent's outbound relay (pod `client` at 127.0.0.1, node1) and the destination agent's
inbound relay (pod `web` at 127.0.0.2, node2) listening where the tunnel dials (an ephemeral port
standing for 15008), both with workload certificates from the project's CA. Real sockets, real
TLS, real frames: many connections share one carrier, a slow stream does not stall a fast one,
half-close and reset are per stream, a lost carrier resets its streams and the next connection
opens a new one, a peer's garbage closes the carrier (counted) and leaks nothing, certificate
renewal moves new streams to a new carrier, and ALPN falls back to per-connection tunnels with an
agent that does not multiplex, both ways."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from loopback_relay import LoopIndex, Recorder, run, serve, wait_until
from nodemesh.agent import mux
from nodemesh.agent.admission import Admission
from nodemesh.agent.certs import CertReader
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.endpoints import EndpointPicker
from nodemesh.agent.modes import make_mode
from nodemesh.agent.podindex import PodIndex
from nodemesh.agent.relay import Connection, WorkerContext
from nodemesh.agent.sockets import listen_socket
from nodemesh.agent.tunnel import TUNNEL_SNI, Tunnel
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.controlplane.ca import FileRootStore, WorkloadCA
from workload_certs import issue

CLIENT_IP, WEB_IP = "127.0.0.1", "127.0.0.2"
PAIR = ("uid-client", "uid-web")


def index(this_node: str) -> PodIndex:
    idx = PodIndex(this_node)
    snap = pb.IdentitySnapshot(resource_version="1")
    for name, ip, node in (("client", CLIENT_IP, "node1"), ("web", WEB_IP, "node2")):
        snap.pods.append(pb.Pod(ip=ip, ips=[ip], namespace="ns", name=f"{name}-1", node=node, uid=f"uid-{name}",
                                ready=True, service_account=name,
                                owner=pb.Resource(namespace="ns", type="deployment", name=name)))
    idx.update(snap)
    return idx


@dataclass
class Mesh:
    """Both agents, the server behind `web`, and what each counted."""

    src: Tunnel
    dst: Tunnel
    src_ctx: WorkerContext
    dst_ctx: WorkerContext
    port: int                      # the source relay's listener (what the client pod dials)
    src_rec: Recorder
    dst_rec: Recorder
    servers: list[asyncio.Server] = field(default_factory=list)
    src_events: list[tuple[str, str]] = field(default_factory=list)
    dst_events: list[tuple[str, str]] = field(default_factory=list)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(CLIENT_IP, self.port)

    def carriers(self) -> list[mux.ClientCarrier]:
        return list(self.src.carriers.get(PAIR, []))

    def count(self, events: list[tuple[str, str]], event: str, reason: str = "") -> int:
        return events.count((event, reason))


class SecuredRecorder(Recorder):
    """A Recorder that also hears when a connection's tunnel peer is named (relay.secured)."""

    def __init__(self) -> None:
        super().__init__()
        self.secured: list[str | None] = []

    def connection_secured(self, conn: object, peer_id: str | None) -> None:
        self.secured.append(peer_id)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(65536):
        w.write(data)
        await w.drain()
    w.close()


async def mesh(tmp_path: Path, handler: Handler = echo, src_mux: bool = True, dst_mux: bool = True) -> Mesh:
    """Certificates, the server on 127.0.0.2, the destination's inbound relay, the source's relay."""
    ca = WorkloadCA(FileRootStore(tmp_path / "ca"), "mesh.test")
    issue(ca, tmp_path / "n1", "uid-client", "client")
    issue(ca, tmp_path / "n2", "uid-web", "web")
    server = await asyncio.start_server(handler, WEB_IP, 0)
    server_port = server.sockets[0].getsockname()[1]

    sock = listen_socket(WEB_IP, 0)
    tunnel_port = sock.getsockname()[1]
    dst_rec = SecuredRecorder()
    cfg = AgentConfig(node="node2", transparent=False, outbound_port=1, inbound_port=2, admin_port=3, workers=1)
    dst_ctx = WorkerContext(cfg, dst_rec, EndpointPicker(LoopIndex(("0.0.0.0", 1), ("0.0.0.0", 1))),  # type: ignore[arg-type]
                            make_mode, Admission(1000))
    dst_events: list[tuple[str, str]] = []
    alpn = (mux.MUX_ALPN,)
    dst_ctx.tunnel = dst = Tunnel(index("node2"), CertReader(tmp_path / "n2", alpn=alpn if dst_mux else ()),
                                  sink=lambda e, r: dst_events.append((e, r)), mux=dst_mux, port=tunnel_port)
    inbound = await asyncio.get_running_loop().create_server(lambda: Connection(dst_ctx, "inbound"), sock=sock)

    src_rec = SecuredRecorder()
    outbound, port, src_ctx = await serve(src_rec, (WEB_IP, server_port), Admission(1000))
    src_events: list[tuple[str, str]] = []
    src_ctx.tunnel = src = Tunnel(index("node1"), CertReader(tmp_path / "n1", alpn=alpn if src_mux else ()),
                                  sink=lambda e, r: src_events.append((e, r)), mux=src_mux, port=tunnel_port)
    m = Mesh(src, dst, src_ctx, dst_ctx, port, src_rec, dst_rec, [server, inbound, outbound])
    m.src_events, m.dst_events = src_events, dst_events
    return m


async def teardown(m: Mesh) -> None:
    assert await wait_until(lambda: not m.src_ctx.live and not m.dst_ctx.live, 5), (m.src_ctx.live, m.dst_ctx.live)
    await m.src.stop()
    await m.dst.stop()
    for s in m.servers:
        s.close()
    await asyncio.sleep(0.05)


async def roundtrip(m: Mesh, payload: bytes) -> bytes:
    r, w = await m.connect()
    w.write(payload)
    w.write_eof()
    got = await asyncio.wait_for(r.read(), 10)
    w.close()
    return got


def test_agent_tunnel_mux_many_connections_share_one_carrier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """60 concurrent connections, each its own bytes both ways: one carrier, 60 streams; every
    connection counted on both agents with the verified identities (tls=true, client id); the
    carrier closes once idle, and the next connection opens a new one."""
    monkeypatch.setattr(mux, "IDLE_S", 0.5)

    async def scenario() -> None:
        m = await mesh(tmp_path)
        payloads = [bytes([i]) * (1000 + 997 * i) for i in range(60)]
        got = await asyncio.gather(*(roundtrip(m, p) for p in payloads))
        assert got == payloads
        assert m.count(m.src_events, "carrier_opened") == 1 and m.count(m.src_events, "originated") == 60
        assert m.count(m.dst_events, "carrier_accepted") == 1 and m.count(m.dst_events, "terminated") == 60
        assert len(m.carriers()) == 1
        assert await wait_until(lambda: not m.src_ctx.live and not m.dst_ctx.live, 5)
        assert m.src_rec.closes == [None] * 60 and m.dst_rec.closes == [None] * 60
        assert await wait_until(lambda: not m.carriers(), 3)   # idle: closed
        assert m.count(m.src_events, "carrier_closed", "idle") == 1
        assert await wait_until(lambda: m.count(m.dst_events, "carrier_closed", "peer_closed") == 1, 3)
        assert await roundtrip(m, b"again") == b"again"
        assert m.count(m.src_events, "carrier_opened") == 2
        await teardown(m)

    run(scenario)


def test_agent_tunnel_mux_streams_carry_the_verified_identities(tmp_path: Path) -> None:
    async def scenario() -> None:
        m = await mesh(tmp_path)
        r, w = await m.connect()
        w.write(b"x")
        assert await r.readexactly(1) == b"x"
        seen = [(c.direction, c.mtls) for c in (*m.src_ctx.live, *m.dst_ctx.live)]
        # The destination counts (and taps) the stream as from the client's own port, carried in
        # OPEN, not from the carrier's port.
        (inbound,) = m.dst_ctx.live
        client_port = w.get_extra_info("sockname")[1]
        assert inbound.meta.source[1] == client_port != m.carriers()[0].raw.get_extra_info("sockname")[1]
        w.close()
        assert sorted(seen) == [("inbound", "spiffe://mesh.test/ns/ns/sa/client"),
                                ("outbound", "spiffe://mesh.test/ns/ns/sa/web")]
        await teardown(m)

    run(scenario)


def test_agent_tunnel_mux_slow_stream_does_not_stall_a_fast_one(tmp_path: Path) -> None:
    """A server that never reads one connection (`sink`) while echoing another: the client pushes
    16 MB into the stalled one and 4 MB through the echo on the same carrier; the echo gets every
    byte back, and the stalled stream is held by its window (its credit spent, its bytes waiting
    on the source's side, not in the carrier)."""
    release = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        kind = await r.readline()
        if kind == b"sink\n":
            await release.wait()   # never reads again
            w.transport.abort()
            return
        await echo(r, w)

    async def scenario() -> None:
        m = await mesh(tmp_path, handler)
        _sr, sw = await m.connect()
        sw.write(b"sink\n" + b"s" * (16 << 20))
        assert await wait_until(lambda: any(s.credit == 0 for c in m.carriers() for s in c.streams.values()), 10)
        fr, fw = await m.connect()
        block = b"f" * (4 << 20)

        async def push() -> None:
            fw.write(b"fast\n")
            fw.write(block)
            await fw.drain()
            fw.write_eof()

        pusher = asyncio.create_task(push())
        got = await asyncio.wait_for(fr.read(), 20)
        await pusher
        assert got == block   # every byte moved while the other stream stood still
        assert len(m.carriers()) == 1 and len(m.carriers()[0].streams) == 1
        (slow,) = m.carriers()[0].streams.values()
        assert slow.credit < mux.WINDOW_SIZE
        fw.close()
        sw.transport.abort()
        release.set()
        await teardown(m)

    run(scenario)


def test_agent_tunnel_mux_half_close_and_reset_are_per_stream(tmp_path: Path) -> None:
    """Stream A: the client sends, shuts its write side, and still reads the server's whole answer
    (the server answers only after EOF). Stream B: reset by its client mid-way (the server sees its
    connection end); stream C, open beside both all along, still echoes afterwards."""
    async def after_eof(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        first = await r.readline()
        if first == b"echo\n":
            w.write(first)
            await echo(r, w)
            return
        body = await r.read()   # to EOF
        w.write(b"got %d\n" % len(body) + b"a" * 300_000)
        await w.drain()
        w.close()

    async def scenario() -> None:
        m = await mesh(tmp_path, after_eof)
        cr, cw = await m.connect()
        cw.write(b"echo\n")
        assert await cr.readline() == b"echo\n"
        ar, aw = await m.connect()
        aw.write(b"half\n" + b"q" * 100_000)
        aw.write_eof()
        answer = await asyncio.wait_for(ar.read(), 10)
        assert answer == b"got 100000\n" + b"a" * 300_000
        _br, bw = await m.connect()
        bw.write(b"reset\n")
        await asyncio.sleep(0.1)
        sock = bw.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        bw.transport.abort()
        assert await wait_until(lambda: sum(len(c.streams) for c in m.carriers()) == 1, 5)
        cw.write(b"still\n")
        assert await cr.readline() == b"still\n"
        assert len(m.carriers()) == 1 and m.count(m.src_events, "carrier_opened") == 1
        cw.close()
        aw.close()
        await teardown(m)
        assert "upstream: ConnectionResetError" in m.dst_rec.closes or any(
            c and "Reset" in c for c in m.dst_rec.closes), m.dst_rec.closes

    run(scenario)


def test_agent_tunnel_mux_carrier_loss_resets_every_stream(tmp_path: Path) -> None:
    """The destination's end of the carrier is reset (its agent restarting): the three connections
    on it are reset, each counted closed with an error; the next connection opens a new carrier."""
    async def scenario() -> None:
        m = await mesh(tmp_path)
        conns = [await m.connect() for _ in range(3)]
        for r, w in conns:
            w.write(b"ping")
            assert await r.readexactly(4) == b"ping"
        assert await wait_until(lambda: len(m.dst_ctx.live) == 3)
        (carrier,) = m.carriers()
        server_end = next(iter(m.dst_ctx.live)).client
        assert isinstance(server_end, mux.Stream)
        server_end.carrier.raw.abort()    # type: ignore[union-attr]
        for r, _w in conns:
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(r.readexactly(1), 5)
        assert carrier.closed and not m.carriers()
        assert await wait_until(lambda: not m.src_ctx.live and not m.dst_ctx.live, 5)
        assert len(m.src_rec.closes) == 3 and all(m.src_rec.closes), m.src_rec.closes
        assert m.count(m.src_events, "carrier_closed", "lost") == 1
        assert await roundtrip(m, b"after") == b"after"
        assert m.count(m.src_events, "carrier_opened") == 2
        for _r, w in conns:
            w.close()
        await teardown(m)

    run(scenario)


GARBAGE: list[tuple[str, Callable[[int], bytes]]] = [
    ("unknown type", lambda port: mux.HEAD.pack(1, 99, 0, 0)),
    ("flags", lambda port: mux.HEAD.pack(1, mux.OPEN, 7, 2) + struct.pack("!H", port)),
    ("data before open", lambda port: mux.HEAD.pack(5, mux.DATA, 0, 3) + b"abc"),
    ("short open", lambda port: mux.HEAD.pack(1, mux.OPEN, 0, 1) + b"x"),
    ("open of 3 bytes", lambda port: mux.HEAD.pack(1, mux.OPEN, 0, 3) + struct.pack("!H", port) + b"x"),
    ("window of zero", lambda port: mux.HEAD.pack(1, mux.OPEN, 0, 2) + struct.pack("!H", port)
     + mux.HEAD.pack(1, mux.WINDOW, 0, 4) + b"\0\0\0\0"),
    ("stream 0", lambda port: mux.HEAD.pack(0, mux.FIN, 0, 0)),
    ("goaway from the source", lambda port: mux.HEAD.pack(0, mux.GOAWAY, 0, 0)),
    ("open going backwards", lambda port: mux.HEAD.pack(3, mux.OPEN, 0, 2) + struct.pack("!H", port)
     + mux.HEAD.pack(2, mux.OPEN, 0, 2) + struct.pack("!H", port)),
    ("data after fin", lambda port: mux.HEAD.pack(1, mux.OPEN, 0, 2) + struct.pack("!H", port)
     + mux.HEAD.pack(1, mux.FIN, 0, 0) + mux.HEAD.pack(1, mux.DATA, 0, 1) + b"z"),
]


async def raw_carrier(tmp_path: Path, m: Mesh) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A carrier made by hand, as a buggy or hostile source agent would: the client pod's own
    certificate, ALPN, from its address."""
    ctx = CertReader(tmp_path / "n1", alpn=(mux.MUX_ALPN,)).context("uid-client", server=False)
    r, w = await asyncio.open_connection(WEB_IP, m.src.port, ssl=ctx, server_hostname=TUNNEL_SNI,
                                         local_addr=(CLIENT_IP, 0))
    assert w.get_extra_info("ssl_object").selected_alpn_protocol() == mux.MUX_ALPN
    return r, w


@pytest.mark.parametrize(("name", "frames"), GARBAGE, ids=[g[0] for g in GARBAGE])
def test_agent_tunnel_mux_garbage_closes_the_carrier(tmp_path: Path, name: str,
                                                      frames: Callable[[int], bytes]) -> None:
    """A source agent sending what the framing does not allow: the destination closes the carrier
    (the client reads its end), counts it, and holds no connection or stream afterwards."""
    async def scenario() -> None:
        m = await mesh(tmp_path)
        server_port = m.src_ctx.picker.index.upstream[1]   # type: ignore[union-attr]
        r, w = await raw_carrier(tmp_path, m)
        w.write(frames(server_port))
        with pytest.raises((ConnectionResetError, ssl.SSLError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(r.readexactly(1 << 20), 5)   # never that much: the carrier ends
        assert await wait_until(lambda: m.count(m.dst_events, "carrier_closed", "protocol_error") == 1, 5), \
            m.dst_events
        w.close()
        await teardown(m)

    run(scenario)


def test_agent_tunnel_mux_data_beyond_the_window_closes_the_carrier(tmp_path: Path) -> None:
    """A source that ignores flow control: 24 MB on one stream to a server that never reads,
    without waiting for credit. The destination stops giving credit once its relay backs up, and
    the first byte past the stream's window ends the carrier — its buffers stay bounded."""
    release = asyncio.Event()

    async def never_reads(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await release.wait()
        w.transport.abort()

    async def scenario() -> None:
        m = await mesh(tmp_path, never_reads)
        server_port = m.src_ctx.picker.index.upstream[1]   # type: ignore[union-attr]
        r, w = await raw_carrier(tmp_path, m)
        w.write(mux.HEAD.pack(1, mux.OPEN, 0, 2) + struct.pack("!H", server_port))
        chunk = mux.HEAD.pack(1, mux.DATA, 0, 0xFFFF) + b"d" * 0xFFFF
        with pytest.raises((ConnectionResetError, ssl.SSLError, asyncio.IncompleteReadError, BrokenPipeError)):
            for _ in range(384):
                w.write(chunk)
                await asyncio.wait_for(w.drain(), 5)
            await asyncio.wait_for(r.readexactly(1 << 20), 5)
        assert await wait_until(lambda: m.count(m.dst_events, "carrier_closed", "protocol_error") == 1, 5), \
            m.dst_events
        w.close()
        release.set()
        await teardown(m)

    run(scenario)


def test_agent_tunnel_mux_renewed_certificate_moves_new_streams(tmp_path: Path) -> None:
    """The client pod's certificate is renewed while a connection is open on the carrier: the next
    connection opens a new carrier; the old one keeps its connection to the end, then closes
    (drained). The server pod's certificate renewed: its agent answers the next OPEN with GOAWAY,
    and the connection after that opens another carrier. No connection fails."""
    import os

    async def scenario() -> None:
        m = await mesh(tmp_path)
        r1, w1 = await m.connect()
        w1.write(b"one")
        assert await r1.readexactly(3) == b"one"
        ca = WorkloadCA(FileRootStore(tmp_path / "ca"), "mesh.test")
        issue(ca, tmp_path / "n1", "uid-client", "client")
        os.utime(tmp_path / "n1" / "uid-client.crt", ns=(1, 1))
        # Ten at once: all on ONE new carrier (the pool's list must survive the old one closing).
        got = await asyncio.gather(*(roundtrip(m, b"two %d" % i) for i in range(10)))
        assert got == [b"two %d" % i for i in range(10)]
        assert m.count(m.src_events, "carrier_opened") == 2
        w1.write(b"still")
        assert await r1.readexactly(5) == b"still"   # the old carrier still carries it
        w1.close()
        assert await wait_until(lambda: m.count(m.src_events, "carrier_closed", "drained") == 1, 5), m.src_events
        issue(ca, tmp_path / "n2", "uid-web", "web")
        os.utime(tmp_path / "n2" / "uid-web.crt", ns=(2, 2))
        assert await roundtrip(m, b"three") == b"three"   # on the current carrier, answered by GOAWAY
        assert await wait_until(lambda: m.count(m.src_events, "carrier_closed", "drained") == 2, 5), m.src_events
        assert await roundtrip(m, b"four") == b"four"
        assert m.count(m.src_events, "carrier_opened") == 3
        # Renewed again while the current carrier is idle: retired (closed at once) by the first
        # of ten concurrent connections, which all share the one carrier made for them.
        issue(ca, tmp_path / "n1", "uid-client", "client")
        os.utime(tmp_path / "n1" / "uid-client.crt", ns=(3, 3))
        got = await asyncio.gather(*(roundtrip(m, b"five %d" % i) for i in range(10)))
        assert got == [b"five %d" % i for i in range(10)]
        assert m.count(m.src_events, "carrier_opened") == 4 and len(m.carriers()) == 1
        assert m.src_rec.closes == [None] * 23
        await teardown(m)

    run(scenario)


def test_agent_tunnel_mux_falls_back_to_per_connection_with_an_agent_that_does_not_multiplex(
        tmp_path: Path) -> None:
    """New source, old destination (no MUX_ALPN): the first connection learns it (one session
    that carries nothing) and goes through a per-connection tunnel; the next goes straight there."""
    async def scenario() -> None:
        m = await mesh(tmp_path, dst_mux=False)
        assert await roundtrip(m, b"first") == b"first"
        assert await roundtrip(m, b"second") == b"second"
        assert m.count(m.src_events, "mux_unsupported") == 1 and m.count(m.src_events, "carrier_opened") == 0
        assert m.count(m.src_events, "originated") == 2
        assert m.count(m.dst_events, "terminated") == 2 and m.count(m.dst_events, "carrier_accepted") == 0
        await teardown(m)

    run(scenario)


def test_agent_tunnel_mux_accepts_per_connection_tunnels_of_an_old_agent(tmp_path: Path) -> None:
    """Old source (per-connection, no ALPN), new destination: accepted as before."""
    async def scenario() -> None:
        m = await mesh(tmp_path, src_mux=False)
        assert await roundtrip(m, b"old") == b"old"
        assert m.count(m.src_events, "originated") == 1 and m.count(m.dst_events, "terminated") == 1
        assert m.count(m.dst_events, "carrier_accepted") == 0 and not m.src.carriers
        await teardown(m)

    run(scenario)


def test_agent_tunnel_mux_a_full_carrier_opens_another(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At most MAX_STREAMS streams per carrier (4 here): ten connections held open at once use
    three carriers; each still carries its own bytes."""
    monkeypatch.setattr(mux, "MAX_STREAMS", 4)

    async def scenario() -> None:
        m = await mesh(tmp_path)
        conns = await asyncio.gather(*(m.connect() for _ in range(10)))
        for i, (r, w) in enumerate(conns):
            w.write(b"%d\n" % i)
        for i, (r, _w) in enumerate(conns):
            assert await asyncio.wait_for(r.readline(), 5) == b"%d\n" % i
        assert sorted(len(c.streams) for c in m.carriers()) == [2, 4, 4]
        assert m.count(m.src_events, "carrier_opened") == 3 and m.count(m.dst_events, "carrier_accepted") == 3
        for _r, w in conns:
            w.close()
        await teardown(m)

    run(scenario)
