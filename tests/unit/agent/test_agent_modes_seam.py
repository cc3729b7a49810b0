"""The relay modes driven through their seam (agent/seam.py) with bytes alone: no socket, no loop.

`Host` is the connection as a mode sees it (`seam.ModeHost`): it keeps what the mode forwards
each way and what it answers itself, and holds the timers the mode arms so a test fires them. The
modes, the parsers and the telemetry they report to are the agent's own; the HTTP/2 peers are
python-hyper's h2.
"""

from __future__ import annotations

from collections.abc import Callable

import h2.config
import h2.connection
import pytest
from hyperframe.frame import Frame, GoAwayFrame, PingFrame
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.http1_relay import DRAIN_IDLE_CHECK_S, Http1Mode
from nodemesh.agent.http2_relay import Http2Mode
from nodemesh.agent.observe import ConnectionMeta
from nodemesh.agent.seam import ModeHost
from nodemesh.agent.tcp import TcpMode
from nodemesh.agent.telemetry import WorkerTelemetry

REQUEST = b"GET /vote HTTP/1.1\r\nHost: voting\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Timer:
    def __init__(self, delay: float, callback: Callable[[], None]) -> None:
        self.delay, self.callback, self.cancelled = delay, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class Host:
    """A connection with no sockets: bytes each way are kept, timers wait to be fired."""

    def __init__(self, observer: WorkerTelemetry, protocol: str) -> None:
        self.observer = observer
        meta = ConnectionMeta(1, "outbound", ("10.244.1.5", 41000), ("10.244.2.7", 80), ("10.244.2.7", 80),
                              protocol, started=100.0)
        self.obs = observer.connection_open(meta)
        self.slow = self.frozen = self.closed = self.lingering = False
        self.read_bytes = self.write_bytes = self.boundaries = 0
        self.upstream, self.client = bytearray(), bytearray()
        self.send_upstream = self.upstream.extend
        self.send_client = self.client.extend
        self.header_timeout_s = 10.0
        self.timers: list[Timer] = []

    def write_client(self, data: bytes) -> None:
        self.write_bytes += len(data)
        self.client.extend(data)

    def head_arrived(self) -> None:
        self.slow = False

    def at_boundary(self) -> None:
        self.boundaries += 1

    def close_both(self) -> None:
        self.closed = True

    def try_splice(self) -> bool:
        return False   # no sockets to hand to the kernel (agent/splice.py)

    def linger_close(self) -> None:
        self.lingering = True

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(delay, callback)
        self.timers.append(timer)
        return timer

    def fire(self) -> list[float]:
        """Run every armed timer (as if its delay passed); the delays they had."""
        due, self.timers = [t for t in self.timers if not t.cancelled], []
        for t in due:
            t.callback()
        return [t.delay for t in due]

    def take(self, side: bytearray) -> bytes:
        data = bytes(side)
        side.clear()
        return data


@pytest.fixture
def tel() -> WorkerTelemetry:
    return WorkerTelemetry(AgentConfig(node="node-1", workers=1))


def host(tel: WorkerTelemetry, protocol: str) -> Host:
    h = Host(tel, protocol)
    _typed: ModeHost = h  # type: ignore[assignment]  # Timer stands in for asyncio.TimerHandle
    return h


def test_modes_seam_http1_forwards_bytes_and_counts_the_exchange(tel: WorkerTelemetry) -> None:
    h = host(tel, "http1")
    mode = Http1Mode(h)
    mode.client_data(REQUEST[:20])
    mode.client_data(REQUEST[20:])
    assert h.take(h.upstream) == REQUEST
    assert [t.cancelled for t in h.timers] == [True]  # the 408 timer of the partial head, cancelled
    mode.upstream_data(RESPONSE)
    assert h.take(h.client) == RESPONSE
    assert sum(tel.metrics.response_total.values()) == 1
    assert h.boundaries == 1  # the exchange ended with nothing pending: a handover point


