"""The controller's gRPC port over TLS (api/certs.py, server_credentials): a client that trusts the
CA gets through, one trusting another CA or speaking plaintext does not, and the certificate names
what it was issued for."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from nodemesh.api.certs import generate_ca, write_controller_pki
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.controlplane.auth import StaticTokenAuthenticator
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.controller import Controller
from nodemesh.controlplane.server import server_credentials, start_grpc_server

TOKEN = "tls-test-token"


def test_controlplane_tls_certificates(tmp_path: Path) -> None:
    pki = write_controller_pki(tmp_path, ["127.0.0.1", "nodemesh-controller.nodemesh.svc"])
    assert oct(pki.key.stat().st_mode & 0o777) == "0o600"
    cert = x509.load_pem_x509_certificate(pki.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["nodemesh-controller.nodemesh.svc"]
    assert cert.issuer == ca.subject and ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca)
    with pytest.raises(ValueError, match="go together"):
        server_credentials(str(pki.cert), "")
    with pytest.raises(ValueError, match="cannot read"):
        server_credentials(str(tmp_path / "none.crt"), str(pki.key))


def test_controlplane_tls_only_clients_trusting_the_ca_get_through(tmp_path: Path) -> None:
    pki = write_controller_pki(tmp_path, ["127.0.0.1"])
    (tmp_path / "token").write_text(TOKEN + "\n")
    other_ca, _ = generate_ca("someone else")

    async def main() -> None:
        controller = Controller(ControllerConfig(source="sandbox"))
        server, port = await start_grpc_server(controller, "127.0.0.1", 0,
                                               StaticTokenAuthenticator(str(tmp_path / "token")),
                                               server_credentials(str(pki.cert), str(pki.key)))
        addr = f"127.0.0.1:{port}"
        meta = (("authorization", f"Bearer {TOKEN}"),)
        try:
            creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
            async with grpc.aio.secure_channel(addr, creds) as ch:
                resp = await pb_grpc.ControllerStub(ch).Check(pb.CheckRequest(), metadata=meta, timeout=10)
                assert resp.controller_version
            wrong = grpc.ssl_channel_credentials(root_certificates=other_ca)
            for channel in (grpc.aio.secure_channel(addr, wrong), grpc.aio.insecure_channel(addr)):
                async with channel as ch:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await pb_grpc.ControllerStub(ch).Check(pb.CheckRequest(), metadata=meta, timeout=5)
                    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)

    asyncio.run(main())
