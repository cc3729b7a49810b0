"""Which pod did kube-proxy choose? One conntrack GET over netlink (ctnetlink), IPv4 TCP.

When the agent does not know a ClusterIP yet (or knows no ready endpoint for it), it dials the
address the pod dialled and kube-proxy's DNAT in the node's OUTPUT chain picks the endpoint. The
connection's conntrack entry holds the answer: the *reply* tuple's source is the endpoint. Asking
costs one netlink round trip (the kernel answers inside the send), and only for connections to
addresses the agent could not resolve.

Why not pyroute2 (a dependency already): its 0.9 conntrack API runs its own asyncio loop, which
refuses to run inside a worker's uvloop ("this event loop is already running"; its async variant
fails there with "cannot open a UDP handle, invalid family 16"), and importing it costs each worker
about 12 MB. The message is small and fixed: built and parsed here, sans-IO, tested without root.
"""

from __future__ import annotations

import socket
import struct

from nodemesh.api.model import CONNTRACK_ZONE

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY = 1, 2
CTA_ZONE = 18
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3

_NLMSGHDR = struct.Struct("=IHHII")   # len, type, flags, seq, pid
_NFGENMSG = struct.Struct("=BBH")     # family, version, res_id (big endian, 0)
_NLATTR = struct.Struct("=HH")        # len, type


def _attr(kind: int, payload: bytes) -> bytes:
    data = _NLATTR.pack(_NLATTR.size + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def build_get(src: tuple[str, int], dst: tuple[str, int], seq: int = 1, zone: int = 0) -> bytes:
    """A ctnetlink GET for the TCP entry whose original tuple is src -> dst, in conntrack zone `zone`."""
    ip = _attr(CTA_TUPLE_IP | NLA_F_NESTED,
               _attr(CTA_IP_V4_SRC, socket.inet_aton(src[0])) + _attr(CTA_IP_V4_DST, socket.inet_aton(dst[0])))
    proto = _attr(CTA_TUPLE_PROTO | NLA_F_NESTED,
                  _attr(CTA_PROTO_NUM, bytes([socket.IPPROTO_TCP]))
                  + _attr(CTA_PROTO_SRC_PORT, struct.pack("!H", src[1]))
                  + _attr(CTA_PROTO_DST_PORT, struct.pack("!H", dst[1])))
    body = _NFGENMSG.pack(socket.AF_INET, 0, 0) + _attr(CTA_TUPLE_ORIG | NLA_F_NESTED, ip + proto)
    if zone:
        body += _attr(CTA_ZONE, struct.pack("!H", zone))
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST, seq, 0) + body


def _attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, pos)
        if length < _NLATTR.size or pos + length > len(data):
            break
        out[kind & NLA_TYPE_MASK] = data[pos + _NLATTR.size:pos + length]
        pos += (length + 3) & ~3
    return out


def parse_reply_source(message: bytes) -> tuple[str, int] | None:
    """The reply tuple's source (the endpoint) from a ctnetlink answer; None when the answer is an
    error (no such entry) or malformed."""
    if len(message) < _NLMSGHDR.size + _NFGENMSG.size:
        return None
    length, kind, _, _, _ = _NLMSGHDR.unpack_from(message)
    if kind == NLMSG_ERROR or length > len(message):
        return None
    top = _attrs(message[_NLMSGHDR.size + _NFGENMSG.size:length])
    reply = _attrs(top.get(CTA_TUPLE_REPLY, b""))
    ip = _attrs(reply.get(CTA_TUPLE_IP, b"")).get(CTA_IP_V4_SRC)
    port = _attrs(reply.get(CTA_TUPLE_PROTO, b"")).get(CTA_PROTO_SRC_PORT)
    if ip is None or len(ip) != 4 or port is None or len(port) != 2:
        return None
    return socket.inet_ntoa(ip), struct.unpack("!H", port)[0]


class ConntrackLookup:
    """A netlink socket to ask the node's conntrack table (needs CAP_NET_ADMIN; the agent has it)."""

    def __init__(self, timeout_s: float = 0.05) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.settimeout(timeout_s)  # the kernel answers within the send: this is a safety net
        self._sock.bind((0, 0))
        self._seq = 0

    def endpoint(self, src: tuple[str, int], dst: tuple[str, int],
                 zones: tuple[int, ...] = (CONNTRACK_ZONE, 0)) -> tuple[str, int] | None:
        """Where the connection src -> dst really goes (the reply's source); None if unknown.
        A transparent upstream (the pod's address) is in the agent's own zone (redirector/plan.py's
        raw OUTPUT rule); one sent from the node's address, in the default zone: both are asked."""
        for zone in zones:
            found = self._get(src, dst, zone)
            if found is not None:
                return found
        return None

    def _get(self, src: tuple[str, int], dst: tuple[str, int], zone: int) -> tuple[str, int] | None:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        self._sock.send(build_get(src, dst, self._seq, zone))
        while True:
            data = self._sock.recv(65536)
            if len(data) >= _NLMSGHDR.size and _NLMSGHDR.unpack_from(data)[3] != self._seq:
                continue  # a late answer to an earlier question that timed out
            return parse_reply_source(data)

    def close(self) -> None:
        self._sock.close()
