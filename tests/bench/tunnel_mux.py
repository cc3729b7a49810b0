"""What a node-to-node mTLS tunnel costs per connection and per MB, three designs side by side
(issue 13 item 2: "one tunnel per node pair multiplexing connections (HTTP/2 CONNECT like HBONE,
or your measured better)"). In one process, no sockets: both agents' ends pumped over memory BIOs
with the agent's own pieces (agent/tunnel.py's `TlsSession`, agent/certs.py's contexts, the `h2`
library the agent already uses), so what is measured is the Python and OpenSSL work an agent
would do, not the network.

  per-connection  today's design: a TLS 1.3 tunnel per proxied connection (CONNECT head inside),
                  resumed from the pod pair's ticket (the full handshake is printed too)
  h2-connect      HBONE's shape: one TLS session carrying HTTP/2 CONNECT streams (h2 state
                  machines on both ends, flow control acknowledged as data is consumed)
  frames          one TLS session carrying a minimal framing: 8-byte header (stream, flags,
                  length) per chunk, a stream opened by a frame naming its target

For each: CPU-µs per short connection (open, 1 KB each way, both directions closed; both agents)
and CPU-ms per MB for one long stream (64 KB writes, both agents). Run:
    python3 tests/bench/tunnel_mux.py [--connections 300] [--mb 32]
"""

from __future__ import annotations

import argparse
import ssl
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings
from nodemesh.agent.certs import CertReader, make_key_and_csr
from nodemesh.agent.tunnel import TlsSession, connect_head, parse_head
from nodemesh.api import spiffe
from nodemesh.controlplane.ca import FileRootStore, WorkloadCA

REQUEST = b"x" * 1024
CHUNK = 1 << 16


