"""Sans-IO parsers of the traffic path, fed plain byte strings (and fuzzed)."""

from __future__ import annotations

import random

import h2.config
import h2.connection
import h2.events
from hypothesis import given, settings
from hypothesis import strategies as st
from nodemesh.agent import http1, http2
from nodemesh.agent.detect import H2_PREFACE, HTTP1, HTTP2, NEED_MORE, TCP, TLS, detect
from nodemesh.agent.endpoints import EndpointPicker
from nodemesh.agent.http1 import Http1Exchange
from nodemesh.agent.http2 import H2Classifier


# A ClientHello for "example.com" (TLS 1.2 record), built by hand: enough for SNI parsing.
def _client_hello(name: bytes) -> bytes:
    sni = b"\x00\x00" + (len(name) + 5).to_bytes(2, "big") + (len(name) + 3).to_bytes(2, "big") + b"\x00" \
        + len(name).to_bytes(2, "big") + name
    body = b"\x03\x03" + b"r" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + len(sni).to_bytes(2, "big") + sni
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs


def test_detect_protocols() -> None:
    assert detect(H2_PREFACE).protocol == HTTP2
    assert detect(H2_PREFACE[:10]).protocol == NEED_MORE
    assert detect(b"GET / HTTP/1.1\r\n").protocol == HTTP1
    assert detect(b"GE").protocol == NEED_MORE
    assert detect(b"GET /very/long").protocol == NEED_MORE
    assert detect(b"\x0a\x00\x00\x00mysql").protocol == TCP
    assert detect(b"SSH-2.0-OpenSSH\r\n").protocol == TCP
    hello = _client_hello(b"example.com")
    assert detect(hello) == detect(hello) and detect(hello).protocol == TLS
    assert detect(hello).sni == "example.com"
    assert detect(hello[:20]).protocol == NEED_MORE


def _events(events: list[http1.Event]) -> list[tuple[int, object]]:
    return [(k, getattr(a, "ordinal", a)) for k, a in events]


def test_http1_pipelined_keepalive_head_and_1xx() -> None:
    x = Http1Exchange()
    reqs = (b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
            b"HEAD /b HTTP/1.1\r\nHost: h\r\n\r\n"
            b"POST /c HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello")
    assert _events(x.feed_request(reqs)) == [(http1.REQUEST_HEAD, 1), (http1.REQUEST_HEAD, 2), (http1.REQUEST_HEAD, 3)]
    resp = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    # Fed one byte at a time: classification must not depend on how TCP splits the stream.
    events = []
    for i in range(len(resp)):
        events += x.feed_response(resp[i:i + 1])
    ends = [a for k, a in events if k == http1.EXCHANGE_END]
    assert [(r.ordinal, r.status, r.response_bytes, r.request_bytes) for r in ends] == [
        (1, 200, 2, 0), (2, 200, 0, 0), (3, 201, 3, 5)]
    assert x.idle and x.split_pending == 0   # the HEAD counted out again: whole reads from now on


def test_http10_and_connection_close_until_eof() -> None:
    x = Http1Exchange()
    x.feed_request(b"GET / HTTP/1.0\r\n\r\n")
    events = x.feed_response(b"HTTP/1.0 200 OK\r\n\r\nbody until close")
    assert [k for k, _ in events] == [http1.RESPONSE_HEAD]
    (req,) = x.close()
    assert req.status == 200 and req.response_bytes == len(b"body until close") and req.request_done


