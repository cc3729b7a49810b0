"""HTTP/2 fast paths decode and walk exactly like the plain versions: CachingDecoder vs hpack, whole vs split frames."""

from __future__ import annotations

import pytest
from hpack import Decoder, Encoder
from hpack.exceptions import HPACKError
from hypothesis import given, settings
from hypothesis import strategies as st
from nodemesh.agent.http2 import CachingDecoder

INDEXED_62 = bytes([0x80 | 62])  # "the newest dynamic table entry": same bytes, meaning follows the table


def test_same_block_follows_the_dynamic_table() -> None:
    enc, dec = Encoder(), CachingDecoder()
    assert dec.decode(enc.encode([("x-a", "1")])) == [("x-a", "1")]  # literal with indexing: inserts
    assert dec.decode(INDEXED_62) == [("x-a", "1")]
    assert dec.decode(INDEXED_62) == [("x-a", "1")]                   # served from the cache
    assert dec.decode(enc.encode([("x-b", "2")])) == [("x-b", "2")]  # a new newest entry
    assert dec.decode(INDEXED_62) == [("x-b", "2")]                   # not the stale cached answer


def test_table_size_update_and_allowed_size_invalidate() -> None:
    enc, dec = Encoder(), CachingDecoder()
    dec.decode(enc.encode([("x-a", "1")]))
    assert dec.decode(INDEXED_62) == [("x-a", "1")]
    dec.decode(bytes([0x20]))  # dynamic table size update to 0: the table is emptied
    with pytest.raises(HPACKError):  # an index past the (now empty) table
        dec.decode(INDEXED_62)
    dec2 = CachingDecoder()
    dec2.decode(Encoder().encode([("x-c", "3")]))
    assert dec2.decode(INDEXED_62) == [("x-c", "3")]
    dec2.max_allowed_table_size = 0  # the peer shrank it: the next block must be checked again
    with pytest.raises(HPACKError):  # table larger than allowed, no size update seen
        dec2.decode(INDEXED_62)


def test_returned_lists_are_not_shared() -> None:
    enc, dec = Encoder(), CachingDecoder()
    block = enc.encode([(":status", "200")])
    first = dec.decode(block)
    first.append(("mutated", "yes"))
    assert dec.decode(block) == [(":status", "200")]


names = st.sampled_from([":path", ":authority", "content-type", "grpc-status", "x-id", "te"])
values = st.sampled_from(["/a", "/b", "svc:80", "application/grpc", "0", "13", "trailers", "v" * 40])
blocks = st.lists(st.lists(st.tuples(names, values), min_size=1, max_size=5), min_size=1, max_size=30)


@settings(max_examples=150, deadline=None)
@given(blocks=blocks, table_size=st.sampled_from([0, 64, 256, 4096]), repeat=st.integers(1, 3))
def test_matches_plain_hpack_decoder(blocks: list[list[tuple[str, str]]], table_size: int, repeat: int) -> None:
    enc = Encoder()
    enc.header_table_size = table_size  # emits a size update in the next block
    plain, cached = Decoder(), CachingDecoder()
    for headers in blocks:
        for _ in range(repeat):  # repeated header sets: mostly indexed blocks, cache hits
            block = enc.encode(headers)
            assert cached.decode(block) == list(plain.decode(block)) == headers


# ------------------------------------------------------------------ H2 frame walker: whole vs split
def _conversation(n: int, body: int, pad: int, trailers: bool) -> tuple[bytes, bytes]:
    """A real h2 client/server exchange (the h2 library on both ends): what each side sent."""
    import h2.config
    import h2.connection

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    sent_c, sent_s = bytearray(), bytearray()

    def pump() -> None:
        for _ in range(4):
            c, s = client.data_to_send(), server.data_to_send()
            sent_c.extend(c)
            sent_s.extend(s)
            if c:
                server.receive_data(c)
            if s:
                client.receive_data(s)

    pump()
    for i in range(n):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", f"/svc/M{i % 3}"),
                                  (":authority", "svc:80"), ("content-type", "application/grpc")])
        client.send_data(sid, b"q" * body, end_stream=True, pad_length=pad or None)
        pump()
        server.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        server.send_data(sid, b"r" * (body + i), pad_length=pad or None)
        if trailers:
            server.send_headers(sid, [("grpc-status", str(i % 3))], end_stream=True)
        else:
            server.end_stream(sid)
        pump()
    return bytes(sent_c), bytes(sent_s)