def contexts(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(client context speaking as a `client` pod, server context as a `web` pod): the agent's own."""
    ca = WorkloadCA(FileRootStore(tmp / "ca"), "mesh.test")
    for node, uid, sa in (("n1", "uid-client", "client"), ("n2", "uid-web", "web")):
        key, csr = make_key_and_csr()
        d = tmp / node
        d.mkdir(exist_ok=True)
        (d / f"{uid}.key").write_bytes(key)
        (d / f"{uid}.crt").write_bytes(ca.sign(csr, spiffe.workload_id("mesh.test", "ns", sa)).certificate_pem)
        (d / "trust-bundle.pem").write_bytes(ca.bundle_pem())
    client = CertReader(tmp / "n1").context("uid-client", server=False)
    server = CertReader(tmp / "n2").context("uid-web", server=True)
    assert client is not None and server is not None
    return client, server


def pump(client: TlsSession, server: TlsSession, to_server: bytes = b"", to_client: bytes = b"") -> tuple[bytes, bytes]:
    """Move bytes both ways until quiet; (plaintext the server read, plaintext the client read).
    `to_server`: the client's records on the wire; `to_client`: the server's."""
    got_s, got_c = [], []
    wire = to_server
    for i in range(64):
        if wire:
            plain, _ = server.receive(wire)
            got_s.append(plain)
        back = (to_client if i == 0 else b"") + server.output()
        if back:
            plain, _ = client.receive(back)
            got_c.append(plain)
        wire = client.output()
        if not wire and not back:
            break
    return b"".join(got_s), b"".join(got_c)


def established(cctx: ssl.SSLContext, sctx: ssl.SSLContext,
                session: ssl.SSLSession | None = None) -> tuple[TlsSession, TlsSession]:
    client = TlsSession(cctx, server_side=False, server_hostname="tunnel.nodemesh.invalid", session=session)
    server = TlsSession(sctx, server_side=True)
    pump(client, server, client.start())
    assert client.handshaken and server.handshaken
    return client, server


# ------------------------------------------------------------------ per connection (today)
def per_connection(cctx: ssl.SSLContext, sctx: ssl.SSLContext, n: int, resume: bool) -> float:
    """CPU-µs per short connection: handshake (resumed or full), CONNECT head + 1 KB each way, close."""
    client, server = established(cctx, sctx)
    pump(client, server, client.send(b"warm"))            # the ticket arrives with the first records
    ticket = client.obj.session if resume else None
    t0 = time.process_time()
    for _ in range(n):
        client, server = established(cctx, sctx, ticket)
        got, _ = pump(client, server, client.send(connect_head(("10.244.2.7", 8080)) + REQUEST))
        target, rest, _err = parse_head(got)
        assert target is not None and rest == REQUEST
        _, answer = pump(client, server, to_client=server.send(REQUEST))
        assert answer == REQUEST
        pump(client, server, client.shut())
        pump(client, server, to_client=server.shut())
    return (time.process_time() - t0) / n * 1e6


def bulk_tls(cctx: ssl.SSLContext, sctx: ssl.SSLContext, mb: int) -> float:
    """CPU-ms per MB through one TLS tunnel in 64 KB writes (records encrypted and decrypted)."""
    client, server = established(cctx, sctx)
    block = b"b" * CHUNK
    total = mb << 20
    t0 = time.process_time()
    sent = 0
    while sent < total:
        got, _ = pump(client, server, client.send(block))
        sent += len(block)
        assert len(got) == CHUNK
    return (time.process_time() - t0) / mb * 1e3


# ------------------------------------------------------------------ HTTP/2 CONNECT (HBONE's shape)
class H2Pair:
    def __init__(self, client: TlsSession, server: TlsSession) -> None:
        self.tls_c, self.tls_s = client, server
        self.c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.s = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        big = 1 << 24
        self.c.initiate_connection()
        self.c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: big,
                                h2.settings.SettingCodes.MAX_FRAME_SIZE: 1 << 20})
        self.s.initiate_connection()
        self.s.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: big,
                                h2.settings.SettingCodes.MAX_FRAME_SIZE: 1 << 20})
        # The connection's own window is not a setting: each receiver opens it (as HBONE peers do).
        self.c.increment_flow_control_window(big)
        self.s.increment_flow_control_window(big)
        self.exchange()

    def exchange(self) -> tuple[list[h2.events.Event], list[h2.events.Event]]:
        """Both h2 ends' pending bytes through TLS, until quiet; (server events, client events)."""
        ev_s: list[h2.events.Event] = []
        ev_c: list[h2.events.Event] = []
        for _ in range(64):
            out_c, out_s = self.c.data_to_send(), self.s.data_to_send()
            if not out_c and not out_s:
                break
            plain_s, plain_c = pump(self.tls_c, self.tls_s, self.tls_c.send(out_c) if out_c else b"",
                                    self.tls_s.send(out_s) if out_s else b"")
            if plain_s:
                for ev in self.s.receive_data(plain_s):
                    ev_s.append(ev)
                    if isinstance(ev, h2.events.DataReceived):
                        self.s.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if plain_c:
                for ev in self.c.receive_data(plain_c):
                    ev_c.append(ev)
                    if isinstance(ev, h2.events.DataReceived):
                        self.c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        return ev_s, ev_c


def h2_connect(cctx: ssl.SSLContext, sctx: ssl.SSLContext, n: int) -> float:
    pair = H2Pair(*established(cctx, sctx))
    t0 = time.process_time()
    for _ in range(n):
        sid = pair.c.get_next_available_stream_id()
        pair.c.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"10.244.2.7:8080")])
        pair.c.send_data(sid, REQUEST)
        ev_s, _ = pair.exchange()
        assert any(isinstance(e, h2.events.RequestReceived) for e in ev_s)
        assert b"".join(e.data for e in ev_s if isinstance(e, h2.events.DataReceived)) == REQUEST
        pair.s.send_headers(sid, [(b":status", b"200")])
        pair.s.send_data(sid, REQUEST, end_stream=True)
        pair.c.end_stream(sid)
        _, ev_c = pair.exchange()
        assert b"".join(e.data for e in ev_c if isinstance(e, h2.events.DataReceived)) == REQUEST
    return (time.process_time() - t0) / n * 1e6


def bulk_h2(cctx: ssl.SSLContext, sctx: ssl.SSLContext, mb: int) -> float:
    pair = H2Pair(*established(cctx, sctx))
    sid = pair.c.get_next_available_stream_id()
    pair.c.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"10.244.2.7:8080")])
    pair.exchange()
    block = b"b" * CHUNK
    total = mb << 20
    t0 = time.process_time()
    sent = 0
    while sent < total:
        pair.c.send_data(sid, block)
        ev_s, _ = pair.exchange()
        sent += len(block)
        assert sum(len(e.data) for e in ev_s if isinstance(e, h2.events.DataReceived)) == CHUNK
    return (time.process_time() - t0) / mb * 1e3


