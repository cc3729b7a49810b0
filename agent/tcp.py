"""Opaque TCP (and TLS, whose SNI detection recorded): bytes both ways, nothing classified.

Open/close, byte counts and duration are the Connection's (relay.py); half-close is honoured
there too (write_eof on one side when the other sends FIN).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nodemesh.agent.relay import Connection


class TcpMode:
    __slots__ = ("conn", "protocol")

    def __init__(self, conn: Connection, protocol: str = "tcp") -> None:
        self.conn = conn
        self.protocol = protocol

    def client_data(self, data: bytes) -> None:
        self.conn.up.write(data)  # type: ignore[union-attr]

    def upstream_data(self, data: bytes) -> None:
        self.conn.client.write(data)  # type: ignore[union-attr]

    def drain(self) -> None:
        # An opaque stream has no safe point we could know of: it runs until the grace ends.
        pass

    def close(self, upstream_clean: bool) -> None:
        pass
