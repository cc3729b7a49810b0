"""Opaque TCP (and TLS, whose SNI detection recorded): bytes both ways, nothing classified.

Open/close, byte counts and duration are the Connection's (relay.py); half-close is honoured
there too (write_eof on one side when the other sends FIN).
"""

from __future__ import annotations

from nodemesh.agent.seam import ModeHost


class TcpMode:
    __slots__ = ("conn", "protocol", "spliceable")

    def __init__(self, conn: ModeHost, protocol: str = "tcp") -> None:
        self.conn = conn
        self.protocol = protocol
        # Until the relay has handed the sockets to the kernel (agent/splice.py), or said it
        # never will: after each chunk it is asked again (bytes were still buffered then).
        self.spliceable = True

    def client_data(self, data: bytes) -> None:
        self.conn.send_upstream(data)
        if self.spliceable:
            self.spliceable = self.conn.try_splice()

    def upstream_data(self, data: bytes) -> None:
        self.conn.send_client(data)
        if self.spliceable:
            self.spliceable = self.conn.try_splice()

    def drain(self) -> None:
        # An opaque stream has no safe point we could know of: it runs until the grace ends.
        pass

    def close(self, upstream_clean: bool) -> None:
        pass
