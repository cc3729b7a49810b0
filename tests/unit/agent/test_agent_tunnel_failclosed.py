"""The source agent's mTLS decision on a real relay (loopback, no root): a connection to a pod of
another node in a namespace that requires mTLS, from a pod this agent holds no certificate for,
is refused (the client sees a reset, the server sees nothing) and counted; the same to a
namespace that does not require it goes through in plaintext (fail-open), counted as a fallback.
The decision is taken at accept (relay._accepted), before the connection's first count."""

from __future__ import annotations

import asyncio
from pathlib import Path

from loopback_relay import run, start, wait_until
from nodemesh.agent.admission import Admission
from nodemesh.agent.certs import CertReader
from nodemesh.agent.podindex import PodIndex
from nodemesh.agent.tunnel import Tunnel
from nodemesh.api.gen import nodemesh_pb2 as pb

CLIENT_IP, WEB_IP = "127.0.0.1", "127.0.0.2"   # the client pod (this node), the server pod (another node)


def _index(required: list[str]) -> PodIndex:
    idx = PodIndex("node1")
    snap = pb.IdentitySnapshot(resource_version="1", config=pb.MeshConfig(mtls_required_namespaces=required))
    for name, ip, node, ns in (("client", CLIENT_IP, "node1", "a"), ("web", WEB_IP, "node2", "mt")):
        snap.pods.append(pb.Pod(ip=ip, ips=[ip], namespace=ns, name=f"{name}-1", node=node, uid=f"uid-{name}",
                                ready=True, service_account=name,
                                owner=pb.Resource(namespace=ns, type="deployment", name=name)))
    idx.update(snap)
    return idx


def _scenario(tmp_path: Path, required: list[str]) -> tuple[bytes | None, int, list[str | None], Tunnel]:
    result: dict[str, object] = {}

    async def scenario() -> None:
        accepted = 0

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            while data := await r.read(65536):
                w.write(data)
            w.close()

        up = await asyncio.start_server(handle, WEB_IP, 0)
        server, port, ctx, rec = await start(up.sockets[0].getsockname()[:2], Admission(1000))
        events: list[tuple[str, str]] = []
        tunnel = Tunnel(_index(required), CertReader(tmp_path),  # no certificates on this node
                        sink=lambda event, reason: events.append((event, reason)))
        ctx.tunnel = tunnel
        try:
            reader, writer = await asyncio.open_connection(CLIENT_IP, port)
            writer.write(b"hello\n")
            try:
                got: bytes | None = await asyncio.wait_for(reader.readline(), 5)
            except ConnectionResetError:
                got = None
            writer.close()
            assert await wait_until(lambda: not ctx.live)
            result.update(got=got, accepted=accepted, closes=rec.closes, tunnel=tunnel, events=events)
        finally:
            server.close()
            up.close()

    run(scenario)
    # What the worker's telemetry is handed (nodemesh_tunnel_events_total) is what the stats count.
    want = [("refused", "required:no_certificate")] if required else [("fallback", "no_certificate")]
    assert result["events"] == want, result["events"]
    return result["got"], result["accepted"], result["closes"], result["tunnel"]  # type: ignore[return-value]


def test_agent_tunnel_required_namespace_fails_closed(tmp_path: Path) -> None:
    got, accepted, closes, tunnel = _scenario(tmp_path, ["mt"])
    assert got in (None, b"") and accepted == 0
    assert closes == ["connect: ECONNREFUSED"]
    assert tunnel.stats.refused == {"required:no_certificate": 1} and tunnel.stats.fallback == {}


def test_agent_tunnel_other_namespaces_fail_open(tmp_path: Path) -> None:
    got, accepted, closes, tunnel = _scenario(tmp_path, [])
    assert (got, accepted, closes) == (b"hello\n", 1, [None])
    assert tunnel.stats.fallback == {"no_certificate": 1} and tunnel.stats.refused == {}
