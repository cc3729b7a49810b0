"""Simulated agents: many real gRPC clients of `Controller.Connect` in one asyncio process.

Each simulated agent has its own channel (its own TCP + TLS connection, as each node's agent
has) and speaks the agent's protocol as agent/report.py does: AgentHello and AgentStatus first;
on the controller's first ReportAck, increment reports every `interval` seconds (seq 1, 2, ...,
`time_ms` the interval's end, live reports carrying the node's gauges), an AgentStatus after
each; identity snapshots and deltas in; TapOpen answered with tap events while the tap is open.

To keep a 2-core machine for the controller, controller messages are decoded lazily: the
harness reads the oneof's field number from the first byte and fully parses only report acks,
taps and small identity messages; a big snapshot is recorded by size (its version is read from
the one agent per process that parses everything, `--parse-all` for tests). A compressed one
(the agents offer zlib in their hello unless `no_compression`) is inflated only as far as its
first bytes (snapshot or delta?) unless parsed whole. So a simulated agent skips, per snapshot,
the inflate (~30 ms at 50,000 pods) and the parse + apply a real agent does on its own node.

A stream that ends (the controller cancelled it, a transport error) is opened again after a
backoff with jitter, as the agent's link does (0.25 s doubling to 10 s); each end is recorded
(time, status) in the results. Unacknowledged reports are not replayed (a real agent's ring would).

Run: python3 tests/scale/agents.py --spec JSON  (written by run.py); SIGTERM: stop, write results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
import zlib
from pathlib import Path

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster import Cluster, NodeTraffic, pairs_by_node
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import GRPC_CHANNEL_OPTIONS, LATENCY_BUCKETS_MS

CONNECT = "/nodemesh.v1.Controller/Connect"
# Messages queued on a stream the controller does not read fast enough before the simulated
# agent stops producing reports (a real agent's history ring would replay them later).
MAX_BACKLOG = 20
_TAG_IDENTITY, _TAG_DELTA, _TAG_ACK, _TAG_TAP_OPEN, _TAG_TAP_CLOSE = 0x0A, 0x22, 0x2A, 0x12, 0x1A
_TAG_COMPRESSED = 0x32


def _serialize(msg: pb.AgentMessage | bytes) -> bytes:
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


def _metrics_message(report: bytes) -> bytes:
    """AgentMessage{metrics = report}, encoded: field 2, length-delimited."""
    n, size = len(report), bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            size.append(byte | 0x80)
        else:
            size.append(byte)
            return b"\x12" + bytes(size) + report


class SimAgent:
    def __init__(self, spec: dict, node: str, traffic: NodeTraffic, parse_all: bool) -> None:
        self.spec = spec
        self.node = node
        self.traffic = traffic
        self.parse_all = parse_all
        self.agent_id = f"{node}/sim/{int(time.time() * 1000)}"
        self.start_ms = int(time.time() * 1000)
        self.seq = 0
        self.sent: dict[int, float] = {}     # seq -> send time, until acked
        self.latencies: list[float] = []
        self.acked = 0
        self.identity: list[tuple[float, str, int, int]] = []  # (time, kind, bytes, pods or -1)
        self.taps: dict[str, float] = {}
        self.tap_events = 0
        self.tap_opens: list[float] = []   # when each TapOpen arrived
        self.skipped = 0   # intervals not sent: the stream was MAX_BACKLOG messages behind
        self.connected_at = 0.0
        self.errors: list[str] = []
        self.stream_ends: list[tuple[float, str]] = []  # (time, status) of every stream that ended early
        self.streams = 0
        self.outbox: asyncio.Queue[pb.AgentMessage | bytes | None] = asyncio.Queue()
        self.increments = False
        self.first_pending = True   # this stream's first report defines its series refs (labels)
        self.encoded: tuple[bytes, list[bytes]] | None = None  # this stream's report series
        self._encodings: dict[tuple[bool, bool], tuple[bytes, list[bytes]]] = {}

    def encoded_for(self, refs: bool, columns: bool) -> tuple[bytes, list[bytes]]:
        """The node's report series for what the controller takes, encoded once per agent (a
        new stream numbers its refs from 1 again: the same bytes)."""
        key = (refs, columns)
        if key not in self._encodings:
            self._encodings[key] = self.traffic.encoded_intervals(pb, refs, columns=columns)
        return self._encodings[key]

    def prepare(self) -> None:
        """Encode, before connecting, what a current controller will take (refs and columns)."""
        refs = not self.spec.get("no_refs")
        self.encoded_for(refs, refs and not self.spec.get("no_columns"))

    async def requests(self):
        outbox = self.outbox   # this stream's: a stream opened again gets a new one
        yield pb.AgentMessage(hello=pb.AgentHello(
            agent_id=self.agent_id, node=self.node, version="sim", start_time_ms=self.start_ms,
            node_ip="10.250.0.1", identity_encodings=[] if self.spec.get("no_compression") else ["zlib"]))
        yield pb.AgentMessage(status=pb.AgentStatus(ready=True, capture_installed=True,
                                                    time_ms=int(time.time() * 1000)))
        while True:
            msg = await outbox.get()
            if msg is None:
                return
            yield msg

    async def tick(self, stop: asyncio.Event) -> None:
        interval = self.spec["interval"]
        await asyncio.sleep(interval * (hash(self.node) % 1000) / 1000)  # agents' phases differ
        while not stop.is_set():
            if self.increments and self.outbox.qsize() > MAX_BACKLOG:
                self.skipped += 1  # the controller is not taking them: do not grow without bound
            elif self.increments:
                self.seq += 1
                first, variants = self.encoded or ((b"", [b""]))
                series = first if self.first_pending else variants[self.seq % len(variants)]
                self.first_pending = False
                # A MetricsReport is its fields' encodings in any order: the header, then the
                # series encoded once (cluster.NodeTraffic.encoded_intervals).
                head = pb.MetricsReport(agent_id=self.agent_id, seq=self.seq, time_ms=int(time.time() * 1000),
                                        latency_bounds_ms=list(LATENCY_BUCKETS_MS), increments=True)
                self.sent[self.seq] = time.time()
                self.outbox.put_nowait(_metrics_message(head.SerializeToString() + series))
                self.outbox.put_nowait(pb.AgentMessage(status=pb.AgentStatus(
                    ready=True, capture_installed=True, time_ms=int(time.time() * 1000))))
                for tap_id in self.taps:
                    self.outbox.put_nowait(self.tap_event(tap_id))
            await asyncio.sleep(interval)

    def tap_event(self, tap_id: str) -> pb.AgentMessage:
        self.tap_events += 1
        return pb.AgentMessage(tap_event=pb.TapEvent(
            tap_id=tap_id, request_id=f"1:{self.tap_events}", direction="inbound", node=self.node,
            time_ms=int(time.time() * 1000),
            request_init=pb.RequestInit(method="GET", scheme="http", authority="x", path="/")))

    def handle(self, data: bytes) -> None:
        now = time.time()
        tag = data[0] if data else 0
        if tag == _TAG_ACK:
            ack = pb.ControllerMessage.FromString(data).report_ack
            if not self.increments:
                self.increments = True  # the controller takes increments: report from seq 1
                refs = getattr(ack, "series_refs", False) and not self.spec.get("no_refs")  # older controllers: no refs
                columns = refs and getattr(ack, "series_columns", False) and not self.spec.get("no_columns")
                self.encoded = self.encoded_for(bool(refs), bool(columns))
            for seq in [s for s in self.sent if s <= ack.seq]:
                self.latencies.append(now - self.sent.pop(seq))
            self.acked = max(self.acked, ack.seq)
        elif tag in (_TAG_IDENTITY, _TAG_DELTA, _TAG_COMPRESSED):
            pods = -1
            version = -1
            wire, encoding = len(data), ""
            if tag == _TAG_COMPRESSED:
                c = pb.ControllerMessage.FromString(data).identity_compressed
                encoding = c.encoding
                if self.parse_all or c.size < 200_000:
                    data = zlib.decompress(c.data)
                    tag = data[0]
                else:  # the first bytes say snapshot or delta; the rest is a real agent's work
                    tag = zlib.decompressobj().decompress(c.data, 1)[0]
                size = c.size
            else:
                size = len(data)
            if len(data) == size and (self.parse_all or size < 200_000):
                msg = pb.ControllerMessage.FromString(data)
                if msg.HasField("identity"):
                    pods, version = len(msg.identity.pods), msg.identity.version
                else:
                    pods, version = len(msg.identity_delta.pods), msg.identity_delta.version
            self.identity.append((now, "snapshot" if tag == _TAG_IDENTITY else "delta", size, pods, version,
                                  wire, encoding))
        elif tag == _TAG_TAP_OPEN:
            tap_id = pb.ControllerMessage.FromString(data).tap_open.tap_id
            self.taps[tap_id] = now
            self.tap_opens.append(now)
            self.outbox.put_nowait(self.tap_event(tap_id))  # the agent sees a request right away
        elif tag == _TAG_TAP_CLOSE:
            self.taps.pop(pb.ControllerMessage.FromString(data).tap_close.tap_id, None)

    async def run(self, stop: asyncio.Event, creds: grpc.ChannelCredentials) -> None:
        """Streams until `stop`, opened again after a backoff when one ends (as agent/report.py)."""
        backoff = 0.25
        while not stop.is_set():
            started = time.time()
            self.streams += 1
            await self.stream(stop, creds)
            if stop.is_set():
                return
            if time.time() - started > 30:  # it had been up a while: start the backoff over
                backoff = 0.25
            try:
                await asyncio.wait_for(stop.wait(), random.uniform(0, backoff))
            except TimeoutError:
                pass
            backoff = min(10.0, backoff * 2)

    async def stream(self, stop: asyncio.Event, creds: grpc.ChannelCredentials) -> None:
        spec = self.spec
        self.outbox = asyncio.Queue()
        self.increments = False
        self.first_pending = True
        async with grpc.aio.secure_channel(spec["addr"], creds, options=[
                *GRPC_CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", spec["tls_name"])]) as ch:
            connect = ch.stream_stream(CONNECT, request_serializer=_serialize,
                                       response_deserializer=lambda b: b)
            call = connect(self.requests(), metadata=(("authorization", f"Bearer {spec['token']}"),))
            ticker = asyncio.create_task(self.tick(stop))
            stopper = asyncio.create_task(stop.wait())
            try:
                reader = asyncio.create_task(self._read(call))
                await asyncio.wait([reader, stopper], return_when=asyncio.FIRST_COMPLETED)
                if reader.done() and not stop.is_set():
                    exc = reader.exception()
                    status = ("OK" if exc is None else exc.code().name if isinstance(exc, grpc.aio.AioRpcError)
                              else repr(exc)[:100])
                    self.stream_ends.append((time.time(), status))
                if stop.is_set():
                    # Let the last reports be acknowledged, then half-close.
                    deadline = time.time() + 3
                    while self.sent and time.time() < deadline:
                        await asyncio.sleep(0.05)
                    self.outbox.put_nowait(None)
                    await asyncio.wait_for(reader, 3)
            except Exception as exc:  # noqa: BLE001 - recorded, the harness reports it
                self.errors.append(repr(exc)[:200])
            finally:
                ticker.cancel()
                stopper.cancel()
                self.outbox.put_nowait(None)   # ends this stream's request iterator
                call.cancel()

    async def _read(self, call) -> None:
        async for data in call:
            if not self.connected_at:
                self.connected_at = time.time()
            self.handle(data)

    def result(self) -> dict:
        return {"node": self.node, "agent_id": self.agent_id, "connected_at": self.connected_at,
                "reports_sent": self.seq, "skipped": self.skipped, "acked": self.acked, "unacked": len(self.sent),
                "latencies": self.latencies, "identity": self.identity, "tap_events": self.tap_events,
                "tap_opens": self.tap_opens,
                "errors": self.errors, "streams": self.streams, "stream_ends": self.stream_ends}


async def main_async(spec: dict, out: str) -> None:
    cluster = Cluster(spec["nodes"], spec["pods"], spec["fanout"])
    pairs = pairs_by_node(cluster, cluster.calls())
    mine = spec["my_nodes"]
    creds = grpc.ssl_channel_credentials(root_certificates=Path(spec["ca"]).read_bytes())
    agents = [SimAgent(spec, cluster.node_names[i],
                       NodeTraffic(cluster, cluster.node_names[i], pairs.get(cluster.node_names[i], []),
                                   spec["active"], seed=i),
                       parse_all=spec.get("parse_all", False) or k == 0)
              for k, i in enumerate(mine)]
    del pairs
    for a in agents:
        a.prepare()
    # Ready: the harness starts its connect clock when every client process is (spec["go"]).
    Path(out + ".ready").touch()
    while not os.path.exists(spec["go"]):
        await asyncio.sleep(0.05)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    tasks = []
    for a in agents:  # connect in a ramp, as a DaemonSet's pods come up
        tasks.append(asyncio.create_task(a.run(stop, creds)))
        await asyncio.sleep(spec.get("ramp_s", 0.0))
    print("started", flush=True)
    await asyncio.gather(*tasks, return_exceptions=True)
    Path(out).write_text(json.dumps([a.result() for a in agents]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    with open(a.spec) as f:
        spec = json.load(f)
    asyncio.run(main_async(spec, a.out))


if __name__ == "__main__":
    main()