def _summary(relay_events: list[tuple[int, object]]) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for kind, arg in relay_events:
        s = arg
        out.append((kind, getattr(s, "stream_id", arg), getattr(s, "path", None), getattr(s, "status", None),
                    getattr(s, "grpc_status", None), getattr(s, "request_bytes", None),
                    getattr(s, "response_bytes", None), getattr(s, "reset_error", None)))
    return out


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 6), body=st.integers(0, 300), pad=st.sampled_from([0, 7]),
       trailers=st.booleans(), cuts=st.lists(st.integers(1, 40), min_size=1, max_size=50))
def test_frame_walker_same_events_whole_or_split(n: int, body: int, pad: int, trailers: bool,
                                                 cuts: list[int]) -> None:
    from nodemesh.agent.http2 import H2Classifier

    cbytes, sbytes = _conversation(n, body, pad, trailers)

    def run(pieces: list[int] | None) -> list[tuple[object, ...]]:
        relay, events = H2Classifier(), []
        for data, feed in ((cbytes, relay.feed_client), (sbytes, relay.feed_server)):
            pos, i = 0, 0
            while pos < len(data):
                step = len(data) if pieces is None else pieces[i % len(pieces)]
                events += feed(data[pos:pos + step])
                pos, i = pos + step, i + 1
        return _summary(events)

    whole = run(None)
    assert len([e for e in whole if e[0] == 3]) == n  # every stream ended (STREAM_END)
    assert run(cuts) == whole
    assert run([1]) == whole


def test_header_block_in_continuations_then_whole_frames_in_the_same_read() -> None:
    """The walker's tight loop stops at an open header block; the CONTINUATIONs and the frames after
    them in the same read are walked as before, fed whole or byte by byte; a CONTINUATION with no
    block open is still a protocol error."""
    from nodemesh.agent.detect import H2_PREFACE
    from nodemesh.agent.http2 import (
        CLIENT_PROTOCOL_ERROR,
        CONTINUATION,
        DATA,
        END_HEADERS,
        END_STREAM,
        HEADERS,
        REQUEST_HEAD,
        RESPONSE_HEAD,
        STREAM_END,
        WINDOW_UPDATE,
        H2Classifier,
        frame,
    )

    block = Encoder().encode([(":method", "POST"), (":scheme", "http"), (":authority", "svc"),
                              (":path", "/pkg.Svc/Call"), ("content-type", "application/grpc"),
                              ("x-long", "v" * 300)])
    client = (H2_PREFACE + frame(4, 0, 0, b"") + frame(HEADERS, 0, 1, block[:100])
              + frame(CONTINUATION, 0, 1, block[100:200]) + frame(CONTINUATION, END_HEADERS, 1, block[200:])
              + frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x05") + frame(DATA, END_STREAM, 1, b"12345"))
    server_block = Encoder().encode([(":status", "200"), ("content-type", "application/grpc")])
    trailers = Encoder()
    trailers.encode([(":status", "200"), ("content-type", "application/grpc")])
    server = (frame(4, 0, 0, b"") + frame(HEADERS, END_HEADERS, 1, server_block) + frame(DATA, 0, 1, b"abc")
              + frame(HEADERS, END_HEADERS | END_STREAM, 1, trailers.encode([("grpc-status", "0")])))

    def run(step: int) -> list[tuple[object, ...]]:
        relay, events = H2Classifier(), []
        for data, feed in ((client, relay.feed_client), (server, relay.feed_server)):
            for pos in range(0, len(data), step):
                events += feed(data[pos:pos + step])
        return _summary(events)

    whole = run(len(client) + len(server))
    assert [e[0] for e in whole] == [REQUEST_HEAD, RESPONSE_HEAD, STREAM_END]
    assert whole[0][2] == "/pkg.Svc/Call"
    assert whole[-1][4:7] == (0, 5, 3)          # grpc-status 0; 5 request, 3 response octets
    assert run(1) == whole
    assert run(7) == whole

    stray = H2Classifier()
    events = stray.feed_client(H2_PREFACE + frame(DATA, 0, 1, b"x") + frame(CONTINUATION, END_HEADERS, 1, b""))
    assert events == [(CLIENT_PROTOCOL_ERROR, 1)]
