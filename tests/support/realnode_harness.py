"""The mesh on a sandbox that runs it the way Kubernetes does (issue 11), for the realnode tests.

`realnode_mesh(nodes=2)` brings up a sandbox with the API server pod (hostNetwork, behind
`default/kubernetes`), an app in namespace `rn`, and the mesh installed with
`install_sandbox(as_pods=True)`: the controller a pod of namespace `nodemesh`, the agent and
redirector a hostNetwork DaemonSet pod per node. The app, per node k: `server-nodek` (an HTTP
server on the pod network answering its pod name, behind Service `server`), `client-nodek`
(`sleep infinity`, to exec from), and on node1 `hostecho` (an HTTP server with `hostNetwork: true`
behind Service `hostecho`: an endpoint on the node's own network, like the API server, which also
runs on node1). With two nodes the scheduler (fewest pods first) then puts the controller on node2.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.cli.client import ClientConfig, CliError, connect
from nodemesh.manifests.render import InstallValues, apply_sets, dump_documents
from nodemesh.manifests.sandbox_install import TOKEN_FILE, install_sandbox, sandbox_documents
from nodemesh.redirector.plan import hook_present
from nodemesh.sandbox import naming
from nodemesh.sandbox.cluster import Sandbox
from nodemesh.sandbox.state import read_json
from nodemesh.sandbox.testing import deployment, running_sandbox

HERE = Path(__file__).resolve().parents[1] / "integration" / "realnode"  # its load script
LOAD = HERE / "realnode_load.py"
PY = sys.executable
MESH_NS = "nodemesh"

WHOAMI = r"""
import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        body = os.environ["POD_NAME"].encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer.allow_reuse_address = True
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"""


def _deployment(name: str, node: str, argv: list[str], port: int | None, labels: dict[str, str],
                host_network: bool = False) -> str:
    return "---" + deployment(name, "rn", argv, ports=[("http", port)] if port else [], selector={"pod": name},
                              labels=labels, container="main", pod_name_env=True, node=node,
                              host_network=host_network, readiness_tcp=bool(port))


def app_manifest(nodes: int) -> str:
    docs = ["apiVersion: v1\nkind: Namespace\nmetadata: {name: rn}\n"]
    for k in range(1, nodes + 1):
        node = f"node{k}"
        docs.append(_deployment(f"server-{node}", node, [PY, "-c", WHOAMI, "8080"], 8080, {"app": "server"}))
        docs.append(_deployment(f"client-{node}", node, ["sleep", "infinity"], None, {"app": "client"}))
    docs.append(_deployment("hostecho", "node1", [PY, "-c", WHOAMI, "9180"], 9180, {"app": "hostecho"},
                            host_network=True))
    for svc, port in (("server", 8080), ("hostecho", 9180)):
        docs.append(f"""---
apiVersion: v1
kind: Service
metadata: {{name: {svc}, namespace: rn}}
spec:
  selector: {{app: {svc}}}
  ports: [{{port: 80, targetPort: {port}}}]
