"""Test helper: a sandbox that always goes away.

    from nodemesh.sandbox.testing import running_sandbox

    def test_something():
        with running_sandbox(nodes=2, cni="routed", manifests=["app.yaml"]) as sb:
            pods = sb.pods("default")

or as a pytest fixture:

    @pytest.fixture
    def sandbox():
        with running_sandbox() as sb:
            yield sb

`manifests` items are file paths or YAML text (anything containing a newline is text). The
cluster name is unique per call (`t` + 8 random chars), so tests of several engineers can run at
the same time; teardown runs even when the test fails or setup dies half-way.

WHOAMI_APP is a ready-made manifest: namespace `shop`, Deployment `web` (2 replicas of a tiny
HTTP server on :8080 answering with its pod name), Service `web` (port 80 -> http), and a
Deployment `client` running `sleep infinity` to exec from. FETCH is a curl-less HTTP client.
`deployment(...)` writes one Deployment the way the tests' apps need it (ports named or not, the
pod's name in POD_NAME, a ServiceAccount, a node to pin to, hostNetwork, ...).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import subprocess
import threading
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from nodemesh.sandbox.cluster import Sandbox

# ---------------------------------------------------------------------------- shared manifests
# A tiny HTTP server that answers with the pod's name (from the downward API), so a test can see
# which replica a ClusterIP connection reached.
WHOAMI = r"""
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = os.environ["POD_NAME"].encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""

WHOAMI_APP = """
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {team: web}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: python:3.11
        command: ["python3", "-c"]
        args: [__WHOAMI__]
        env:
        - name: POD_NAME
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
        ports:
        - {containerPort: 8080, name: http}
        readinessProbe:
          httpGet: {path: /, port: http}
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  selector: {app: web}
  ports:
  - {port: 80, targetPort: http}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: client
  namespace: shop
spec:
  replicas: 1
  selector:
    matchLabels: {app: client}
  template:
    metadata:
      labels: {app: client}
    spec:
      containers:
      - name: client
        command: ["sleep", "infinity"]
""".replace("__WHOAMI__", json.dumps(WHOAMI))

# `python3 -c FETCH URL...` prints each URL's body on its own line (a client with no curl needed).
FETCH = (
    "import sys, urllib.request\n"
    "for url in sys.argv[1:]:\n"
    "    print(urllib.request.urlopen(url, timeout=3).read().decode())\n"
)


# One Deployment, as the tests' apps write it: `deployment("web", "shop", ["python3", "srv.py"],
# ports=[("main", 8080)], pod_name_env=True)`. YAML text, one document without a separator (it
# starts with a newline, as the tests' own documents do: `"---".join(docs)` makes the file).
Port = int | tuple[str, int]  # a containerPort, or (its name, the port)


def deployment(name: str, namespace: str, command: Sequence[str], *, ports: Sequence[Port] = (),
               replicas: int = 1, labels: Mapping[str, str] | None = None,
               selector: Mapping[str, str] | None = None, container: str | None = None,
               pod_name_env: bool = False, env: Mapping[str, str] | None = None,
               node: str | None = None, service_account: str | None = None, host_network: bool = False,
               readiness_tcp: bool = False, pod_annotations: Mapping[str, str] | None = None) -> str:
    """A Deployment of one container running `command`. Its pods are labelled `selector` (default
    `app: <name>`) plus `labels`; `pod_name_env` gives the container its pod's name as `POD_NAME`
    (the downward API), `env` more variables; `node` pins the pods (nodeSelector on the hostname);
    `readiness_tcp` adds a TCP readiness probe of the first port, every second (without it the
    sandbox kubelet's default readiness applies)."""
    match = dict(selector or {"app": name})
    c: dict[str, Any] = {"name": container or name, "command": list(command)}
    variables: list[dict[str, Any]] = []
    if pod_name_env:
        variables.append({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    variables += [{"name": k, "value": v} for k, v in (env or {}).items()]
    if variables:
        c["env"] = variables
    if ports:
        c["ports"] = [{"containerPort": p} if isinstance(p, int) else {"containerPort": p[1], "name": p[0]}
                      for p in ports]
    if readiness_tcp:
        first = ports[0]
        c["readinessProbe"] = {"tcpSocket": {"port": first if isinstance(first, int) else first[0]},
                               "periodSeconds": 1}
    pod: dict[str, Any] = {}
    if host_network:
        pod["hostNetwork"] = True
    if service_account:
        pod["serviceAccountName"] = service_account
    if node:
        pod["nodeSelector"] = {"kubernetes.io/hostname": node}
    pod["containers"] = [c]
    template: dict[str, Any] = {"labels": {**match, **(labels or {})}}
    if pod_annotations:
        template["annotations"] = dict(pod_annotations)
    doc = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(match)},
        "spec": {"replicas": replicas, "selector": {"matchLabels": match},
                 "template": {"metadata": template, "spec": pod}},
    }
    return "\n" + yaml.safe_dump(doc, sort_keys=False, width=1_000_000)


