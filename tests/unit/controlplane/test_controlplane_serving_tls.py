"""The controller provisions its own TLS (controlplane/servingtls.py) through the REAL `kubernetes`
client against a small API server on loopback that keeps Secrets and ConfigMaps as a real one does
(resourceVersion on every write, 409 Conflict on a stale update, 404 Status objects, and `create`
refused with 403 as the install's RBAC refuses it). Asserted: the CA is made on first start into the
Secret the manifest created empty, its certificate (never its key) is published in the ConfigMap,
a restart reuses it; an agent trusting the published CA connects over TLS (gRPC) and the web port
speaks TLS with the same identity; an agent with another CA is refused; the serving certificate
renews while an agent's stream stays up."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.node import NodeTelemetry
from nodemesh.api.certs import generate_ca
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.controlplane.auth import StaticTokenAuthenticator
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.main import parse_args, start
from nodemesh.controlplane.servingtls import ServingTLSError
from nodemesh.controlplane.sources.sandbox import SandboxSource
from secrets_api import NS, ApiServer, api_server

TOKEN = "serving-tls-token"
SECRET, CONFIGMAP = "nodemesh-controller-tls", "nodemesh-controller-ca"
@pytest.fixture
def kubeconfig(tmp_path: Path) -> Iterator[Path]:
    with api_server(tmp_path, [("secrets", SECRET), ("configmaps", CONFIGMAP)]) as path:
        yield path


def secret_data() -> dict[str, bytes]:
    data = ApiServer.objects[("secrets", NS, SECRET)].get("data") or {}
    return {k: base64.b64decode(v) for k, v in data.items()}


def published_ca() -> str:
    return str((ApiServer.objects[("configmaps", NS, CONFIGMAP)].get("data") or {}).get("ca.crt", ""))


def config(kubeconfig: Path, *extra: str) -> ControllerConfig:
    return parse_args(["--source", "kubernetes", "--kubeconfig", str(kubeconfig), "--listen", "127.0.0.1",
                       "--grpc-port", "0", "--web-port", "0", "--tls-ca-secret", f"{NS}/{SECRET}",
                       "--tls-ca-configmap", f"{NS}/{CONFIGMAP}", *extra])


async def start_controller(cfg: ControllerConfig, tmp_path: Path) -> Any:
    (tmp_path / "token").write_text(TOKEN + "\n")
    # The cluster source is the sandbox's (no objects needed here); TLS is provisioned from the API.
    return await start(cfg, source=SandboxSource(str(tmp_path / "state")),
                       authenticator=StaticTokenAuthenticator(str(tmp_path / "token")))


def test_controlplane_serving_tls_made_on_first_start_and_reused(kubeconfig: Path, tmp_path: Path) -> None:
    async def main() -> None:
        running = await start_controller(config(kubeconfig), tmp_path)
        await running.stop()

    asyncio.run(main())
    first = secret_data()
    assert set(first) == {"ca.crt", "ca.key"}
    ca = x509.load_pem_x509_certificate(first["ca.crt"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # The ConfigMap has the certificate alone: no key material is published.
    assert published_ca().encode() == first["ca.crt"] and "PRIVATE KEY" not in published_ca()
    # Read-modify-write: kubectl's annotation and the labels survive; nothing was created.
    secret = ApiServer.objects[("secrets", NS, SECRET)]
    assert "kubectl.kubernetes.io/last-applied-configuration" in secret["metadata"]["annotations"]
    assert not [r for r in ApiServer.requests if r[0] == "POST"]

    ApiServer.requests = []
    asyncio.run(main())  # a restart: same CA, nothing written
    assert secret_data() == first and published_ca().encode() == first["ca.crt"]
    assert [r for r in ApiServer.requests if r[0] != "GET"] == []


def test_controlplane_serving_tls_second_writer_wins_and_missing_objects_fail_clearly(
        kubeconfig: Path, tmp_path: Path) -> None:
    other_cert, other_key = generate_ca("the other controller's CA")

    def other_controller(obj: dict[str, Any]) -> None:
        obj["data"] = {"ca.crt": base64.b64encode(other_cert).decode(), "ca.key": base64.b64encode(other_key).decode()}

    ApiServer.race = other_controller

    async def main() -> None:
        running = await start_controller(config(kubeconfig), tmp_path)
        await running.stop()

    asyncio.run(main())
    # Our update lost (409): we took the CA the other controller stored, and published that one.
    assert secret_data()["ca.crt"] == other_cert and published_ca().encode() == other_cert

    del ApiServer.objects[("secrets", NS, SECRET)]
    with pytest.raises(ServingTLSError, match=r"cannot create Secret nodemesh/nodemesh-controller-tls: 403.*apply"):
        asyncio.run(main())


def _grpc_check(addr: str, roots: bytes, target: str | None = None) -> Any:
    options = [("grpc.ssl_target_name_override", target)] if target else []
    with grpc.secure_channel(addr, grpc.ssl_channel_credentials(root_certificates=roots), options=options) as ch:
        return pb_grpc.ControllerStub(ch).Check(pb.CheckRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),),
                                                timeout=5)


def _web_get(port: int, roots: bytes, host: str) -> tuple[bytes, bytes]:
    """GET /live over TLS verified with `roots` for `host`; (status line, peer certificate DER)."""
    ctx = ssl.create_default_context(cadata=roots.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(f"GET /live HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        return data.split(b"\r\n", 1)[0], tls.getpeercert(binary_form=True) or b""


async def _wait(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_controlplane_serving_tls_agents_verify_the_published_ca_and_renewal_keeps_streams(
        kubeconfig: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nodemesh.agent")
    token_file = tmp_path / "agent.token"
    token_file.write_text(TOKEN + "\n")
    right_ca, wrong_ca = tmp_path / "published-ca.crt", tmp_path / "wrong-ca.crt"
    wrong_ca.write_bytes(generate_ca("not the controller's CA")[0])
    missing_ca = tmp_path / "not-yet" / "ca.crt"

    async def main() -> None:
        # The default names (the Service's in the namespace) plus 127.0.0.1 for the agents here;
        # a 6 s certificate renews at 4 s, during the test.
        cfg = config(kubeconfig, "--tls-hosts", "nodemesh-controller.nodemesh.svc,127.0.0.1", "--tls-cert-ttl", "6")
        running = await start_controller(cfg, tmp_path)
        addr = f"127.0.0.1:{running.grpc_port}"
        agents = []
        try:
            right_ca.write_text(published_ca())

            def agent(name: str, ca: Path) -> NodeTelemetry:
                return NodeTelemetry(AgentConfig(node=name, node_ip="127.0.0.1", controller=addr,
                                                 token_file=str(token_file), controller_ca=str(ca),
                                                 admin_host="127.0.0.1", admin_port=0, watch_capture=False,
                                                 workers=1))

            good, bad, late = agent("node-a", right_ca), agent("node-b", wrong_ca), agent("node-c", missing_ca)
            for node in (good, bad, late):
                await node.start()
                agents.append(node)
            await _wait(lambda: good.controller_link.connected and good.controller_link.connects == 1, "agent link")
            first_cert = running.serving.cert_pem

            # The web port speaks TLS with the same identity (and refuses plaintext).
            loop = asyncio.get_running_loop()
            line, der = await loop.run_in_executor(None, _web_get, running.web_port, right_ca.read_bytes(),
                                                   "nodemesh-controller.nodemesh.svc")
            assert line == b"HTTP/1.1 200 OK"
            assert x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM) == first_cert
            with pytest.raises(ssl.SSLCertVerificationError):
                await loop.run_in_executor(None, _web_get, running.web_port, wrong_ca.read_bytes(), "127.0.0.1")
            # The CLI's port-forward path: 127.0.0.1, verified under the Service's name.
            check = await loop.run_in_executor(None, _grpc_check, addr, right_ca.read_bytes(),
                                               "nodemesh-controller.nodemesh.svc")
            assert check.controller_version

            # Renewal: a new certificate for new handshakes; the agent's stream was never dropped.
            await _wait(lambda: running.serving.renewals >= 1, "serving certificate renewal")
            assert running.serving.cert_pem != first_cert
            line, der = await loop.run_in_executor(None, _web_get, running.web_port, right_ca.read_bytes(),
                                                   "127.0.0.1")
            assert line == b"HTTP/1.1 200 OK"
            assert der != x509.load_pem_x509_certificate(first_cert).public_bytes(Encoding.DER)
            await loop.run_in_executor(None, _grpc_check, addr, right_ca.read_bytes())
            assert good.controller_link.connected and good.controller_link.connects == 1

            # Wrong CA: never connected. Missing CA file (the ConfigMap not yet mounted): waits, then
            # connects once the kubelet writes the file.
            assert bad.controller_link.connects == 0 and not bad.controller_link.connected
            assert late.controller_link.connects == 0
            # Said once, as what it is (not a FileNotFoundError at every retry), and no plaintext.
            missing = [r for r in caplog.records if "event=controller_ca_missing" in r.getMessage()]
            assert len(missing) == 1 and missing[0].levelno == logging.WARNING, missing
            assert str(missing_ca) in missing[0].getMessage()
            assert not [r for r in caplog.records if "FileNotFoundError" in r.getMessage()]
            missing_ca.parent.mkdir()
            missing_ca.write_text(published_ca())
            await _wait(lambda: late.controller_link.connects == 1, "the agent that waited for its CA file")
            assert any(f"event=controller_ca_found path={missing_ca}" in r.getMessage() for r in caplog.records)
            assert bad.controller_link.connects == 0
        finally:
            for node in agents:
                await node.stop()
            await running.stop()

    asyncio.run(main())