def test_http1_errors() -> None:
    x = Http1Exchange()
    assert x.feed_request(b"GET / HTTP/1.1\r\nX: " + b"a" * 70000) == [(http1.CLIENT_ERROR, 431)]
    x = Http1Exchange()
    assert x.feed_request(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n") == [(http1.CLIENT_ERROR, 400)]
    x = Http1Exchange()
    x.feed_request(b"GET / HTTP/1.1\r\n\r\n")
    assert [k for k, _ in x.feed_response(b"SSH-2.0-nope\r\n")] == [http1.UPSTREAM_ERROR]



def test_http1_pipelined_read_is_not_counted_as_one_head() -> None:
    # One read (uvloop reads up to 256 KB) with many pipelined requests and the start of one more:
    # only the unfinished head counts towards the 64 KB limit, not the requests before it.
    x = Http1Exchange()
    events = x.feed_request(b"GET /p HTTP/1.1\r\nHost: h\r\n\r\n" * 3000 + b"GET /last HTTP/1.1\r\nHo")
    assert [k for k, _ in events] == [http1.REQUEST_HEAD] * 3000
    assert _events(x.feed_request(b"st: h\r\n\r\n")) == [(http1.REQUEST_HEAD, 3001)]
    # Same with a large body before the next head.
    x = Http1Exchange()
    body = b"b" * 100_000
    events = x.feed_request(b"POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n" + body + b"GET /n HTT")
    assert [k for k, _ in events] == [http1.REQUEST_HEAD]
    assert [k for k, _ in x.feed_request(b"P/1.1\r\n\r\n")] == [http1.REQUEST_HEAD]
    # An unfinished header line that began in an earlier read still trips the limit.
    x = Http1Exchange()
    x.feed_request(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\nX: ")
    assert x.feed_request(b"a" * 70000) == [(http1.CLIENT_ERROR, 431)]

def test_http1_upgrade_to_websocket_and_declined_h2c() -> None:
    x = Http1Exchange()
    x.feed_request(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    kinds = [k for k, _ in x.feed_response(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                                           b"Upgrade: websocket\r\n\r\n\x81\x02hi")]
    assert kinds == [http1.RESPONSE_HEAD, http1.EXCHANGE_END, http1.UPGRADED]
    assert x.feed_request(b"\x81\x82garbage") == []
    x = Http1Exchange()
    x.feed_request(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                   b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n")
    x.feed_response(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert [k for k, _ in x.feed_request(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")] == [http1.REQUEST_HEAD]


def test_http1_drain_adds_connection_close_to_next_request() -> None:
    x = Http1Exchange()
    data = b"GET / HTTP/1.1\r\nHost: h\r\n\r\nGET /second HTTP/1.1\r\nHost: h\r\n\r\n"
    events, out, done = x.feed_request_closing(data)
    assert done and out == b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    assert len(events) == 1



def test_http1_drain_forwards_the_body_of_the_request_it_closes() -> None:
    # The request that gets `Connection: close` may have a body: the server waits for it, so it
    # must be forwarded whole (else the request hangs until the drain grace aborts it).
    x = Http1Exchange()
    events, out, done = x.feed_request_closing(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhel")
    assert out == b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhel"
    assert not done and [k for k, _ in events] == [http1.REQUEST_HEAD]
    events, out, done = x.feed_request_closing(b"lo")
    assert out == b"lo" and done
    # Chunked, the body's end in the same read as a pipelined request: that one is not forwarded.
    x = Http1Exchange()
    events, out, done = x.feed_request_closing(
        b"PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
    assert done and out == (b"PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                            b"3\r\nabc\r\n0\r\n\r\n")
    assert [k for k, _ in events] == [http1.REQUEST_HEAD]

def _h2_pair() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    client.initiate_connection()
    server.initiate_connection()
    return client, server


def test_http2_grpc_unary_trailers_only_and_reset() -> None:
    client, server = _h2_pair()
    relay = H2Classifier()
    events: list[http2.Event] = []

    def pump() -> None:
        c = client.data_to_send()
        if c:
            events.extend(relay.feed_client(c))
            server.receive_data(c)
        s = server.data_to_send()
        if s:
            events.extend(relay.feed_server(s))
            client.receive_data(s)

    pump()
    grpc_req = [(":method", "POST"), (":scheme", "http"), (":path", "/pkg.Svc/Get"), (":authority", "svc:80"),
                ("content-type", "application/grpc"), ("te", "trailers")]
    client.send_headers(1, grpc_req)
    client.send_data(1, b"\x00\x00\x00\x00\x03abc", end_stream=True)
    client.send_headers(3, grpc_req, end_stream=True)
    client.send_headers(5, [(":method", "GET"), (":scheme", "http"), (":path", "/x"), (":authority", "a")],
                        end_stream=True)
    pump()
    server.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
    server.send_data(1, b"\x00\x00\x00\x00\x02ok")
    server.send_headers(1, [("grpc-status", "0")], end_stream=True)
    server.send_headers(3, [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "14")],
                        end_stream=True)
    server.reset_stream(5, error_code=8)
    pump()
    ends = {a.stream_id: a for k, a in events if k == http2.STREAM_END}
    assert ends[1].grpc and ends[1].status == 200 and ends[1].grpc_status == 0
    assert ends[1].request_bytes == 8 and ends[1].response_bytes == 7 and ends[1].reset_error is None
    assert ends[3].grpc_status == 14 and ends[3].path == "/pkg.Svc/Get"
    assert ends[5].reset_error == "CANCEL" and ends[5].status == 0
    assert not relay.streams
    # GOAWAY from the server excludes streams above its last id.
    client.send_headers(7, [(":method", "GET"), (":scheme", "http"), (":path", "/y"), (":authority", "a")],
                        end_stream=True)
    pump()
    server.close_connection(error_code=0, last_stream_id=5)
    pump()
    assert [a.reset_error for k, a in events if k == http2.STREAM_END][-1] == "REFUSED_STREAM"


def test_http2_drain_ping_ack_and_boundary() -> None:
    relay = H2Classifier()
    relay.feed_client(H2_PREFACE)
    assert relay.server.at_boundary
    ack = http2.frame(http2.PING, http2.ACK, 0, http2.DRAIN_PING)
    assert relay.feed_client(ack) == [(http2.DRAIN_ACKED, 0)]
    relay.server.mark_boundary = True
    relay.feed_server(http2.frame(http2.DATA, 0, 1, b"x" * 10)[:5])
    assert relay.server.boundary_at == 0


def test_http2_bad_hpack_is_compression_error() -> None:
    relay = H2Classifier()
    events = relay.feed_client(H2_PREFACE + http2.frame(http2.HEADERS, http2.END_HEADERS, 1, b"\x80"))
    assert events == [(http2.CLIENT_PROTOCOL_ERROR, 9)]


def test_http2_empty_header_name_is_a_header_not_a_crash() -> None:
    """HPACK can carry a field with an empty name (a literal with a zero-length name): the request is
    still classified (the server judges it), and the walker does not raise IndexError."""
    from hpack import Encoder

    block = Encoder().encode([(":method", "GET"), (":path", "/x"), (":authority", "svc")]) \
        + bytes([0x00, 0x00, 0x01]) + b"v"   # literal without indexing, name "" (0 octets), value "v"
    relay = H2Classifier()
    events = relay.feed_client(H2_PREFACE + http2.frame(http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, 1,
                                                        block))
    assert [kind for kind, _ in events] == [http2.REQUEST_HEAD]
    stream = events[0][1]
    assert isinstance(stream, http2.H2Stream)
    assert (stream.method, stream.path, stream.authority) == ("GET", "/x", "svc")
    assert stream.headers[-1] == ("", "v")


def test_endpoint_picker_prefers_less_loaded() -> None:
    class Index:
        def service_endpoints(self, ip: str, port: int) -> list[tuple[str, int]] | None:
            return [("10.0.0.1", 80), ("10.0.0.2", 80)] if (ip, port) == ("10.96.0.1", 80) else None

    picker = EndpointPicker(Index(), random.Random(1))
    assert picker.pick("10.1.1.1", 80) == ("10.1.1.1", 80)
    for _ in range(3):
        picker.acquire(("10.0.0.1", 80))
    assert {picker.pick("10.96.0.1", 80) for _ in range(20)} == {("10.0.0.2", 80)}
    assert EndpointPicker(None).pick("10.96.0.1", 80) == ("10.96.0.1", 80)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_detect(data: bytes) -> None:
    assert detect(data).protocol in (HTTP1, HTTP2, TLS, TCP, NEED_MORE)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048), st.binary(max_size=2048), st.integers(1, 64))
def test_fuzz_http1_never_raises(req: bytes, resp: bytes, step: int) -> None:
    x = Http1Exchange()
    for data in (b"GET / HTTP/1.1\r\nHost: h\r\n\r\n" + req, resp):
        for i in range(0, len(data), step):
            x.feed_request(data[i:i + step]) if data is not resp else x.feed_response(data[i:i + step])
    x.feed_request_closing(req)
    x.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048), st.binary(max_size=2048), st.integers(1, 64))
def test_fuzz_http2_never_raises(cdata: bytes, sdata: bytes, step: int) -> None:
    relay = H2Classifier()
    cdata = H2_PREFACE + cdata
    for i in range(0, max(len(cdata), len(sdata)), step):
        relay.feed_client(cdata[i:i + step])
        relay.feed_server(sdata[i:i + step])
    relay.close()
