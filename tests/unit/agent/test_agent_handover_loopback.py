"""agent/handover.py on loopback, no root: two proxies in one process stand for the draining agent
and the newer one; the sockets really travel over an abstract SEQPACKET socket (SCM_RIGHTS)."""

from __future__ import annotations

import asyncio
import socket
import uuid
from typing import Any

from loopback_relay import run, serve, wait_until
from nodemesh.agent import handover
from nodemesh.agent.drain import drain
from nodemesh.agent.handover import Handover, Receiver, Successor
from nodemesh.agent.observe import ConnectionEnd, ConnectionMeta, RequestEnd, RequestHead
from nodemesh.agent.relay import WorkerContext

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


class Recorder:
    def __init__(self) -> None:
        self.opens: list[ConnectionMeta] = []
        self.closes: list[ConnectionEnd] = []
        self.requests: list[str] = []

    def connection_open(self, meta: ConnectionMeta) -> Any:
        self.opens.append(meta)
        return meta

    def connection_endpoint(self, conn: Any, endpoint: tuple[str, int]) -> None:
        pass

    def connection_close(self, conn: Any, end: ConnectionEnd) -> None:
        self.closes.append(end)

    def request_start(self, conn: Any, head: RequestHead) -> Any:
        self.requests.append(head.path)
        return head

    def response_start(self, req: Any, status: int, headers: list[tuple[str, str]], at: float) -> None:
        pass

    def request_end(self, req: Any, end: RequestEnd) -> None:
        pass


async def _proxy(upstream: tuple[str, int]) -> tuple[asyncio.Server, int, WorkerContext, Recorder]:
    rec = Recorder()
    # splice_after_bytes=0: an opaque connection is spliced (agent/splice.py) after its first
    # chunk, so its hand-over is the spliced one's.
    server, port, ctx = await serve(rec, upstream, splice_after_bytes=0)
    return server, port, ctx, rec


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _http_server(delay: float, heads: list[bytes]) -> tuple[asyncio.Server, int]:
    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                heads.append(head)
                await asyncio.sleep(delay)
                w.write(RESPONSE)
                if b"connection: close" in head.lower():
                    break
        except asyncio.IncompleteReadError:
            pass
        w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _successor(receiver: Receiver) -> Successor:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(2.0)
    sock.connect("\0" + receiver.name)
    return Successor(sock, receiver.name)


async def _get(r: asyncio.StreamReader, w: asyncio.StreamWriter, path: str) -> bytes:
    w.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
    return head + await asyncio.wait_for(r.readexactly(5), 5)


def _agent_id() -> int:
    return 10_000_000 + uuid.uuid4().int % 1_000_000  # a name no other test (or agent) uses


