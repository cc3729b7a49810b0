"""Admission (sans-IO) and the detection timeout's settling, without sockets."""

from __future__ import annotations

from nodemesh.agent.admission import SHED_CAPACITY, SHED_FAIR_SHARE, Admission, capacity_for
from nodemesh.agent.detect import HTTP1, TCP, settle_on_timeout
from nodemesh.agent.housekeeping import TRIM_MIN_DROP, Housekeeping


def test_capacity_is_two_fds_a_connection_minus_a_reserve() -> None:
    assert capacity_for(20_000) == (20_000 - 128) // 2
    assert capacity_for(100) == 16


def test_below_high_water_everyone_gets_in() -> None:
    adm = Admission(100)
    assert all(adm.admit("10.0.0.1") is None for _ in range(80))
    assert adm.open == 80 and adm.by_source == {"10.0.0.1": 80}


def test_past_high_water_the_heavy_source_is_shed_and_a_newcomer_still_gets_in() -> None:
    adm = Admission(100)
    for _ in range(80):
        adm.admit("10.0.0.1")
    assert adm.admit("10.0.0.1") == SHED_FAIR_SHARE   # holds 80 of 100: more than its share of 100/2
    assert adm.admit("10.0.0.2") is None              # a new pod always gets in
    assert adm.admit("10.0.0.2") is None
    adm.release("10.0.0.1")
    adm.release("10.0.0.1")
    assert adm.open == 81 and adm.by_source == {"10.0.0.1": 79, "10.0.0.2": 2}


def test_full_is_full() -> None:
    adm = Admission(20)
    for i in range(20):
        adm.admit(f"10.0.0.{i}")
    assert adm.admit("10.0.1.1") == SHED_CAPACITY


def test_overloaded_shares_what_is_held_now() -> None:
    adm = Admission(10_000)
    for _ in range(200):
        adm.admit("10.0.0.1")   # a flood: few connections next to the capacity
    for _ in range(8):
        adm.admit("10.0.0.2")
    assert adm.admit("10.0.0.1") is None   # not overloaded: plenty of room
    adm.overloaded = True
    assert adm.admit("10.0.0.1") == SHED_FAIR_SHARE   # 201 of 210 held
    assert adm.admit("10.0.0.2") is None              # 8: under its share
    assert adm.admit("10.0.0.3") is None              # newcomer


def test_overloaded_alone_is_not_refused() -> None:
    adm = Admission(10_000)
    adm.overloaded = True
    assert all(adm.admit("10.0.0.1") is None for _ in range(500))


def test_slow_connections_are_capped_per_source() -> None:
    adm = Admission(1000, max_slow=3)
    assert [adm.mark_slow("a") for _ in range(4)] == [True, True, True, False]
    assert adm.mark_slow("b")
    adm.unmark_slow("a")
    assert adm.mark_slow("a")
    for _ in range(3):
        adm.unmark_slow("a")
    adm.unmark_slow("b")
    assert adm.slow == {}


def test_detection_timeout_settles_a_slow_request_head_on_http1() -> None:
    for data in (b"G", b"GE", b"POS", b"GET /index.html", b"GET / HTTP/1.1\r\nHost: x"):
        assert settle_on_timeout(data) == HTTP1, data
    for data in (b"", b"\x16\x03\x01", b"PRI * HTTP/2.0\r\n", b"SSH-2.0-x", b"\x00\x01"):
        assert settle_on_timeout(data) == TCP, data


def test_overload_needs_two_late_ticks_and_two_on_time_ones_to_clear() -> None:
    adm = Admission(100)
    hk = Housekeeping(adm)
    hk.lag(0.2)
    assert not adm.overloaded
    hk.lag(0.2)
    assert adm.overloaded
    hk.lag(0.0)
    assert adm.overloaded
    hk.lag(0.0)
    assert not adm.overloaded


def test_trim_after_a_mass_close_only() -> None:
    adm = Admission(100_000)
    hk = Housekeeping(adm)
    for _ in range(TRIM_MIN_DROP * 3):
        adm.admit("a")
    assert not hk.maybe_trim()                 # nothing closed
    for _ in range(TRIM_MIN_DROP):
        adm.release("a")
    assert not hk.maybe_trim()                 # a third closed: not a mass close
    for _ in range(TRIM_MIN_DROP):
        adm.release("a")
    assert not hk.maybe_trim()                 # two thirds gone, but still falling: wait
    assert hk.maybe_trim()                     # settled: give memory back
    assert adm.peak == adm.open == TRIM_MIN_DROP
    assert not hk.maybe_trim()


def test_http1_classifier_accepts_what_nginx_accepts() -> None:
    from nodemesh.agent import http1
    from nodemesh.agent.http1 import Http1Exchange

    x = Http1Exchange()   # bare LF line ends, both directions
    (kind, req), = x.feed_request(b"GET /ok HTTP/1.1\nHost: t\n\n")
    assert kind == http1.REQUEST_HEAD and (req.path, req.authority) == ("/ok", "t")
    kinds = [k for k, _ in x.feed_response(b"HTTP/1.1 200 OK\nContent-Length: 3\n\nok\n")]
    assert kinds == [http1.RESPONSE_HEAD, http1.EXCHANGE_END]
    x = Http1Exchange()   # an unknown version: counted, and nginx's 505 classified
    assert [k for k, _ in x.feed_request(b"GET /ok HTTP/9.9\r\nHost: t\r\n\r\n")] == [http1.REQUEST_HEAD]
    events = x.feed_response(b"HTTP/1.1 505 HTTP Version Not Supported\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert [(k, getattr(a, "status", None)) for k, a in events] == [(http1.RESPONSE_HEAD, 505), (http1.EXCHANGE_END, 505)]


def test_http1_valid_request_then_junk_counts_the_request_and_stops_following_the_client() -> None:
    from nodemesh.agent import http1
    from nodemesh.agent.http1 import Http1Exchange

    x = Http1Exchange()
    kinds = [k for k, _ in x.feed_request(b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\n\x00\x01junk\r\n\r\n")]
    assert kinds == [http1.REQUEST_HEAD, http1.CLIENT_ERROR]
    assert x.feed_request(b"GET /later HTTP/1.1\r\n\r\n") == []          # the client side is opaque now
    # The response owed to the counted request is still classified; nginx's 400 for the junk pairs
    # with nothing and ends the classification of the server's side too.
    events = x.feed_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
                             b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert [k for k, _ in events] == [http1.RESPONSE_HEAD, http1.EXCHANGE_END, http1.UPSTREAM_ERROR]
