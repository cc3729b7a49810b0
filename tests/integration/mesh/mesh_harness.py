"""The sandbox-wide mesh harness: a 2-node sandbox running real peers, with the mesh installed.

`mesh_cluster(cni, workdir)` brings up the sandbox with the `mesh` namespace below (two client pods,
one per node, and one pod of each server), installs the mesh with `install_sandbox`, and always
uninstalls and tears everything down. `Mesh` runs clients inside pods and reads both agents'
`/metrics` over the host's underlay link, turning them into deltas the tests compare exactly.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodemesh.api.model import ADMIN_PORT
from nodemesh.manifests.sandbox_install import install_sandbox, uninstall_sandbox
from nodemesh.sandbox.cluster import Sandbox
from nodemesh.sandbox.testing import agent_admin_request, deployment, running_sandbox, service
from prometheus_client.parser import text_string_to_metric_families

PY = sys.executable
PEERS = str(Path(__file__).with_name("mesh_peers.py"))
NS = "mesh"
BIG_BODY = 3 * 1024 * 1024 + 17  # nginx /big: larger than any socket buffer, odd-sized

# The counters the tests compare exactly (histograms and the gauge are checked elsewhere).
COUNTERS = ("request_total", "response_total", "tcp_open_total", "tcp_close_total",
            "tcp_read_bytes_total", "tcp_write_bytes_total")
# The labels a key keeps: who called whom, in which direction, and how it went. `authority` is
# left out on purpose (each client spells the Host/:authority its own way; it is not what we test).
KEY_LABELS = ("direction", "src_kind", "src_name", "src_pod", "dst_kind", "dst_name", "dst_pod",
              "dst_service", "protocol", "status_code", "grpc_status", "classification", "error")

NGINX_CONF = """
user root;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 100000;
    default_type text/plain;
    server {{
        listen 8080 reuseport;
        listen 8081 http2 reuseport;
        root {dir}/www;
        location = /ok {{ return 200 "ok\\n"; }}
        location = /fail {{ return 500 "boom\\n"; }}
        location = /empty {{ return 204; }}
        location = /big {{ try_files /big.bin =404; }}
    }}
}}
"""


def _deployment(name: str, argv: list[str], ports: list[int], replicas: int = 1) -> str:
    # Every container learns its pod name (the downward API), as whoami answers with it.
    return deployment(name, NS, argv, ports=ports, replicas=replicas, pod_name_env=True)


def _service(name: str, ports: list[tuple[int, int]]) -> str:
    return service(name, NS, [(f"p{p}", p, t) for p, t in ports])


ALL_SERVERS = ("nginx", "grpc", "bulk", "ws", "banner", "whoami")


def manifests(nginx_conf: Path, servers: tuple[str, ...] = ALL_SERVERS) -> str:
    """Clients first: scheduling is least-pods-first, so the two client replicas land one per node.
    Every server has one replica except whoami (two, one per node: the agent picks the endpoint)."""
    deployments = {
        "nginx": _deployment("nginx", ["nginx", "-c", str(nginx_conf), "-g", "daemon off;"], [8080, 8081]),
        "grpc": _deployment("grpc", [PY, PEERS, "grpc-server", "9090"], [9090]),
        "bulk": _deployment("bulk", [PY, PEERS, "bulk-server", "7000"], [7000]),
        "ws": _deployment("ws", [PY, PEERS, "ws-server", "8765"], [8765]),
        "banner": _deployment("banner", [PY, PEERS, "banner-server", "2525"], [2525]),
        "whoami": _deployment("whoami", [PY, PEERS, "whoami-server", "8080"], [8080], replicas=2),
    }
    services = {
        "nginx": _service("nginx", [(80, 8080), (81, 8081)]),
        "grpc": _service("grpc", [(9090, 9090)]),
        "bulk": _service("bulk", [(7000, 7000)]),
        "ws": _service("ws", [(80, 8765)]),
        "banner": _service("banner", [(2525, 2525)]),
        "whoami": _service("whoami", [(80, 8080)]),
    }
    docs = [
        f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NS}\n",
        _deployment("client", ["sleep", "infinity"], [], replicas=2),
        *(deployments[s] for s in servers),
        *(services[s] for s in servers),
    ]
    return "---\n".join(d.strip("\n") + "\n" for d in docs)


def write_nginx(workdir: Path) -> Path:
    d = workdir / "nginx"
    (d / "www").mkdir(parents=True, exist_ok=True)
    (d / "www" / "big.bin").write_bytes(bytes(range(256)) * (BIG_BODY // 256) + b"x" * (BIG_BODY % 256))
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=d))
    return conf


# ---------------------------------------------------------------------------- metrics
Key = tuple[str, str, tuple[str, ...]]  # (node, metric name, KEY_LABELS values)


def parse_counters(text: str, node: str) -> Counter[Key]:
    out: Counter[Key] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removesuffix("_total") + "_total" if sample.name.endswith("_total") else sample.name
            if name not in COUNTERS:
                continue
            labels = tuple(sample.labels.get(k, "") for k in KEY_LABELS)
            out[(node, name, labels)] += int(sample.value)
    return out


@dataclass(frozen=True)
class Pod:
    name: str
    ip: str
    node: str
    workload: str


def series(node: str, metric: str, direction: str, src: Pod | tuple[str, str], dst: Pod, *,
           service: str = "", protocol: str, status: str = "", grpc_status: str = "",
           classification: str = "", error: str = "") -> Key:
    """One expected key. `src` is a Pod or ("unknown", ip) for an address no pod owns."""
    if isinstance(src, Pod):
        src_labels = ("deployment", src.workload, src.name)
    else:
        src_labels = (src[0], src[1], "")
    labels = (direction, *src_labels, "deployment", dst.workload, dst.name, service, protocol,
              status, grpc_status, classification, error)
    return (node, metric, labels)


def both_directions(src: Pod | tuple[str, str], dst: Pod, src_node: str | None, **kw: Any) -> list[tuple[str, str]]:
    """(node, direction) pairs that must record a request: outbound on the caller's node and inbound
    on the callee's node; a same-node request is both on that one node, from one observation. An
    unmeshed caller (src_node None: a node address) is only seen inbound."""
    pairs = [(dst.node, "inbound")]
    if src_node is not None:
        pairs.insert(0, (src_node, "outbound"))
    return pairs


def describe(delta: Counter[Key]) -> str:
    return "\n".join(f"  {v:>10} {k[0]} {k[1]} " + " ".join(f"{n}={x}" for n, x in zip(KEY_LABELS, k[2]) if x)
                     for k, v in sorted(delta.items()))


class Mesh:
    """The running sandbox + mesh, and what the tests need to drive and observe it."""

    def __init__(self, sb: Sandbox, workdir: Path, cni: str, capture: str = "iptables",
                 accelerate: str = "none") -> None:
        self.sb = sb
        self.capture = capture
        self.accelerate = accelerate
        self.workdir = workdir
        self.cni = cni
        self.nodes = {n.name: n for n in sb.nodes()}
        self.pods: dict[str, list[Pod]] = {}
        for p in sb.pods(NS):
            workload = p["metadata"]["labels"]["app"]
            self.pods.setdefault(workload, []).append(
                Pod(p["metadata"]["name"], p["status"]["podIP"], p["spec"]["nodeName"], workload))
        clients = self.pods["client"]
        assert sorted(c.node for c in clients) == sorted(self.nodes), f"clients not one per node: {clients}"
        self.cluster_ips = {s["metadata"]["name"]: s["spec"]["clusterIP"]
                            for s in sb.objects().of_kind("Service") if s["metadata"]["namespace"] == NS}

    # -- pods
    def server(self, workload: str) -> Pod:
        (pod,) = self.pods[workload]
        return pod

    def client_near(self, server: Pod, same_node: bool) -> Pod:
        return next(c for c in self.pods["client"] if (c.node == server.node) == same_node)

    def other_node(self, node: str) -> str:
        return next(n for n in self.nodes if n != node)

    def run(self, pod: Pod, argv: list[str], timeout: float = 90.0) -> dict[str, Any]:
        """Run a client in the pod and return its JSON report (fails with its output otherwise)."""
        res = self.sb.exec(NS, pod.name, argv, capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, f"{argv} in {pod.name}: rc={res.returncode}\n{res.stdout}\n{res.stderr}"
        return json.loads(res.stdout.strip().splitlines()[-1])

    def peer(self, pod: Pod, kind: str, *args: object, timeout: float = 90.0) -> dict[str, Any]:
        return self.run(pod, [PY, PEERS, kind, *map(str, args)], timeout=timeout)

    # -- metrics
    def scrape(self, node: str) -> str:
        url = f"http://{self.nodes[node].ip}:{ADMIN_PORT}/metrics"
        # The host's underlay link routes to nodes; off the node, /metrics needs a credential.
        with urllib.request.urlopen(agent_admin_request(self.sb.state_dir, url), timeout=5) as resp:
            return resp.read().decode()

    def counters(self) -> Counter[Key]:
        total: Counter[Key] = Counter()
        for node in self.nodes:
            total.update(parse_counters(self.scrape(node), node))
        return total

    @contextlib.contextmanager
    def measure(self) -> Iterator[Callable[[Counter[Key]], Counter[Key]]]:
        """`with mesh.measure() as settle: ...traffic...; delta = settle(expected)`.

        settle polls both agents until the delta of every counter since the block began equals
        `expected` (workers report every ~1 s), then waits one more report interval and checks the
        delta did not move: a late double count would show up then. Returns the delta either way
        (the caller asserts equality, so a mismatch prints both)."""
        before = self.counters()

        def settle(expected: Counter[Key], project: Callable[[Counter[Key]], Counter[Key]] = lambda d: d,
                   timeout: float = 20.0) -> Counter[Key]:
            expected = +expected
            deadline = time.monotonic() + timeout
            delta = self._delta(before)
            while project(delta) != expected and time.monotonic() < deadline:
                time.sleep(0.25)
                delta = self._delta(before)
            if project(delta) == expected:
                time.sleep(1.5)  # > report interval (1 s): anything still in flight lands now
                delta = self._delta(before)
            return delta

        yield settle

    def open_connections(self) -> dict[Key, int]:
        """Non-zero `tcp_open_connections` gauges: after a scenario every connection must be closed."""
        out: dict[Key, int] = {}
        for node in self.nodes:
            for family in text_string_to_metric_families(self.scrape(node)):
                for sample in family.samples:
                    if sample.name == "tcp_open_connections" and sample.value:
                        out[(node, sample.name, tuple(sample.labels.get(k, "") for k in KEY_LABELS))] = \
                            int(sample.value)
        return out

    def _delta(self, before: Counter[Key]) -> Counter[Key]:
        now = self.counters()
        return +Counter({k: now[k] - before.get(k, 0) for k in now})


def expect_requests(mesh: Mesh, src: Pod | tuple[str, str], dst: Pod, src_node: str | None, *, protocol: str,
                    requests: int, responses: dict[tuple[str, str, str], int], service: str = "",
                    opens: int = 1, read: int | None = None, write: int | None = None) -> Counter[Key]:
    """Expected deltas of one client's run, in every direction that must record it.

    responses: (status_code, grpc_status, classification) -> count. read/write: exact byte counts
    when the test knows them (opaque TCP); None leaves bytes to `bytes_seen` checks."""
    exp: Counter[Key] = Counter()
    for node, direction in both_directions(src, dst, src_node):
        # Inbound on another node: the callee's agent sees a pod IP, not the Service that was dialled.
        svc = service if (direction == "outbound" or node == src_node) else ""
        kw = {"service": svc, "protocol": protocol}
        if requests:
            exp[series(node, "request_total", direction, src, dst, **kw)] += requests
        for (status, grpc_status, cls), n in responses.items():
            exp[series(node, "response_total", direction, src, dst, status=status, grpc_status=grpc_status,
                       classification=cls, **kw)] += n
        exp[series(node, "tcp_open_total", direction, src, dst, **kw)] += opens
        exp[series(node, "tcp_close_total", direction, src, dst, **kw)] += opens
        if read is not None:
            exp[series(node, "tcp_read_bytes_total", direction, src, dst, **kw)] += read
        if write is not None:
            exp[series(node, "tcp_write_bytes_total", direction, src, dst, **kw)] += write
    return exp


def without_bytes(delta: Counter[Key]) -> Counter[Key]:
    return Counter({k: v for k, v in delta.items() if k[1] not in ("tcp_read_bytes_total", "tcp_write_bytes_total")})


def bytes_of(delta: Counter[Key], metric: str) -> dict[tuple[str, str], int]:
    """(node, direction) -> bytes, for the byte counters the test checks with bounds."""
    out: Counter[tuple[str, str]] = Counter()
    for (node, name, labels), v in delta.items():
        if name == metric:
            out[(node, labels[0])] += v
    return dict(out)


@contextlib.contextmanager
def mesh_cluster(cni: str, workdir: Path, capture: str = "iptables", accelerate: str = "none") -> Iterator[Mesh]:
    """The sandbox with the peers running and the mesh installed (outbound capture by iptables
    or eBPF); always uninstalled and torn down."""
    conf = write_nginx(workdir)
    with running_sandbox(nodes=2, cni=cni, manifests=[manifests(conf)], timeout=90,
                         backoff=(1.0, 5.0)) as sb:
        try:
            install_sandbox(sb.name, timeout=60, progress=lambda _msg: None, capture=capture, accelerate=accelerate)
            yield Mesh(sb, workdir, cni, capture, accelerate)
        finally:
            with contextlib.suppress(Exception):
                uninstall_sandbox(sb.name, progress=lambda _msg: None)

