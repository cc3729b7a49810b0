"""Workload certificates end to end (controlplane/ca.py, certify.py, agent/certs.py): two agents
(NodeTelemetry with --cert-dir) on a real controller's gRPC Connect stream get certificates for the
pods of their own node, with the pods' SPIFFE IDs; a request for another node's pod is refused;
real TLS 1.3 handshakes between the two identities verify the URI SAN both ways; leaves renew in
the background while an open TLS connection keeps working; a root rotation keeps old leaves valid."""

from __future__ import annotations

import asyncio
import datetime
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from nodemesh.agent.certs import CertReader, make_key_and_csr, peer_identity
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.node import NodeTelemetry
from nodemesh.api import spiffe
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.controlplane.auth import StaticTokenAuthenticator
from nodemesh.controlplane.ca import CSRError, FileRootStore, WorkloadCA
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.controller import Controller
from nodemesh.controlplane.server import start_grpc_server

TOKEN = "ca-test-token"
WEB_ID = "spiffe://mesh.test/ns/emojivoto/sa/web"
VOTING_ID = "spiffe://mesh.test/ns/emojivoto/sa/voting"


def pod(name: str, node: str, ip: str, sa: str | None) -> dict:
    spec: dict = {"nodeName": node, "containers": [{"name": "c"}]}
    if sa is not None:
        spec["serviceAccountName"] = sa
    return {"kind": "Pod", "metadata": {"name": name, "namespace": "emojivoto", "uid": f"uid-{name}",
                                        "resourceVersion": "1"},
            "spec": spec, "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                                     "startTime": "2026-01-01T00:00:00Z"}}


async def wait_for(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> tuple[str, str, asyncio.StreamWriter,
                                                                                        asyncio.base_events.Server]:
    """A real TLS connection over loopback; returns (identity the client saw, identity the server
    saw, the client's writer, the server) with an echo server behind it."""
    seen: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not seen.done():
            seen.set_result(peer_identity(writer.get_extra_info("ssl_object")))
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    writer.reader = reader  # type: ignore[attr-defined]
    return peer_identity(writer.get_extra_info("ssl_object")), await seen, writer, server


def test_controlplane_workload_ca_signs_only_what_the_cluster_says(tmp_path: Path) -> None:
    ca = WorkloadCA(FileRootStore(tmp_path / "ca"), "mesh.test", leaf_ttl_s=60)
    assert oct((tmp_path / "ca" / FileRootStore.KEY).stat().st_mode & 0o777) == "0o600"
    # The same store gives the same root back (a restarted controller keeps the mesh's trust).
    assert WorkloadCA(FileRootStore(tmp_path / "ca"), "mesh.test").root == ca.root
    _key, csr = make_key_and_csr()
    issued = ca.sign(csr, spiffe.workload_id("mesh.test", "emojivoto", "web"))
    leaf = x509.load_pem_x509_certificate(issued.certificate_pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.UniformResourceIdentifier) == [WEB_ID]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = leaf.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(seconds=50) < lifetime <= datetime.timedelta(seconds=60)
    leaf.verify_directly_issued_by(ca.root)
    with pytest.raises(CSRError, match="malformed"):
        ca.sign(b"not a csr", spiffe.workload_id("mesh.test", "emojivoto", "web"))
    with pytest.raises(ValueError, match="service account"):
        spiffe.workload_id("mesh.test", "emojivoto", "../kube-system")
    assert str(spiffe.parse(WEB_ID)) == WEB_ID
    with pytest.raises(ValueError):
        spiffe.parse("spiffe://mesh.test/ns/emojivoto/pod/web")


def test_controlplane_workload_ca_agents_get_their_own_pods_certificates(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    token_file = tmp_path / "agent.token"
    token_file.write_text(TOKEN + "\n")

    async def main() -> None:
        controller = Controller(ControllerConfig(source="sandbox"))
        for obj in (pod("web-1", "node-a", "10.244.1.5", "web"), pod("voting-1", "node-b", "10.244.2.7", "voting"),
                    pod("vote-bot-1", "node-b", "10.244.2.8", None)):
            controller.registry.apply("ADDED", obj)
        # Short leaves: renewal at half of 4 s happens during the test.
        controller.ca = WorkloadCA(FileRootStore(tmp_path / "ca"), "mesh.test", leaf_ttl_s=4)
        server, port = await start_grpc_server(controller, "127.0.0.1", 0,
                                               StaticTokenAuthenticator(str(tmp_path / "token")))
        nodes = {}
        try:
            for name in ("node-a", "node-b"):
                node = NodeTelemetry(AgentConfig(node=name, node_ip="127.0.0.1", controller=f"127.0.0.1:{port}",
                                                 token_file=str(token_file), cert_dir=str(tmp_path / name),
                                                 admin_host="127.0.0.1", admin_port=0, watch_capture=False,
                                                 workers=1))
                await node.start()
                nodes[name] = node
            a, b = nodes["node-a"], nodes["node-b"]
            await wait_for(lambda: a.workload_certs.issued >= 1 and b.workload_certs.issued >= 2, "certificates")
            # Each node holds exactly its own pods; the SA defaults to "default".
            assert {u: h.spiffe_id for u, h in a.workload_certs.held.items()} == {"uid-web-1": WEB_ID}
            assert {u: h.spiffe_id for u, h in b.workload_certs.held.items()} == {
                "uid-voting-1": VOTING_ID, "uid-vote-bot-1": "spiffe://mesh.test/ns/emojivoto/sa/default"}
            assert oct((tmp_path / "node-a" / "uid-web-1.key").stat().st_mode & 0o777) == "0o600"
            assert a.workload_certs.refused == 0 and b.workload_certs.refused == 0

            # node-a asks for node-b's pod: refused, nothing signed.
            signed = controller.ca.issued
            _key, csr = make_key_and_csr()
            answer = await a.controller_link.request_certificate("uid-voting-1", csr)
            assert not answer.certificate_pem and "node-b" in answer.error and "node-a" in answer.error
            answer = await a.controller_link.request_certificate("uid-nobody", csr)
            assert not answer.certificate_pem and "unknown pod" in answer.error
            assert controller.ca.issued == signed

            # Real mTLS between the two identities: each side sees the other's SPIFFE ID.
            web_client = CertReader(tmp_path / "node-a").context("uid-web-1", server=False)
            voting_server = CertReader(tmp_path / "node-b").context("uid-voting-1", server=True)
            assert web_client is not None and voting_server is not None
            client_saw, server_saw, writer, tls_server = await handshake(web_client, voting_server)
            assert (client_saw, server_saw) == (VOTING_ID, WEB_ID)

            # A certificate from another CA is refused by the handshake.
            stranger = WorkloadCA(FileRootStore(tmp_path / "other-ca"), "mesh.test")
            key_pem, csr = make_key_and_csr()
            (tmp_path / "x").mkdir()
            (tmp_path / "x" / "s.key").write_bytes(key_pem)
            (tmp_path / "x" / "s.crt").write_bytes(
                stranger.sign(csr, spiffe.workload_id("mesh.test", "emojivoto", "web")).certificate_pem)
            (tmp_path / "x" / "trust-bundle.pem").write_bytes(stranger.bundle_pem())
            forged = CertReader(tmp_path / "x").context("s", server=False)
            assert forged is not None
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await handshake(forged, voting_server)

            # Renewal in the background (TTL 4 s, renewed at 2 s) and a root rotation: the TLS
            # connection opened before both keeps working, new handshakes use new leaves.
            first = (tmp_path / "node-a" / "uid-web-1.crt").read_bytes()
            first_key = (tmp_path / "node-a" / "uid-web-1.key").read_bytes()
            controller.rotate_workload_root()
            await wait_for(lambda: a.workload_certs.renewed >= 1 and b.workload_certs.renewed >= 2, "renewals")
            assert (tmp_path / "node-a" / "uid-web-1.crt").read_bytes() != first
            for i in range(5):
                writer.write(b"after-renewal-%d" % i)
                assert await writer.reader.readexactly(len(b"after-renewal-0")) == b"after-renewal-%d" % i
            renewed = x509.load_pem_x509_certificate((tmp_path / "node-a" / "uid-web-1.crt").read_bytes())
            renewed.verify_directly_issued_by(controller.ca.root)
            bundle = (tmp_path / "node-a" / "trust-bundle.pem").read_bytes()
            assert len(x509.load_pem_x509_certificates(bundle)) == 2  # old + new root
            # The old leaf (old root) still verifies against the new bundle: nothing breaks mid-rotation.
            old_leaf = x509.load_pem_x509_certificate(first)
            assert any(old_leaf.issuer == r.subject for r in x509.load_pem_x509_certificates(bundle))
            new_client = CertReader(tmp_path / "node-a").context("uid-web-1", server=False)
            new_server = CertReader(tmp_path / "node-b").context("uid-voting-1", server=True)
            assert new_client is not web_client
            client_saw, server_saw, w2, s2 = await handshake(new_client, new_server)
            assert (client_saw, server_saw) == (VOTING_ID, WEB_ID)
            # A leaf of the old root, with the bundle of both, against a leaf of the new root (one
            # side renewed, the other not yet): still handshakes.
            (tmp_path / "old").mkdir()
            (tmp_path / "old" / "w.crt").write_bytes(first)
            (tmp_path / "old" / "w.key").write_bytes(first_key)
            (tmp_path / "old" / "trust-bundle.pem").write_bytes(bundle)
            old_client = CertReader(tmp_path / "old").context("w", server=False)
            assert old_client is not None
            client_saw, server_saw, w3, s3 = await handshake(old_client, new_server)
            assert server_saw == WEB_ID
            for w, s in ((writer, tls_server), (w2, s2), (w3, s3)):
                w.close()
                s.close()
        finally:
            for node in nodes.values():
                await node.stop()
            await server.stop(None)

    asyncio.run(main())


def test_controlplane_workload_ca_without_a_ca_refuses_with_a_reason() -> None:
    controller = Controller(ControllerConfig(source="sandbox"))
    controller.registry.apply("ADDED", pod("web-1", "node-a", "10.244.1.5", "web"))
    session = controller.agent_connected(pb.AgentHello(agent_id="a/1/1", node="node-a"))
    controller.agent_message(session, pb.AgentMessage(csr=pb.CertificateSigningRequest(id=7, pod_uid="uid-web-1",
                                                                                       csr_der=b"x")))
    sent = []
    while not session.outbox.empty():
        sent.append(session.outbox.get_nowait())
    answers = [m.certificate for m in sent if isinstance(m, pb.ControllerMessage) and m.HasField("certificate")]
    assert len(answers) == 1 and answers[0].id == 7 and "not a CA" in answers[0].error


def test_controlplane_workload_ca_identity_carries_the_service_account() -> None:
    """Both identity paths — the controller's registry (Kubernetes and sandbox sources alike feed
    it Pod objects) and the agent's own file source — carry spec.serviceAccountName, "default"
    when unset."""
    from nodemesh.agent.identity import snapshot_from_objects
    from nodemesh.api.clusterstate import ClusterObjects

    objs = [pod("web-1", "node-a", "10.244.1.5", "web"), pod("bot-1", "node-a", "10.244.1.6", None)]
    controller = Controller(ControllerConfig(source="sandbox"))
    for obj in objs:
        controller.registry.apply("ADDED", obj)
    from_registry = controller.registry.identity_snapshot(pb.MeshConfig())
    from_file = snapshot_from_objects(ClusterObjects(items=objs))
    for snap in (from_registry, from_file):
        assert {p.name: p.service_account for p in snap.pods} == {"web-1": "web", "bot-1": "default"}