# ------------------------------------------------------------------ minimal framing
HEAD = struct.Struct("!IHH")   # stream, flags, length (a chunk ≤ 64 KB - 1 per frame)
OPEN, DATA, FIN = 1, 2, 4


class Deframer:
    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buf = self.buf + data if self.buf else data
        out = []
        at = 0
        size = HEAD.size
        while len(buf) - at >= size:
            stream, flags, length = HEAD.unpack_from(buf, at)
            if len(buf) - at - size < length:
                break
            out.append((stream, flags, buf[at + size:at + size + length]))
            at += size + length
        self.buf = buf[at:]
        return out


def frame(stream: int, flags: int, payload: bytes) -> bytes:
    if len(payload) < 0xFFFF:
        return HEAD.pack(stream, flags, len(payload)) + payload
    parts = [payload[i:i + 0xFFFF] for i in range(0, len(payload), 0xFFFF)]
    return b"".join(HEAD.pack(stream, flags if i == len(parts) - 1 else DATA, len(p)) + p
                    for i, p in enumerate(parts))


def frames(cctx: ssl.SSLContext, sctx: ssl.SSLContext, n: int) -> float:
    client, server = established(cctx, sctx)
    dc, ds = Deframer(), Deframer()
    t0 = time.process_time()
    for sid in range(1, n + 1):
        got, _ = pump(client, server, client.send(frame(sid, OPEN, b"10.244.2.7:8080") + frame(sid, DATA, REQUEST)))
        (s1, f1, target), (s2, f2, body) = ds.feed(got)
        assert (s1, f1, target, s2, f2, body) == (sid, OPEN, b"10.244.2.7:8080", sid, DATA, REQUEST)
        _, back = pump(client, server, to_client=server.send(frame(sid, DATA | FIN, REQUEST)))
        ((s3, f3, answer),) = dc.feed(back)
        assert s3 == sid and answer == REQUEST and f3 & FIN
        got, _ = pump(client, server, client.send(frame(sid, FIN, b"")))
        assert ds.feed(got) == [(sid, FIN, b"")]
    return (time.process_time() - t0) / n * 1e6


def bulk_frames(cctx: ssl.SSLContext, sctx: ssl.SSLContext, mb: int) -> float:
    client, server = established(cctx, sctx)
    ds = Deframer()
    block = b"b" * CHUNK
    total = mb << 20
    t0 = time.process_time()
    sent = 0
    while sent < total:
        got, _ = pump(client, server, client.send(frame(1, DATA, block)))
        sent += len(block)
        assert sum(len(p) for _, _, p in ds.feed(got)) == CHUNK or ds.buf
    return (time.process_time() - t0) / mb * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=300)
    ap.add_argument("--mb", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cctx, sctx = contexts(Path(tmp))
        rows: list[tuple[str, Callable[[], float], str]] = [
            ("per-connection TLS, full handshake", lambda: per_connection(cctx, sctx, args.connections // 3, False),
             "µs/conn"),
            ("per-connection TLS, resumed (today)", lambda: per_connection(cctx, sctx, args.connections, True),
             "µs/conn"),
            ("h2 CONNECT stream on one TLS session", lambda: h2_connect(cctx, sctx, args.connections), "µs/conn"),
            ("minimal frames on one TLS session", lambda: frames(cctx, sctx, args.connections), "µs/conn"),
            ("bulk: TLS records only (today)", lambda: bulk_tls(cctx, sctx, args.mb), "ms/MB"),
            ("bulk: h2 DATA frames in TLS", lambda: bulk_h2(cctx, sctx, args.mb), "ms/MB"),
            ("bulk: minimal frames in TLS", lambda: bulk_frames(cctx, sctx, args.mb), "ms/MB"),
        ]
        print(f"CPU of both agents' ends, in one process; min / median of {args.runs} runs "
              f"({args.connections} short connections of 1 KB each way; {args.mb} MB in 64 KB writes)")
        for name, fn, unit in rows:
            got = sorted(fn() for _ in range(args.runs))
            print(f"  {name:40s} {got[0]:9.1f} / {got[len(got) // 2]:9.1f} {unit}")


if __name__ == "__main__":
    main()