def service(name: str, namespace: str, ports: Sequence[tuple[int, int | str] | tuple[str, int, int | str]], *,
            selector: Mapping[str, str] | None = None, cluster_ip: str | None = None,
            annotations: Mapping[str, str] | None = None) -> str:
    """A ClusterIP Service in front of `deployment(name, ...)`'s pods (selector default `app: <name>`).
    `ports`: (port, targetPort) or (its name, port, targetPort); targetPort a number or a container
    port's name. A document as `deployment()` writes one."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        meta["annotations"] = dict(annotations)
    spec: dict[str, Any] = {}
    if cluster_ip:
        spec["clusterIP"] = cluster_ip
    spec["selector"] = dict(selector or {"app": name})
    spec["ports"] = [{"port": p[0], "targetPort": p[1]} if len(p) == 2
                     else {"name": p[0], "port": p[1], "targetPort": p[2]} for p in ports]
    doc = {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}
    return "\n" + yaml.safe_dump(doc, sort_keys=False, width=1_000_000)


def unique_name() -> str:
    return "t" + secrets.token_hex(4)


@contextlib.contextmanager
def running_sandbox(nodes: int = 2, cni: str = "bridge", manifests: Sequence[str | Path] = (),
                    name: str | None = None, wait: bool = True, timeout: float = 30.0,
                    backoff: tuple[float, float] = (10.0, 300.0), node_backoff: tuple[float, float] = (1.0, 10.0),
                    iptables: str | dict[str, str] | None = None) -> Iterator[Sandbox]:
    sb = Sandbox(name or unique_name())
    try:
        sb.up(nodes=nodes, cni=cni, backoff=backoff, node_backoff=node_backoff, iptables=iptables)
        for m in manifests:
            if isinstance(m, str) and "\n" in m:
                sb.apply(text=m)
            else:
                sb.apply(m)
        if manifests and wait:
            sb.wait_ready(timeout=timeout)
        yield sb
    finally:
        sb.down()


def agent_admin_request(state_dir: str | Path, url: str) -> urllib.request.Request:
    """A request for an agent's admin port from off the node (the host, a test): `/metrics` and
    `/identity` need a credential there (agent/admin.py), and the sandbox's `controller.token`
    (written by `nodemesh install --sandbox`; its first word, all roles) is one the controller
    accepts. Without the file (no mesh installed) the request goes without one."""
    headers = {}
    with contextlib.suppress(OSError):
        words = (Path(state_dir) / "controller.token").read_text().split()
        if words:
            headers["Authorization"] = f"Bearer {words[0]}"
    return urllib.request.Request(url, headers=headers)


# ---------------------------------------------------------------------------- tap streams
class TapStream:
    """`nodemesh tap ...` as a subprocess; stdout lines collected on a thread; SIGINT to stop."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.snapshot() if line.strip()]

    def stop(self) -> tuple[int, str]:
        """Ctrl-C, as a user would; returns (exit code, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        self._reader.join(5)
        return self.proc.returncode, err
