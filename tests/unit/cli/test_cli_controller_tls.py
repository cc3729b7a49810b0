"""The CLI's port-forward path to a controller with its own TLS (controlplane/servingtls.py): the CA
comes from the ConfigMap the controller publishes (read with the REAL kubernetes client from a
small API server on loopback), the channel verifies the certificate under the Service's name
(the forward listens on 127.0.0.1, which the certificate does not name), and the dashboard's
forward originates TLS through the splice (large answers included: TLS records held in the
socket's buffer are read before waiting on select)."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest
from cli_testkit import FakeController
from kubernetes import client, config
from nodemesh.api.certs import generate_ca
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.cli.client import (
    CONTROLLER_SERVICE_NAME,
    ClientConfig,
    CliError,
    Controller,
    Target,
    _splice,
    published_controller_ca,
)
from nodemesh.controlplane.servingtls import ServingCA, ServingIdentity, service_hosts
from secrets_api import write_kubeconfig


class ConfigMapApi(BaseHTTPRequestHandler):
    answer: ClassVar[tuple[int, dict[str, Any]]] = (404, {})

    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        assert self.path.startswith("/api/v1/namespaces/nodemesh/configmaps/nodemesh-controller-ca")
        code, body = self.answer
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def core(tmp_path: Path) -> Iterator[client.CoreV1Api]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), ConfigMapApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server.server_port, "admin")
    try:
        yield client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
    finally:
        server.shutdown()
        server.server_close()


def _status(code: int, reason: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code,
            "message": f"configmaps \"nodemesh-controller-ca\" {reason}"}


def test_cli_controller_tls_ca_from_the_published_configmap(core: client.CoreV1Api) -> None:
    ca_pem, _ = generate_ca()
    ConfigMapApi.answer = (404, _status(404, "NotFound"))
    assert published_controller_ca(core, "kube context t") is None  # installed without TLS: plaintext
    ConfigMapApi.answer = (200, {"kind": "ConfigMap", "apiVersion": "v1",
                                 "metadata": {"name": "nodemesh-controller-ca", "namespace": "nodemesh"}})
    with pytest.raises(CliError, match="has not published its CA yet"):
        published_controller_ca(core, "kube context t")
    ConfigMapApi.answer = (403, _status(403, "Forbidden"))
    with pytest.raises(CliError, match="403 Forbidden.*NODEMESH_CONTROLLER_CA"):
        published_controller_ca(core, "kube context t")
    ConfigMapApi.answer = (200, {"kind": "ConfigMap", "apiVersion": "v1",
                                 "metadata": {"name": "nodemesh-controller-ca", "namespace": "nodemesh"},
                                 "data": {"ca.crt": ca_pem.decode()}})
    assert published_controller_ca(core, "kube context t") == ca_pem


@pytest.fixture
def identity() -> ServingIdentity:
    cert, key = generate_ca("nodemesh controller CA")
    return ServingIdentity(ServingCA(cert, key), service_hosts("nodemesh-controller", "nodemesh"))


def test_cli_controller_tls_port_forward_verifies_the_service_name(identity: ServingIdentity) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_ControllerServicer_to_server(FakeController(), server)
    port = server.add_secure_port("127.0.0.1:0", identity.grpc_credentials())
    server.start()
    forward_addr = f"127.0.0.1:{port}"  # what the port-forward's local listener looks like
    cfg = ClientConfig(timeout_s=5)
    try:
        ok = Controller(Target(forward_addr, "port-forward", ca_pem=identity.ca.cert_pem,
                               server_name=CONTROLLER_SERVICE_NAME), cfg)
        try:
            assert isinstance(ok.unary("Check", pb.CheckRequest()), pb.CheckResponse)  # answered over TLS
        finally:
            ok.close()
        # Without the Service's name the certificate (which never names 127.0.0.1) does not verify;
        # with another CA neither; plaintext is not spoken.
        other, _ = generate_ca("someone else")
        for target in (Target(forward_addr, "port-forward", ca_pem=identity.ca.cert_pem),
                       Target(forward_addr, "port-forward", ca_pem=other, server_name=CONTROLLER_SERVICE_NAME),
                       Target(forward_addr, "port-forward")):
            bad = Controller(target, cfg)
            try:
                with pytest.raises(CliError, match="cannot reach the controller"):
                    bad.unary("Check", pb.CheckRequest())
            finally:
                bad.close()
    finally:
        server.stop(None)


def test_cli_controller_tls_dashboard_forward_originates_tls(identity: ServingIdentity) -> None:
    body = b"x" * 300_000  # many TLS records
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with identity.ssl_context.wrap_socket(conn, server_side=True) as tls:
            request = b""
            while b"\r\n\r\n" not in request:
                request += tls.recv(4096)
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)

    threading.Thread(target=serve, daemon=True).start()
    ctx = ssl.create_default_context(cadata=identity.ca.cert_pem.decode())
    remote = ctx.wrap_socket(socket.create_connection(listener.getsockname()), server_hostname=CONTROLLER_SERVICE_NAME)
    browser, local = socket.socketpair()
    splice = threading.Thread(target=_splice, args=(local, remote), daemon=True)
    splice.start()
    try:
        browser.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        browser.settimeout(10)
        got = b""
        while not got.endswith(body) and (chunk := browser.recv(65536)):
            got += chunk
        assert got.startswith(b"HTTP/1.1 200 OK") and got.endswith(b"\r\n\r\n" + body)
        splice.join(10)  # the pod's side closed: the splice ends (the forward then closes ours)
        assert not splice.is_alive()
    finally:
        browser.close()
        splice.join(5)
        local.close()
        remote.close()
        listener.close()
