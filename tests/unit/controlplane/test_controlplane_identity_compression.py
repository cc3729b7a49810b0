"""Compressed identity (issue 16, the connect storm): an agent that offers "zlib" in its hello gets a
big snapshot as CompressedIdentity, compressed once per version; agents that do not offer it
(older ones) and controllers that do not know it (older ones) keep plain messages — over the real
gRPC stream, with the agent's real controller link. What a compressed message holds is checked
before it is applied: bad bytes change nothing the agent holds."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.node import NodeTelemetry
from nodemesh.agent.report import inflate_identity
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.controller import Controller
from nodemesh.controlplane.identityfeed import COMPRESS_MIN_BYTES, IdentityFeed
from nodemesh.controlplane.registry import WATCHED_KINDS, WorkloadRegistry
from nodemesh.controlplane.server import start_grpc_server

PODS = 400


def pod_object(i: int) -> dict[str, Any]:
    return {"kind": "Pod", "metadata": {"name": f"web-{i}", "namespace": "shop", "uid": f"uid-{i}",
                                        "labels": {"app": "web", "pod-template-hash": "5f7c9d8b6"}},
            "spec": {"nodeName": f"node-{i % 4}", "serviceAccountName": "web"},
            "status": {"phase": "Running", "podIP": f"10.7.{i // 250}.{i % 250 + 2}",
                       "podIPs": [{"ip": f"10.7.{i // 250}.{i % 250 + 2}"}], "startTime": "2026-01-01T00:00:00Z",
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def registry(pods: int = PODS) -> WorkloadRegistry:
    reg = WorkloadRegistry()
    objects = [pod_object(i) for i in range(pods)]
    objects.append({"kind": "Namespace", "metadata": {"name": "shop"}})
    for kind in WATCHED_KINDS:
        reg.replace(kind, [o for o in objects if o["kind"] == kind])
    return reg


def feed_of(reg: WorkloadRegistry) -> IdentityFeed:
    feed = IdentityFeed()
    feed.update_entries(reg.identity_entries(pb.MeshConfig(opaque_ports=[3306]), ()))
    return feed


# ---------------------------------------------------------------- the feed

def test_snapshot_bytes_are_the_snapshot_message() -> None:
    feed = feed_of(registry())
    plain = pb.ControllerMessage(identity=feed.snapshot())
    assert pb.ControllerMessage.FromString(feed.snapshot_bytes()) == plain
    assert len(plain.identity.pods) == PODS and plain.identity.config.opaque_ports == [3306]


def test_a_big_snapshot_is_compressed_once_for_every_agent_that_offers_zlib() -> None:
    feed = feed_of(registry())
    plain, snapshot = feed.encoded_message_for(0, 0) or (b"", False)
    assert snapshot and len(plain) > COMPRESS_MIN_BYTES
    one = feed.encoded_message_for(0, 0, frozenset({"zlib"}))
    other = feed.encoded_message_for(7, 3, frozenset({"zlib"}))       # another epoch: the snapshot too
    assert one is not None and other is not None and one[1] and other[1]
    assert one[0] is other[0]                                          # encoded once, the same bytes
    msg = pb.ControllerMessage.FromString(one[0])
    assert msg.WhichOneof("msg") == "identity_compressed"
    c = msg.identity_compressed
    assert c.encoding == "zlib" and c.size == len(plain) and len(c.data) * 4 < len(plain)
    assert inflate_identity(c) == pb.ControllerMessage.FromString(plain)
    assert feed.encoded_message_for(0, 0, frozenset({"brotli"})) == (plain, True)   # unknown: plain


def test_a_small_delta_goes_plain_even_to_zlib_agents_and_a_big_one_compressed() -> None:
    reg = registry()
    feed = feed_of(reg)
    v1 = feed.version
    pods = [pod_object(i) for i in range(PODS)]
    pods[0]["metadata"]["labels"]["app"] = "web2"
    reg.replace("Pod", pods)
    feed.update_entries(reg.identity_entries(pb.MeshConfig(opaque_ports=[3306]), ()))
    small = feed.encoded_message_for(feed.epoch, v1, frozenset({"zlib"}))
    assert small is not None and not small[1]
    assert pb.ControllerMessage.FromString(small[0]).WhichOneof("msg") == "identity_delta"
    v2 = feed.version
    pods = [pod_object(i) for i in range(PODS)]   # new objects (the registry compares them with its own)
    for p in pods:
        p["metadata"]["labels"]["app"] = "web3"
    reg.replace("Pod", pods)
    feed.update_entries(reg.identity_entries(pb.MeshConfig(opaque_ports=[3306]), ()))
    big = feed.encoded_message_for(feed.epoch, v2, frozenset({"zlib"}))
    assert big is not None and not big[1]
    inner = inflate_identity(pb.ControllerMessage.FromString(big[0]).identity_compressed)
    assert inner.identity_delta.base_version == v2 and len(inner.identity_delta.pods) == PODS


# ---------------------------------------------------------------- bad input

def compressed(data: bytes, *, size: int | None = None, encoding: str = "zlib") -> pb.CompressedIdentity:
    z = zlib.compress(data)
    return pb.CompressedIdentity(encoding=encoding, data=z, size=len(data) if size is None else size)


def test_inflate_refuses_what_is_not_a_compressed_identity() -> None:
    good = pb.ControllerMessage(identity=pb.IdentitySnapshot(version=3)).SerializeToString()
    assert inflate_identity(compressed(good)).identity.version == 3
    with pytest.raises(ValueError, match="not offered"):
        inflate_identity(compressed(good, encoding="gzip"))
    with pytest.raises(ValueError, match="does not inflate"):
        inflate_identity(pb.CompressedIdentity(encoding="zlib", data=b"not zlib at all", size=10))
    with pytest.raises(ValueError, match="cut short"):
        inflate_identity(pb.CompressedIdentity(encoding="zlib", data=zlib.compress(good)[:-6], size=len(good)))
    bomb = b"\x0a" + b"\xff" * 3 + b"\x00" * 5_000_000       # inflates far past what it claims
    with pytest.raises(ValueError, match="inflates past 100"):
        inflate_identity(compressed(bomb, size=100))
    with pytest.raises(ValueError, match="inflates past 1000"):
        inflate_identity(compressed(bomb, size=0), limit=1000)
    ack = pb.ControllerMessage(report_ack=pb.ReportAck(seq=1)).SerializeToString()
    with pytest.raises(ValueError, match="not an identity"):
        inflate_identity(compressed(ack))
    with pytest.raises(ValueError, match="does not parse"):
        inflate_identity(compressed(b"\x0a\x05ab"))


# ---------------------------------------------------------------- over the real stream

def run(coro: Any) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


async def until(cond: Any, what: str, timeout: float = 20) -> None:
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def agent_against(controller_config: ControllerConfig) -> tuple[int, int, int]:
    """A real agent (NodeTelemetry + its controller link) against a real controller's gRPC server:
    (pods the agent holds, compressed identity messages it inflated, snapshots the controller sent)."""
    controller = Controller(controller_config, registry=registry())
    server, port = await start_grpc_server(controller, "127.0.0.1", 0)
    node = NodeTelemetry(AgentConfig(node="node-1", admin_host="127.0.0.1", admin_port=0,
                                     controller=f"127.0.0.1:{port}", report_interval_s=0.1, workers=1))
    try:
        await node.start()
        await until(lambda: node.index.owner("10.7.1.100") is not None, "the identity at the agent")
        link = node.controller_link
        assert link is not None and link.identity_refused == 0
        return len(node.index.known_uids()), link.identity_inflated, int(controller.metrics.registry.get_sample_value(
            "nodemesh_controller_identity_snapshots_total") or 0)
    finally:
        await node.stop()
        await server.stop(None)


def test_new_agent_new_controller_the_snapshot_comes_compressed() -> None:
    async def main() -> None:
        pods, inflated, snapshots = await agent_against(ControllerConfig())
        assert pods == PODS and inflated == 1 and snapshots == 1
    run(main())


def test_new_agent_old_controller_the_snapshot_comes_plain() -> None:
    async def main() -> None:
        pods, inflated, snapshots = await agent_against(ControllerConfig(identity_compression=False))
        assert pods == PODS and inflated == 0 and snapshots == 1
    run(main())


def test_old_agent_new_controller_gets_plain_messages() -> None:
    """An agent from before compression: its hello offers nothing; it must never see a message kind
    it does not know."""
    async def main() -> None:
        controller = Controller(ControllerConfig(), registry=registry())
        server, port = await start_grpc_server(controller, "127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                outbox: asyncio.Queue[pb.AgentMessage | None] = asyncio.Queue()
                outbox.put_nowait(pb.AgentMessage(hello=pb.AgentHello(agent_id="node-1/1/1", node="node-1")))

                async def requests() -> AsyncIterator[pb.AgentMessage]:
                    while (m := await outbox.get()) is not None:
                        yield m
                call = pb_grpc.ControllerStub(ch).Connect(requests())
                kinds = []
                async for msg in call:
                    kinds.append(msg.WhichOneof("msg"))
                    if kinds[-1] == "identity":
                        assert len(msg.identity.pods) == PODS
                        break
                outbox.put_nowait(None)
                call.cancel()
                assert kinds == ["report_ack", "identity"]
        finally:
            await server.stop(None)
    run(main())


class BadIdentityController(pb_grpc.ControllerServicer):
    """Sends a good plain snapshot, then a compressed one that does not inflate."""

    async def Connect(self, request_iterator: AsyncIterator[pb.AgentMessage],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ControllerMessage]:
        first = await anext(request_iterator)
        assert list(first.hello.identity_encodings) == ["zlib"]   # the agent offers it
        good = feed_of(registry(10)).snapshot()
        good.epoch, good.version = 5, 1
        yield pb.ControllerMessage(identity=good)
        yield pb.ControllerMessage(identity_compressed=pb.CompressedIdentity(encoding="zlib", data=b"garbage",
                                                                           size=100))
        async for _ in request_iterator:
            pass


def test_a_compressed_identity_that_does_not_inflate_changes_nothing() -> None:
    async def main() -> None:
        server = grpc.aio.server()
        pb_grpc.add_ControllerServicer_to_server(BadIdentityController(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        node = NodeTelemetry(AgentConfig(node="node-1", admin_host="127.0.0.1", admin_port=0,
                                         controller=f"127.0.0.1:{port}", report_interval_s=0.1, workers=1))
        try:
            await node.start()
            link = node.controller_link
            assert link is not None
            await until(lambda: link.identity_refused == 1, "the bad message refused")
            assert len(node.index.known_uids()) == 10 and (node.index.epoch, node.index.version) == (5, 1)
            assert link.connects == 1                                  # the stream goes on
        finally:
            await node.stop()
            await server.stop(None)
    run(main())