def test_tcp_and_idle_http1_move_live_and_metrics_continue() -> None:
    async def scenario() -> None:
        echo_srv, echo_port = await _echo_server()
        http_srv, http_port = await _http_server(0.0, [])
        old_srv, old_port, old_ctx, old_rec = await _proxy(("127.0.0.1", echo_port))
        # A second listener of the old agent for HTTP (the picker maps one address per proxy).
        old_http_srv, old_http_port, old_http_ctx, old_http_rec = await _proxy(("127.0.0.1", http_port))
        _, _, new_ctx, new_rec = await _proxy(("127.0.0.1", 1))
        receiver = Receiver({"outbound": new_ctx, "inbound": new_ctx}, _agent_id(), 0)
        assert receiver.start()
        er, ew = await asyncio.open_connection("127.0.0.1", old_port)
        hr, hw = await asyncio.open_connection("127.0.0.1", old_http_port)
        ew.write(b"before\n")
        assert await asyncio.wait_for(er.readexactly(7), 5) == b"before\n"
        assert (await _get(hr, hw, "/one")).endswith(b"hello")
        assert await wait_until(lambda: all(c.mode is not None and (c.up is not None or c.splice is not None)
                                            for c in old_ctx.live | old_http_ctx.live))
        # The opaque one is relayed by splice(2) (agent/splice.py): it moves all the same.
        assert [c.splice is not None for c in old_ctx.live] == [True]
        successor = _successor(receiver)
        aborted = await drain([old_srv, old_http_srv], [old_ctx, old_http_ctx], 5.0,
                              Handover(successor, [old_ctx, old_http_ctx]))
        assert aborted == 0
        assert not old_ctx.live and not old_http_ctx.live
        assert await wait_until(lambda: len(new_ctx.live) == 2)
        # The same client sockets, now relayed by the new proxy.
        ew.write(b"after\n")
        assert await asyncio.wait_for(er.readexactly(6), 5) == b"after\n"
        got = await _get(hr, hw, "/two")
        assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"hello")
        assert new_rec.requests == ["/two"]  # the new HTTP/1 mode classifies from the boundary on
        # Counted once across both: the old side closed nothing, the new side opened nothing new.
        assert [e.handed_over for e in old_rec.closes + old_http_rec.closes] == [True, True]
        assert [(m.adopted, m.protocol) for m in sorted(new_rec.opens, key=lambda m: m.protocol)] == \
            [(True, "http1"), (True, "tcp")]
        assert {m.started for m in new_rec.opens} == {m.started for m in old_rec.opens + old_http_rec.opens}
        ew.write_eof()
        assert await asyncio.wait_for(er.read(), 5) == b""
        ew.close()
        hw.close()
        assert await wait_until(lambda: len(new_rec.closes) == 2)
        assert all(not e.handed_over and e.read_bytes > 0 for e in new_rec.closes)
        receiver.close()
        for srv in (echo_srv, http_srv):
            srv.close()
        await asyncio.sleep(0.2)

    run(scenario)