def test_modes_seam_http1_slow_head_is_answered_408(tel: WorkerTelemetry) -> None:
    h = host(tel, "http1")
    mode = Http1Mode(h)
    mode.client_data(b"GET /vote HTTP/1.1\r\nHost: vot")
    assert h.take(h.upstream) == b"GET /vote HTTP/1.1\r\nHost: vot"  # forwarded as it came
    assert h.fire() == [h.header_timeout_s]
    assert bytes(h.client).startswith(b"HTTP/1.1 408 Request Timeout\r\n") and h.lingering
    mode.client_data(b"ing\r\n\r\n")  # the rest of the head, too late: not forwarded
    assert h.upstream == b""


def test_modes_seam_http1_drain_closes_after_the_next_exchange(tel: WorkerTelemetry) -> None:
    h = host(tel, "http1")
    mode = Http1Mode(h)
    mode.drain()
    mode.client_data(REQUEST + REQUEST)  # a pipelined second request stays with the client
    forwarded = h.take(h.upstream)
    assert forwarded.lower().count(b"connection: close") == 1 and forwarded.count(b"GET /vote") == 1
    mode.upstream_data(RESPONSE)
    assert h.take(h.client) == RESPONSE


def test_modes_seam_http1_drain_closes_an_idle_connection(tel: WorkerTelemetry) -> None:
    h = host(tel, "http1")
    mode = Http1Mode(h)
    mode.drain()
    assert h.fire() == [DRAIN_IDLE_CHECK_S] and h.closed  # nothing sent for a whole check period


def test_modes_seam_http2_drain_is_a_two_step_goaway(tel: WorkerTelemetry) -> None:
    h = host(tel, "http2")
    mode = Http2Mode(h)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    mode.client_data(client.data_to_send())
    server.receive_data(h.take(h.upstream))
    server.initiate_connection()
    mode.upstream_data(server.data_to_send())
    client.receive_data(h.take(h.client))

    mode.drain()  # the server's side is at a frame boundary: the first GOAWAY and the PING go now
    first = _frames(h.take(h.client))
    assert [type(f) for f in first] == [GoAwayFrame, PingFrame] and first[0].last_stream_id == 0x7FFFFFFF
    assert not h.closed
    ack = PingFrame(0, flags=["ACK"])  # the client acknowledges it (h2 itself stops at a GOAWAY)
    ack.opaque_data = first[1].opaque_data
    mode.client_data(ack.serialize())  # the final GOAWAY follows
    final = _frames(h.take(h.client))
    assert [type(f) for f in final] == [GoAwayFrame] and final[0].last_stream_id == 0
    assert h.closed  # no stream was open: closed at once


def _frames(data: bytes) -> list[Frame]:
    out = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        out.append(frame)
        data = data[9 + length:]
    return out


def test_modes_seam_tcp_passes_bytes_both_ways(tel: WorkerTelemetry) -> None:
    h = host(tel, "tcp")
    mode = TcpMode(h)
    mode.client_data(b"\x16\x03\x01 hello")
    mode.upstream_data(b"\x16\x03\x03 world")
    assert h.take(h.upstream) == b"\x16\x03\x01 hello" and h.take(h.client) == b"\x16\x03\x03 world"


def test_modes_seam_http2_goaway_waits_for_a_frame_boundary_of_the_server(tel: WorkerTelemetry) -> None:
    h = host(tel, "http2")
    mode = Http2Mode(h)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    client.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "voting"), (":path", "/")],
                        end_stream=True)
    mode.client_data(client.data_to_send())
    server.receive_data(h.take(h.upstream))
    server.initiate_connection()
    server.send_headers(1, [(":status", "200")])
    server.send_data(1, b"x" * 100, end_stream=True)
    out = server.data_to_send()
    cut = len(out) - 40  # inside the DATA frame
    mode.upstream_data(out[:cut])
    mode.drain()
    assert h.take(h.client) == out[:cut]  # mid-frame: the GOAWAY waits
    mode.upstream_data(out[cut:])
    got = h.take(h.client)
    assert got[:40] == out[cut:]  # the frame ends first, then ours
    assert [type(f) for f in _frames(got[40:])] == [GoAwayFrame, PingFrame]
    assert sum(tel.metrics.response_total.values()) == 1 and not h.closed
