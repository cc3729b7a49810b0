"""The HTTP/1 classifier decodes headers only while its gate (telemetry: an open tap) wants them.

Checked on the classifier itself (sans-IO), as the tap sees it: request headers, response headers,
and what happens to a response that began before a tap opened.
"""

from __future__ import annotations

from nodemesh.agent import http1
from nodemesh.agent.http1 import Http1Exchange
from nodemesh.agent.tap import TapRegistry
from nodemesh.api.gen import nodemesh_pb2 as pb

REQ = b"GET /a HTTP/1.1\r\nHost: voting\r\nX-Req: 1\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\nX-Resp: 2\r\nContent-Length: 2\r\n\r\nok"


def _exchange(gate: TapRegistry) -> Http1Exchange:
    return Http1Exchange(gate=gate)


def _one(x: Http1Exchange, req: bytes = REQ, resp: bytes = RESP) -> http1.Http1Request:
    head = x.feed_request(req)
    assert head[0][0] == http1.REQUEST_HEAD
    r = head[0][1]
    assert isinstance(r, http1.Http1Request)
    events = x.feed_response(resp)
    assert [k for k, _ in events] == [http1.RESPONSE_HEAD, http1.EXCHANGE_END]
    return r


def test_no_tap_no_headers_but_authority_and_status() -> None:
    taps = TapRegistry()
    x = _exchange(taps)
    r = _one(x)
    # Nor the response's body bytes (only tap and the event log show them): no Python call and
    # no copy per body chunk while nobody looks.
    assert (r.authority, r.status, r.response_bytes, r.response_headers, r.headers) == ("voting", 200, 0, [], [])
    # Only the first Host counts, in any case, as when headers are collected.
    r = _one(x, b"GET / HTTP/1.1\r\nhOsT: first\r\nX-Long: 1\r\nHost: second\r\n\r\n")
    assert r.authority == "first" and r.headers == []
    taps.open("t", pb.TapFilter())
    r = _one(x, b"GET / HTTP/1.1\r\nhOsT: first\r\nX-Long: 1\r\nHost: second\r\n\r\n")
    assert r.authority == "first" and len(r.headers) == 3
    assert r.response_bytes == 2 and r.response_headers  # a tap open: counted and collected


def test_a_huge_request_head_is_bounded_with_or_without_a_tap() -> None:
    taps = TapRegistry()
    for _ in range(2):
        x = _exchange(taps)
        huge = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 20000 + b"\r\n"
        assert x.feed_request(huge) == [(http1.CLIENT_ERROR, 431)]
        taps.open("t", pb.TapFilter())


def test_tap_opened_between_responses_shows_the_next_response_headers() -> None:
    taps = TapRegistry()
    x = _exchange(taps)
    _one(x)
    taps.open("t", pb.TapFilter())
    r = _one(x)
    assert r.response_headers == [("X-Resp", "2"), ("Content-Length", "2")]
    assert ("X-Req", "1") in r.headers
    taps.close("t")
    r = _one(x)
    assert r.response_headers == [] and r.status == 200


def test_tap_opened_mid_response_costs_only_that_response() -> None:
    taps = TapRegistry()
    x = _exchange(taps)
    x.feed_request(REQ)
    assert x.feed_response(RESP[:20]) == []          # the response head has begun
    taps.open("t", pb.TapFilter())
    events = x.feed_response(RESP[20:])
    first = events[0][1]
    assert isinstance(first, http1.Http1Request)
    assert first.status == 200 and first.response_headers == []   # begun before the tap: none
    assert _one(x).response_headers == [("X-Resp", "2"), ("Content-Length", "2")]


def test_pipelined_responses_split_across_reads_after_a_tap_opens() -> None:
    taps = TapRegistry()
    x = _exchange(taps)
    x.feed_request(REQ + REQ)
    taps.open("t", pb.TapFilter())
    both = RESP + RESP
    ends = [k for k, _ in x.feed_response(both[:50])] + [k for k, _ in x.feed_response(both[50:])]
    assert ends.count(http1.EXCHANGE_END) == 2


def test_a_huge_response_head_is_bounded_only_while_collected() -> None:
    big = b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\nContent-Length: 0\r\n\r\n"
    taps = TapRegistry()
    x = _exchange(taps)
    x.feed_request(REQ)
    assert [k for k, _ in x.feed_response(big)] == [http1.RESPONSE_HEAD, http1.EXCHANGE_END]
    taps.open("t", pb.TapFilter())
    x = _exchange(taps)
    x.feed_request(REQ)
    assert [k for k, _ in x.feed_response(big)] == [http1.UPSTREAM_ERROR]


def test_body_bytes_counted_only_while_a_tap_looks_and_the_switch_waits_for_a_boundary() -> None:
    """Body byte counts (request_bytes, response_bytes) are shown only by tap and the event log;
    without them no body chunk reaches Python (httptools copies every chunk it hands to on_body:
    a bulk HTTP download cost 3x the CPU per MB with it, docs/bench.md). A tap opening switches
    the parser sides between messages, never inside one."""
    post = b"POST /up HTTP/1.1\r\nHost: up\r\nContent-Length: 5\r\n\r\nhello"
    taps = TapRegistry()
    x = _exchange(taps)
    r = _one(x, post)
    assert (r.request_bytes, r.response_bytes, r.request_done) == (0, 0, True)
    # Half a request, then a tap opens: this request stays uncounted, the next one is counted.
    head = x.feed_request(post[:-3])
    assert head[0][0] == http1.REQUEST_HEAD
    taps.open("t", pb.TapFilter())
    x.feed_request(post[-3:])
    half = head[0][1]
    assert isinstance(half, http1.Http1Request)
    x.feed_response(RESP)
    assert (half.request_bytes, half.request_done) == (0, True)
    r = _one(x, post)
    assert (r.request_bytes, r.response_bytes) == (5, 2)
    # The last tap closes: back to not counting, same connection, keep-alive intact.
    taps.close("t")
    r = _one(x, post)
    assert (r.request_bytes, r.response_bytes, r.status) == (0, 0, 200)
    # Chunked bodies too (the parser still follows them to find the next message).
    taps.open("t2", pb.TapFilter())
    chunked = b"POST /c HTTP/1.1\r\nHost: up\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    r = _one(x, chunked)
    assert r.request_bytes == 5 and r.request_done