""")
    return "".join(docs)


def wait_for(predicate: Callable[[], Any], timeout: float, step: float = 0.2) -> float | None:
    """Seconds until `predicate()` held, or None if it never did within `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with contextlib.suppress(Exception):
            if predicate():
                return time.monotonic() - start
        time.sleep(step)
    return None


class RealNode:
    def __init__(self, sb: Sandbox, controller: str, sets: tuple[str, ...] = (), cni: str = "bridge") -> None:
        self.sb = sb
        self.cni = cni
        self.controller = controller
        self.sets = sets
        self.token = (Path(sb.state_dir) / TOKEN_FILE).read_text().strip()
        self.nodes = [n.name for n in sb.nodes()]

    # ------------------------------------------------------------------ pods
    def pod(self, namespace: str, prefix: str, node: str | None = None) -> str:
        for p in self.sb.pods(namespace):
            if p["metadata"]["name"].startswith(prefix) and (node is None or p["spec"]["nodeName"] == node):
                return str(p["metadata"]["name"])
        raise LookupError(f"no pod {namespace}/{prefix}* on {node or 'any node'}")

    def client(self, node: str) -> str:
        return self.pod("rn", f"client-{node}-")

    def agent_pod(self, node: str) -> str:
        return self.pod(MESH_NS, "nodemesh-agent-", node)

    def controller_pod(self) -> dict[str, Any]:
        return next(p for p in self.sb.pods(MESH_NS) if p["metadata"]["name"].startswith("nodemesh-controller-"))

    def node_ip(self, node: str) -> str:
        return self.sb.node(node).ip

    def log(self, namespace: str, pod: str, container: str) -> str:
        return self.sb.logs(namespace, pod, container)

    def agent_log(self, node: str) -> str:
        return self.log(MESH_NS, self.agent_pod(node), "agent")

    def redirector_log(self, node: str) -> str:
        return self.log(MESH_NS, self.agent_pod(node), "redirector")

    def mesh_logs(self) -> str:
        """Every mesh container's log tail, for a failure message."""
        out = []
        for path in sorted((Path(self.sb.state_dir) / "logs").glob(f"{MESH_NS}_*.log")):
            out.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(out)

    # ------------------------------------------------------------------ traffic
    def fetch(self, client: str, url: str, timeout: float = 3.0) -> tuple[bool, str]:
        code = ("import sys, urllib.request\n"
                "try:\n"
                f"    print(urllib.request.urlopen(sys.argv[1], timeout={timeout}).read().decode())\n"
                "except Exception as exc:\n"
                "    print('ERROR', repr(exc)); sys.exit(1)\n")
        res = self.sb.exec("rn", client, [PY, "-c", code, url], capture_output=True, text=True, timeout=timeout + 10)
        return res.returncode == 0, res.stdout.strip()

    def start_load(self, client: str, url: str, out: Path, rate: float = 100.0, duration: float = 60.0,
                   timeout: float = 2.0) -> subprocess.Popen[bytes]:
        out.unlink(missing_ok=True)
        return subprocess.Popen(["ip", "netns", "exec", self.sb.pod_netns("rn", client), PY, str(LOAD),
                                 "--url", url, "--rate", str(rate), "--duration", str(duration),
                                 "--timeout", str(timeout), "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @staticmethod
    def records(out: Path) -> list[dict[str, Any]]:
        if not out.exists():
            return []
        return [json.loads(line) for line in out.read_text().splitlines() if line.strip().endswith("}")]

    # ------------------------------------------------------------------ changing the mesh
    def apply_install(self, *sets: str) -> None:
        """`kubectl apply` of the install rendered with more `--set`s (a change rolls the pods)."""
        values = apply_sets(InstallValues(), (*self.sets, *sets))
        self.sb.apply(text=dump_documents(sandbox_documents(values), "# realnode test\n"))

    def agent_revision(self) -> str:
        ds = next(o for o in self.sb.objects().of_kind("DaemonSet") if o["metadata"]["namespace"] == MESH_NS)
        return naming.template_hash(ds["spec"]["template"])

    def rollout_done(self) -> bool:
        """Every node runs one agent pod of the current template, Ready, and no process of an older
        one is left (a replaced pod's containers stop with its grace period)."""
        revision = self.agent_revision()
        pods = [p for p in self.sb.pods(MESH_NS) if p["metadata"]["name"].startswith("nodemesh-agent-")]
        current = [p for p in pods if p["metadata"]["labels"].get("controller-revision-hash") == revision]
        if len(pods) != len(self.nodes) or len(current) != len(self.nodes):
            return False
        if not all(c["type"] != "Ready" or c["status"] == "True" for p in current for c in p["status"]["conditions"]):
            return False
        live = {p["metadata"]["uid"] for p in self.sb.pods()}
        pids = read_json(Path(self.sb.state_dir) / "runtime.json", {}).get("pids", {})
        return not any(k.startswith("pod/") and k.split("/")[1] not in live for k in pids)

    # ------------------------------------------------------------------ the mesh's state
    def capture_hooked(self, node: str) -> bool:
        return bool(self.capture_state(node))

    def capture_state(self, node: str) -> bool | None:
        """Is the capture hook in the node's nat PREROUTING? None: the read failed (iptables-save
        can fail while another writer's transaction is under way), which says nothing."""
        backend = self.sb.node(node).iptables
        res = self.sb.node_exec(node, [f"iptables-{backend}-save", "-t", "nat"], capture_output=True,
                                text=True, timeout=10)
        if res.returncode != 0 or "*nat" not in res.stdout:
            return None
        return hook_present(res.stdout)

    def agent_metrics(self, node: str) -> str:
        code = ("import urllib.request\n"
                "print(urllib.request.urlopen('http://127.0.0.1:4191/metrics', timeout=3).read().decode())\n")
        res = self.sb.node_exec(node, [PY, "-c", code], capture_output=True, text=True, timeout=15)
        return res.stdout

    def check(self) -> pb.CheckResponse | None:
        try:
            with connect(ClientConfig(controller=self.controller, token=self.token, timeout_s=3.0)) as api:
                return api.unary("Check", pb.CheckRequest())
        except CliError:
            return None

    def healthy(self) -> bool:
        """Every node: agent connected and ready, capture installed (what `nodemesh check` needs)."""
        resp = self.check()
        if resp is None:
            return False
        good = {n.node for n in resp.nodes if n.agent_connected and n.agent_ready and n.capture_installed}
        return set(self.nodes) <= good

    def stat_json(self, *args: str) -> list[dict[str, Any]]:
        env = {**os.environ, "NODEMESH_SANDBOX": self.sb.name, "NODEMESH_CONTROLLER": self.controller,
               "NODEMESH_TOKEN": self.token}
        res = subprocess.run([PY, "-m", "nodemesh", "stat", *args, "-o", "json"], capture_output=True, text=True,
                             env=env, timeout=30, check=False)
        if res.returncode != 0:
            return []
        data = json.loads(res.stdout or "[]")
        return data if isinstance(data, list) else data.get("rows", [])


def series(metrics: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels` (values: regexes)."""
    total = 0.0
    for line in metrics.splitlines():
        if not line.startswith(name + "{"):
            continue
        body, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', body))
        if all(re.fullmatch(v, found.get(k, "")) for k, v in labels.items()):
            total += float(value)
    return total


@contextlib.contextmanager
def realnode_mesh(nodes: int = 2, cni: str = "bridge", iptables: str | dict[str, str] | None = None,
                  sets: tuple[str, ...] = ("agentWorkers=1", "drainGraceSeconds=5")) -> Iterator[RealNode]:
    """The sandbox, its API server, the app, and the mesh as pods; always torn down."""
    with running_sandbox(nodes=nodes, cni=cni, manifests=[app_manifest(nodes)], backoff=(1.0, 10.0),
                         iptables=iptables, timeout=60) as sb:
        controller = install_sandbox(sb.name, timeout=120, progress=lambda _m: None, as_pods=True, sets=sets)
        yield RealNode(sb, controller, sets, cni)
