"""The ctnetlink GET the agent sends to learn which pod kube-proxy chose, built and parsed sans-IO
(the live lookup runs in tests/integration/agent/test_agent_identity_live.py)."""

from __future__ import annotations

import socket
import struct

from nodemesh.agent.conntrack import (
    CTA_IP_V4_DST,
    CTA_IP_V4_SRC,
    CTA_PROTO_DST_PORT,
    CTA_PROTO_NUM,
    CTA_PROTO_SRC_PORT,
    CTA_TUPLE_IP,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_PROTO,
    CTA_TUPLE_REPLY,
    CTA_ZONE,
    NLA_F_NESTED,
    _attr,
    _attrs,
    build_get,
    parse_reply_source,
)


def tuple_attr(kind: int, src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    ip = _attr(CTA_TUPLE_IP | NLA_F_NESTED, _attr(CTA_IP_V4_SRC, socket.inet_aton(src[0]))
               + _attr(CTA_IP_V4_DST, socket.inet_aton(dst[0])))
    proto = _attr(CTA_TUPLE_PROTO | NLA_F_NESTED, _attr(CTA_PROTO_NUM, b"\x06")
                  + _attr(CTA_PROTO_SRC_PORT, struct.pack("!H", src[1]))
                  + _attr(CTA_PROTO_DST_PORT, struct.pack("!H", dst[1])))
    return _attr(kind | NLA_F_NESTED, ip + proto)


def test_get_request_names_the_original_tuple() -> None:
    msg = build_get(("10.244.1.5", 40001), ("10.96.0.10", 80), seq=7)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", msg)
    assert (length, kind, flags, seq) == (len(msg), 0x101, 1, 7)
    assert msg[16] == socket.AF_INET
    orig = _attrs(_attrs(msg[20:])[CTA_TUPLE_ORIG])
    ip, proto = _attrs(orig[CTA_TUPLE_IP]), _attrs(orig[CTA_TUPLE_PROTO])
    assert socket.inet_ntoa(ip[CTA_IP_V4_SRC]) == "10.244.1.5" and socket.inet_ntoa(ip[CTA_IP_V4_DST]) == "10.96.0.10"
    assert struct.unpack("!H", proto[CTA_PROTO_SRC_PORT])[0] == 40001
    assert struct.unpack("!H", proto[CTA_PROTO_DST_PORT])[0] == 80 and proto[CTA_PROTO_NUM] == b"\x06"


def test_get_request_asks_a_zone_only_when_given() -> None:
    # The agent's transparent upstreams live in a conntrack zone of their own (redirector/plan.py's
    # raw OUTPUT rule): a GET without the zone would look in zone 0 and find nothing.
    plain = _attrs(build_get(("10.244.1.5", 40001), ("10.96.0.10", 80))[20:])
    zoned = _attrs(build_get(("10.244.1.5", 40001), ("10.96.0.10", 80), zone=4140)[20:])
    assert CTA_ZONE not in plain
    assert struct.unpack("!H", zoned[CTA_ZONE])[0] == 4140 and zoned[CTA_TUPLE_ORIG] == plain[CTA_TUPLE_ORIG]


def test_reply_source_is_the_endpoint_kube_proxy_chose() -> None:
    body = (struct.pack("=BBH", socket.AF_INET, 0, 0)
            + tuple_attr(CTA_TUPLE_ORIG, ("10.244.1.5", 40001), ("10.96.0.10", 80))
            + tuple_attr(CTA_TUPLE_REPLY, ("10.244.2.7", 8080), ("10.244.1.5", 40001)))
    msg = struct.pack("=IHHII", 16 + len(body), 0x100, 0, 7, 0) + body
    assert parse_reply_source(msg) == ("10.244.2.7", 8080)


def test_errors_and_garbage_give_no_answer() -> None:
    error = struct.pack("=IHHII", 36, 2, 0, 7, 0) + struct.pack("=i", -2) + b"\0" * 16
    assert parse_reply_source(error) is None
    assert parse_reply_source(b"") is None
    assert parse_reply_source(struct.pack("=IHHII", 20, 0x100, 0, 7, 0) + b"\x02\0\0\0") is None
    assert parse_reply_source(struct.pack("=IHHII", 28, 0x100, 0, 7, 0) + b"\x02\0\0\0" + b"\xff\xff\x02\x00"
                              + b"\0" * 4) is None
