"""HTTP/2 (and gRPC) relay mode: frames forwarded untouched, classified by http2.H2Classifier.

The agent injects frames toward the client only at frame boundaries of the server's stream, and
only on drain: the two-step GOAWAY (last id 2^31-1 plus a PING, then the real last stream id once
the PING comes back) so that no stream the client sent before it saw the GOAWAY is left
unprocessed. A client protocol error the classifier finds (bad HPACK, CONTINUATION out of order,
a header block over 1 MB) is the server's to answer: the frames are forwarded and the
classification stops.
"""

from __future__ import annotations

import time

from nodemesh.agent import http2
from nodemesh.agent.http2 import H2Classifier, H2Stream, goaway_frame, ping_frame
from nodemesh.agent.observe import RequestEnd, RequestHead
from nodemesh.agent.seam import ModeHost


class Http2Mode:
    __slots__ = ("conn", "drain_state", "inject", "observer", "protocol", "relay")

    def __init__(self, conn: ModeHost) -> None:
        self.conn = conn
        self.protocol = "http2"
        self.observer = conn.observer
        self.relay = H2Classifier()
        self.inject: list[bytes] = []   # frames for the client, waiting for a frame boundary
        self.drain_state = 0            # 0 running, 1 first GOAWAY+PING sent, 2 final GOAWAY sent

    def client_data(self, data: bytes) -> None:
        events = self.relay.feed_client(data)
        if events:
            self._handle(events)
        self.conn.send_upstream(data)

    def upstream_data(self, data: bytes) -> None:
        if not self.inject:
            events = self.relay.feed_server(data)
            self.conn.send_client(data)
        else:
            events, at = self.relay.feed_server_to_boundary(data)
            if at >= 0:
                frames = b"".join(self.inject)
                self.inject = []
                self.conn.send_client(data[:at] + frames + data[at:])
                self.conn.write_bytes += len(frames)
            else:
                self.conn.send_client(data)
        if events:
            self._handle(events)

    def _send_to_client(self, frames: bytes) -> None:
        if self.relay.server.at_boundary and not self.inject:
            self.conn.write_client(frames)
        else:
            self.inject.append(frames)

    def _handle(self, events: list[http2.Event]) -> None:
        observer = self.observer
        for kind, arg in events:
            if kind == http2.REQUEST_HEAD:
                s: H2Stream = arg  # type: ignore[assignment]
                s.obs = observer.request_start(self.conn.obs, RequestHead(
                    s.method, s.scheme, s.authority, s.path, s.headers, s.grpc, s.stream_id, s.started))
            elif kind == http2.RESPONSE_HEAD:
                s = arg  # type: ignore[assignment]
                observer.response_start(s.obs, s.status, s.response_headers, s.response_at)
            elif kind == http2.STREAM_END:
                s = arg  # type: ignore[assignment]
                observer.request_end(s.obs, RequestEnd(
                    s.grpc_status, s.reset_error, s.request_bytes, s.response_bytes, time.monotonic()))
                if self.drain_state == 2 and not self.relay.streams:
                    self.conn.close_both()
            elif kind == http2.DRAIN_ACKED and self.drain_state == 1:
                self.drain_state = 2
                self._send_to_client(goaway_frame(self.relay.max_client_stream))
                if not self.relay.streams:
                    self.conn.close_both()
            elif kind == http2.CLIENT_PROTOCOL_ERROR or kind == http2.UPSTREAM_PROTOCOL_ERROR:
                # Transparency: the frames go to the server as they are, and it answers them (nginx:
                # GOAWAY with its own error code). The agent only stops following the connection;
                # the streams it was following end with the error it saw (arg: its error code).
                self._end_all(http2.error_name(arg if isinstance(arg, int) else 1))  # 1: PROTOCOL_ERROR

    def _end_all(self, error: str) -> None:
        now = time.monotonic()
        for s in self.relay.close():
            self.observer.request_end(s.obs, RequestEnd(
                s.grpc_status, s.reset_error or error, s.request_bytes, s.response_bytes, now))

    def drain(self) -> None:
        if self.drain_state or self.relay.failed:
            return
        self.drain_state = 1
        self._send_to_client(goaway_frame(0x7FFFFFFF) + ping_frame())

    def close(self, upstream_clean: bool) -> None:
        self._end_all("connection closed")