def test_busy_http1_moves_at_the_request_boundary_without_connection_close() -> None:
    """A request in flight when the drain begins: the connection moves once its response is out,
    and the server never sees `Connection: close` (the next request goes through the new agent)."""

    async def scenario() -> None:
        heads: list[bytes] = []
        http_srv, http_port = await _http_server(0.3, heads)
        old_srv, old_port, old_ctx, old_rec = await _proxy(("127.0.0.1", http_port))
        _, _, new_ctx, new_rec = await _proxy(("127.0.0.1", 1))
        receiver = Receiver({"outbound": new_ctx, "inbound": new_ctx}, _agent_id(), 0)
        assert receiver.start()
        r, w = await asyncio.open_connection("127.0.0.1", old_port)
        assert (await _get(r, w, "/warm")).endswith(b"hello")
        w.write(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        draining = loop.create_task(drain([old_srv], [old_ctx], 5.0, Handover(_successor(receiver), [old_ctx])))
        await asyncio.sleep(0.1)
        assert len(old_ctx.live) == 1 and not new_ctx.live  # in flight: stays
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and await r.readexactly(5) == b"hello"
        assert await asyncio.wait_for(draining, 5) == 0
        assert len(new_ctx.live) == 1
        assert (await _get(r, w, "/next")).endswith(b"hello")
        assert not any(b"connection: close" in h.lower() for h in heads), heads
        assert old_rec.requests == ["/warm", "/slow"] and new_rec.requests == ["/next"]
        w.close()
        receiver.close()
        http_srv.close()
        await asyncio.sleep(0.2)  # the server's handler sees the close and ends

    run(scenario)


def test_a_worker_hands_over_only_to_another_agent_speaking_its_version() -> None:
    async def scenario() -> None:
        _, _, ctx, _ = await _proxy(("127.0.0.1", 1))
        mine, theirs = _agent_id(), _agent_id()
        receiver = Receiver({"outbound": ctx, "inbound": ctx}, mine, 1)
        assert receiver.start()
        other_version = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        other_version.bind(f"\0nodemesh/handover/{theirs}.0.v0")
        other_version.listen(1)
        try:
            assert receiver.name in handover.successors(theirs)
            assert receiver.name not in handover.successors(mine)      # never a sibling
            assert not any(n.endswith(".v0") for n in handover.successors(mine))
            found = Successor.find(theirs, 1)
            assert found is not None and found.name == receiver.name
            found.close()
        finally:
            other_version.close()
            receiver.close()
        assert receiver.name not in handover.successors(theirs)      # closed when it drains itself

    run(scenario)


def test_receiver_rejects_bad_messages_and_closes_their_sockets() -> None:
    async def scenario() -> None:
        _, _, new_ctx, new_rec = await _proxy(("127.0.0.1", 1))
        receiver = Receiver({"outbound": new_ctx, "inbound": new_ctx}, _agent_id(), 0)
        assert receiver.start()
        link = _successor(receiver).sock
        cases = [b"not json", b'{"mode":"http2","meta":{}}',
                 (b'{"mode":"tcp","meta":{"conn_id":1,"direction":"sideways","source":["a",1],'
                 b'"original_destination":["b",2],"destination":["b",2]}}')]
        peers = []
        for payload in cases:
            ours, theirs = socket.socketpair()
            up_ours, up_theirs = socket.socketpair()
            socket.send_fds(link, [payload], [theirs.fileno(), up_theirs.fileno()])
            theirs.close()
            up_theirs.close()
            peers += [ours, up_ours]
        # One fd only: rejected too.
        ours, theirs = socket.socketpair()
        socket.send_fds(link, [b"{}"], [theirs.fileno()])
        theirs.close()
        peers.append(ours)
        for p in peers:
            p.setblocking(False)
        loop = asyncio.get_running_loop()
        for p in peers:
            assert await asyncio.wait_for(loop.sock_recv(p, 10), 5) == b""  # closed by the receiver
            p.close()
        assert not new_ctx.live and not new_rec.opens and receiver.adopted == 0
        link.close()
        receiver.close()

    run(scenario)


def test_decode_round_trip() -> None:
    meta = ConnectionMeta(7, "inbound", ("10.0.0.1", 1234), ("10.0.0.2", 80), ("10.0.0.3", 8080),
                          protocol="http1", started=12.5, endpoint=("10.0.0.4", 80))

    class _Conn:
        pass

    conn: Any = _Conn()
    conn.meta = meta
    conn.mode = _Conn()
    conn.mode.exchange = _Conn()
    conn.mode.exchange.ordinal = 3
    kind, got, state = handover.decode(handover.encode(conn, handover.HTTP1))
    assert (kind, got, state["ordinal"]) == (handover.HTTP1, meta, 3)


# -- HTTP/2: the classifier's state moves as plain data ------------------------------------------


def _h2_conversation() -> list[tuple[bool, bytes]]:
    """A gRPC-ish conversation between two real `h2` peers, as the relay sees it: (from_client, bytes)
    in order. Custom headers go into both HPACK dynamic tables; streams overlap."""
    import h2.config
    import h2.connection

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    client.initiate_connection()
    server.initiate_connection()
    out: list[tuple[bool, bytes]] = []

    def pump() -> None:
        c = client.data_to_send()
        if c:
            out.append((True, c))
            server.receive_data(c)
        s = server.data_to_send()
        if s:
            out.append((False, s))
            client.receive_data(s)

    pump()
    for sid in (1, 3, 5, 7):
        client.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", f"/pkg.Svc/M{sid % 3}"),
                                  (":authority", "svc:80"), ("content-type", "application/grpc"),
                                  ("x-request-tag", f"tag-{sid}"), ("te", "trailers")])
        client.send_data(sid, b"\x00\x00\x00\x00\x05hello" * 40)
        pump()
        server.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc"),
                                  ("x-served-by", f"pod-{sid % 2}")])
        server.send_data(sid, b"\x00\x00\x00\x00\x03abc" * (20 + sid))
        pump()
        if sid >= 3:  # each finishes one stream later: one is always open at the split points
            done = sid - 2
            client.end_stream(done)
            server.send_headers(done, [("grpc-status", str(done % 3))], end_stream=True)
            pump()
    client.end_stream(7)
    server.send_headers(7, [("grpc-status", "0")], end_stream=True)
    pump()
    return out


