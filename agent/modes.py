"""Which relay mode handles a detected protocol."""

from __future__ import annotations

from nodemesh.agent.detect import HTTP1, HTTP2
from nodemesh.agent.http1_relay import Http1Mode
from nodemesh.agent.http2_relay import Http2Mode
from nodemesh.agent.seam import Mode, ModeHost
from nodemesh.agent.tcp import TcpMode


def make_mode(protocol: str, conn: ModeHost) -> Mode:
    if protocol == HTTP1:
        return Http1Mode(conn)
    if protocol == HTTP2:
        return Http2Mode(conn)
    return TcpMode(conn, protocol)
