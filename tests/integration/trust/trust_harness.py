"""A meshed 2-node sandbox for the trust tests (issue 13): servers and clients in namespace `rt`.

`trust_cluster(cni)` brings up the sandbox with an HTTP/1 server (`web`), a gRPC server (`grpcweb`)
and an idle `client` pod, installs the mesh with `install_sandbox` (node processes, token-file
auth), and always tears it all down. `Trust` runs programs inside pods and the real CLI.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodemesh.manifests.sandbox_install import TOKEN_FILE, install_sandbox, uninstall_sandbox
from nodemesh.sandbox.cluster import Sandbox
from nodemesh.sandbox.testing import TapStream, deployment, running_sandbox, service

PY = sys.executable
PEERS = str(Path(__file__).with_name("trust_peers.py"))
NS = "rt"


def _deployment(name: str, argv: list[str], port: int | None, node: str | None = None) -> str:
    return deployment(name, NS, argv, ports=[port] if port else [], node=node)


def _service(name: str, port: int) -> str:
    return service(name, NS, [(port, port)])


def manifest() -> str:
    return "---".join([
        f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n",
        _deployment("web", [PY, PEERS, "http1-server", "8080"], 8080), _service("web", 8080),
        _deployment("grpcweb", [PY, PEERS, "grpc-server", "9090"], 9090), _service("grpcweb", 9090),
        _deployment("client", ["sleep", "infinity"], None),
        _deployment("peer", ["sleep", "infinity"], None),
    ])


@dataclass
class Trust:
    sb: Sandbox
    controller: str

    @property
    def state_dir(self) -> Path:
        return Path(self.sb.state_dir)

    def pod(self, app: str) -> dict[str, Any]:
        pods = [p for p in self.sb.pods(NS) if p["metadata"]["labels"].get("app") == app]
        assert len(pods) == 1, pods
        return pods[0]

    def netns(self, app: str) -> str:
        return self.sb.pod_netns(NS, self.pod(app)["metadata"]["name"])

    def service_ip(self, name: str) -> str:
        svc = next(s for s in self.sb.objects().of_kind("Service")
                   if s["metadata"]["name"] == name and s["metadata"]["namespace"] == NS)
        return svc["spec"]["clusterIP"]

    def in_pod(self, app: str, argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.netns(app), *argv], capture_output=True, text=True,
                              timeout=timeout, check=False)

    def start_in_pod(self, app: str, argv: list[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", self.netns(app), *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def cli_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("NODEMESH_CONTROLLER", "NODEMESH_TOKEN")}
        env["NODEMESH_SANDBOX"] = self.sb.name
        return env | extra

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PY, "-m", "nodemesh", *args], env=self.cli_env(), capture_output=True, text=True,
                              timeout=timeout, check=False)

    def tap(self, *args: str) -> TapStream:
        return TapStream([PY, "-m", "nodemesh", "tap", *args], self.cli_env())

    def add_token(self, token: str, roles: str) -> Path:
        """A second line in the controller's token file (the controller re-reads it), and a file
        holding only that token, for the CLI's --token-file."""
        with (self.state_dir / TOKEN_FILE).open("a") as f:
            f.write(f"{token} {roles}\n")
        path = self.state_dir / f"{token}.token"
        path.write_text(token + "\n")
        return path


@contextlib.contextmanager
def trust_cluster(cni: str = "bridge") -> Iterator[Trust]:
    with running_sandbox(nodes=2, cni=cni, manifests=[manifest()], timeout=90) as sb:
        controller = install_sandbox(sb.name, timeout=90, progress=lambda msg: None)
        try:
            yield Trust(sb, controller)
        finally:
            with contextlib.suppress(Exception):
                uninstall_sandbox(sb.name)