def _summary(events: list[tuple[int, object]]) -> list[tuple[object, ...]]:
    from nodemesh.agent import http2

    out: list[tuple[object, ...]] = []
    for kind, arg in events:
        if isinstance(arg, http2.H2Stream):
            out.append((kind, arg.stream_id, arg.method, arg.path, arg.authority, arg.grpc, arg.status))
            if kind == http2.STREAM_END:  # its final counts (bytes of a chunk come after its events)
                out.append((arg.grpc_status, arg.request_bytes, arg.response_bytes, arg.reset_error))
        else:
            out.append((kind, arg))
    return out


def test_h2_relay_snapshot_restores_the_classifier_anywhere_mid_conversation() -> None:
    """Cut the conversation at every chunk boundary and inside chunks (mid-frame, mid-header): a
    relay restored from the first one's snapshot (through JSON, as it travels) sees exactly what
    one relay fed everything sees — the HPACK tables in step, open streams carried on."""
    import json as _json

    from nodemesh.agent.http2 import H2Classifier

    chunks = _h2_conversation()
    whole = H2Classifier()
    expected: list[tuple[int, object]] = []
    for from_client, data in chunks:
        expected += _summary(whole.feed_client(data) if from_client else whole.feed_server(data))
    assert [e[0] for e in expected if len(e) == 4] == [1, 0, 2, 0]  # grpc statuses were classified
    cuts = 0
    for i, (_, data) in enumerate(chunks):
        for offset in sorted({0, 1, 5, 9, 10, 11, len(data) // 2, len(data) - 1}):
            if offset >= len(data):
                continue
            first, got = H2Classifier(), []
            for from_client, d in chunks[:i]:
                got += _summary(first.feed_client(d) if from_client else first.feed_server(d))
            from_client, d = chunks[i]
            got += _summary(first.feed_client(d[:offset]) if from_client else first.feed_server(d[:offset]))
            second = H2Classifier.restored(_json.loads(_json.dumps(first.snapshot())))
            got += _summary(second.feed_client(d[offset:]) if from_client else second.feed_server(d[offset:]))
            for from_client, d in chunks[i + 1:]:
                got += _summary(second.feed_client(d) if from_client else second.feed_server(d))
            assert got == expected, (i, offset)
            assert not second.streams and not second.failed
            cuts += 1
    assert cuts > 50


def test_a_connection_whose_client_has_not_spoken_moves_and_is_detected_over_there() -> None:
    """A pool's connection opened ahead of its first request is still undetected (relay.py waits
    for the client's first bytes): it moves as it is, and the new agent detects and counts it."""
    async def scenario() -> None:
        http_srv, http_port = await _http_server(0.0, [])
        old_srv, old_port, old_ctx, old_rec = await _proxy(("127.0.0.1", http_port))
        _, _, new_ctx, new_rec = await _proxy(("127.0.0.1", 1))
        receiver = Receiver({"outbound": new_ctx, "inbound": new_ctx}, _agent_id(), 0)
        assert receiver.start()
        hr, hw = await asyncio.open_connection("127.0.0.1", old_port)
        # Past the detection timeout, connected upstream, nothing said.
        assert await wait_until(lambda: all(c.up is not None and c.detect_timer is None and c.mode is None
                                            for c in old_ctx.live) and len(old_ctx.live) == 1, timeout=5)
        handover_ = Handover(_successor(receiver), [old_ctx])
        assert await drain([old_srv], [old_ctx], 5.0, handover_) == 0
        assert not old_ctx.live and old_rec.opens == [] and old_rec.closes == []  # never counted there
        assert await wait_until(lambda: len(new_ctx.live) == 1)
        got = await _get(hr, hw, "/first")
        assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"hello")
        assert new_rec.requests == ["/first"]
        assert [(m.adopted, m.protocol) for m in new_rec.opens] == [(False, "http1")]  # counted once, here
        hw.close()
        assert await wait_until(lambda: len(new_rec.closes) == 1)
        receiver.close()
        http_srv.close()

    run(scenario)
