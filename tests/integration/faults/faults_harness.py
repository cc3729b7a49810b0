"""The fault tests' cluster: a 2-node sandbox with the mesh installed, a client pod on each node,
an echo server (:9000), nginx (HTTP/1.1 :8080, h2c :8081) and a gRPC server (:50051), in one
namespace `faults`; Service `refused` (:8080) selects nginx and `refuser` (nothing listens on
8080), Service `silent` nginx and `blackhole` (the retry test drops its SYNs).

The agents run 2 workers (the agent's default on this 2-CPU machine; `install --sandbox` picks 1 to
save memory): every process here is held to a hard limit of 20,000 fds that it cannot raise (no
CAP_SYS_RESOURCE), and 10,000 relayed connections take 20,000. On a node whose hard limit is
higher, one worker raises its own limit to it (sockets.raise_fd_limit).

`faults_cluster(cni, workdir)` always uninstalls and tears down. `Faults` runs clients in pods and
reads what the tests measure on the nodes: the agents' /metrics, their processes' memory (PSS) and
fds, the listeners' backlog and the kernel's listen-queue overflow counter.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodemesh.api.model import ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT
from nodemesh.manifests.sandbox_install import (
    agent_process,
    install_sandbox,
    redirector_process,
    uninstall_sandbox,
)
from nodemesh.redirector.plan import hook_present
from nodemesh.sandbox.cluster import Sandbox
from nodemesh.sandbox.testing import agent_admin_request, deployment, running_sandbox
from prometheus_client.parser import text_string_to_metric_families

PY = sys.executable
PEERS = str(Path(__file__).with_name("faults_peers.py"))
NS = "faults"
ECHO_PORT = 9000
AGENT_WORKERS = 2
DEAD_NODE = "node1"  # where the dead endpoints of Services `refused` and `silent` run
GRPC_PORT = 50051   # faults_peers.py grpc-server: bidirectional echo streams (the upgrade test)
TUPLE_PORT = 9001   # a second echo port, only for the tuple test (its TIME_WAITs must not meet others')

NGINX_CONF = """
user root;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log crit;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
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
        listen 8080 reuseport backlog=8192;
        listen 8081 http2 reuseport backlog=8192;
        location = /ok {{ return 200 "ok\\n"; }}
        location / {{ return 200 "root\\n"; }}
    }}
}}
"""


def _deployment(name: str, argv: list[str], ports: list[int], replicas: int = 1,
                labels: dict[str, str] | None = None, node: str | None = None) -> str:
    return deployment(name, NS, argv, ports=ports, replicas=replicas, labels=labels, node=node)


def manifests(nginx_conf: Path) -> str:
    """Clients first (least-pods-first scheduling puts one on each node), then the servers."""
    docs = [
        f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NS}\n",
        _deployment("client", ["sleep", "infinity"], [], replicas=2),
        _deployment("echo", [PY, PEERS, "echo-server", f"{ECHO_PORT},{TUPLE_PORT}"], [ECHO_PORT, TUPLE_PORT]),
        _deployment("nginx", ["nginx", "-c", str(nginx_conf), "-g", "daemon off;"], [8080, 8081],
                    labels={"refused": "yes", "silent": "yes"}),
        _deployment("grpc", [PY, PEERS, "grpc-server", str(GRPC_PORT)], [GRPC_PORT]),
        # Services `refused` and `silent`: nginx plus a ready endpoint that never answers on 8080 —
        # `refuser` (nothing listens) and `blackhole` (its SYNs dropped: the test adds the rule).
        # No containerPort: ready without a probe (the kubelet would probe the first port). On
        # DEAD_NODE, so that one client dials them from their node and the other across nodes.
        _deployment("refuser", ["sleep", "infinity"], [], labels={"refused": "yes"}, node=DEAD_NODE),
        _deployment("blackhole", ["sleep", "infinity"], [], labels={"silent": "yes"}, node=DEAD_NODE),
        *(f"apiVersion: v1\nkind: Service\nmetadata:\n  name: {svc}\n  namespace: {NS}\nspec:\n"
          f"  selector: {{{svc}: \"yes\"}}\n  ports: [{{port: 8080, targetPort: 8080}}]\n"
          for svc in ("refused", "silent")),
    ]
    return "---\n".join(d.strip("\n") + "\n" for d in docs)


def write_nginx(workdir: Path) -> Path:
    d = workdir / "nginx"
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=d))
    return conf


@dataclass(frozen=True)
class Pod:
    name: str
    ip: str
    node: str
    workload: str


def pss_kb(pid: int) -> int:
    """Proportional set size of one process (shared pages split between their users)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def nofile_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    return 0


def nofile_hard() -> int:
    """The hard fd limit this test runs with (what a node process could raise its soft limit to)."""
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


class Faults:
    """The running sandbox + mesh, and what the fault tests drive and measure."""

    def __init__(self, sb: Sandbox, workdir: Path, cni: str) -> None:
        self.sb = sb
        self.workdir = workdir
        self.cni = cni
        self.nodes = {n.name: n for n in sb.nodes()}
        self.pods: dict[str, list[Pod]] = {}
        for p in sb.pods(NS):
            workload = p["metadata"]["labels"]["app"]
            self.pods.setdefault(workload, []).append(
                Pod(p["metadata"]["name"], p["status"]["podIP"], p["spec"]["nodeName"], workload))
        assert sorted(c.node for c in self.pods["client"]) == sorted(self.nodes), self.pods["client"]
        pythonpath = os.environ.get("PYTHONPATH")
        for node in self.nodes:  # the agents run the code under test
            environ = Path(f"/proc/{self.agent_pids(node)[0]}/environ").read_bytes().split(b"\0")
            assert not pythonpath or f"PYTHONPATH={pythonpath}".encode() in environ, (node, pythonpath)

    # -- pods
    def server(self, workload: str) -> Pod:
        (pod,) = self.pods[workload]
        return pod

    def client_near(self, server: Pod, same_node: bool) -> Pod:
        return next(c for c in self.pods["client"] if (c.node == server.node) == same_node)

    def routes(self, workload: str) -> list[tuple[str, Pod, Pod]]:
        """("same-node" | "cross-node", client, server)."""
        srv = self.server(workload)
        return [("same-node", self.client_near(srv, True), srv), ("cross-node", self.client_near(srv, False), srv)]

    def peer(self, pod: Pod, kind: str, *args: object, timeout: float = 300.0) -> dict[str, Any]:
        res = self.sb.exec(NS, pod.name, [PY, PEERS, kind, *map(str, args)], capture_output=True, text=True,
                           timeout=timeout)
        assert res.returncode == 0, f"{kind} in {pod.name}: rc={res.returncode}\n{res.stdout}\n{res.stderr}"
        return json.loads(res.stdout.strip().splitlines()[-1])

    def peer_background(self, pod: Pod, kind: str, *args: object) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", self.sb.pod_netns(NS, pod.name), PY, PEERS, kind,
                                 *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def node_run(self, node: str, argv: list[str], timeout: float = 60.0) -> str:
        res = self.sb.node_exec(node, argv, capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, f"{argv} on {node}: {res.stdout}\n{res.stderr}"
        return res.stdout

    # -- agents
    def agent_pids(self, node: str) -> list[int]:
        """The agent's parent first, then its workers."""
        parent = self.sb.node_process_pid(agent_process(node))
        assert parent is not None, f"no agent on {node}"
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        return [parent, *map(int, children)]

    def worker_pids(self, node: str) -> list[int]:
        """The parent's workers: not the short-lived helpers it also starts (its capture check runs
        `iptables-nft -S`, which may be gone by the time we read it)."""
        workers = []
        for pid in self.agent_pids(node)[1:]:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"nodemesh.agent" in cmdline:
                workers.append(pid)
        return workers

    def scrape(self, node: str, path: str = "/metrics", timeout: float = 10.0) -> str:
        url = f"http://{self.nodes[node].ip}:{ADMIN_PORT}{path}"
        with urllib.request.urlopen(agent_admin_request(self.sb.state_dir, url), timeout=timeout) as resp:
            return resp.read().decode()

    def metric_sum(self, node: str, name: str, **labels: str) -> float:
        total = 0.0
        for family in text_string_to_metric_families(self.scrape(node)):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def listen_backlogs(self, node: str) -> dict[int, list[int]]:
        """port -> the backlog of every listener on it (ss prints it as Send-Q of a LISTEN socket)."""
        out = self.node_run(node, ["ss", "-Hltn"])
        backlogs: dict[int, list[int]] = {}
        for line in out.splitlines():
            fields = line.split()
            port = int(fields[3].rsplit(":", 1)[1])
            backlogs.setdefault(port, []).append(int(fields[2]))
        return {p: backlogs.get(p, []) for p in (OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT)}

    def netstat(self, netns: str) -> dict[str, int]:
        """The TcpExt and Tcp counters of a network namespace (/proc/net/netstat and snmp)."""
        res = subprocess.run(["ip", "netns", "exec", netns, "cat", "/proc/net/netstat", "/proc/net/snmp"],
                             capture_output=True, text=True, check=True)
        lines = res.stdout.splitlines()
        out: dict[str, int] = {}
        for head, values in zip(lines[::2], lines[1::2]):
            prefix = head.split(":")[0]
            if prefix in ("TcpExt", "Tcp"):
                out.update({f"{prefix}{k}": int(v) for k, v in zip(head.split()[1:], values.split()[1:])})
        return out

    @contextlib.contextmanager
    def port_range(self, netns: list[str], low: int, high: int) -> Iterator[None]:
        """net.ipv4.ip_local_port_range of these namespaces set to [low, high], then put back."""
        saved = {}
        for ns in netns:
            saved[ns] = subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-n", "net.ipv4.ip_local_port_range"],
                                       capture_output=True, text=True, check=True).stdout.split()
        try:
            for ns in netns:
                subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.ip_local_port_range={low} {high}"],
                               check=True)
            yield
        finally:
            for ns, (lo, hi) in saved.items():
                subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.ip_local_port_range={lo} {hi}"],
                               check=False)

    def listen_overflows(self, node: str) -> int:
        """TcpExtListenOverflows of the node's network namespace."""
        lines = self.node_run(node, ["cat", "/proc/net/netstat"]).splitlines()
        for head, values in zip(lines[::2], lines[1::2]):
            if head.startswith("TcpExt:"):
                return int(dict(zip(head.split()[1:], values.split()[1:]))["ListenOverflows"])
        raise AssertionError("no TcpExt in /proc/net/netstat")

    def hooked(self, node: str) -> bool:
        return hook_present(self.node_run(node, ["iptables-save", "-t", "nat"]))

    @contextlib.contextmanager
    def unmeshed(self, timeout: float = 30.0) -> Iterator[None]:
        """Capture off on both nodes for the block (the redirectors stopped: SIGTERM takes their
        rules out), then the same redirectors started again and capture back: a direct run in the
        same cluster, same pods, same moment as the meshed one."""
        saved = {n: self.sb.state.infra().get("node_processes", {})[redirector_process(n)] for n in self.nodes}
        for n in self.nodes:
            self.sb.stop_node_process(n, redirector_process(n))
        try:
            _wait_for(lambda: not any(self.hooked(n) for n in self.nodes), timeout, "capture removed")
            yield
        finally:
            for n, proc in saved.items():
                self.sb.start_node_process(n, redirector_process(n), proc["argv"], env=proc["env"])
            _wait_for(lambda: all(self.hooked(n) for n in self.nodes), timeout, "capture back")

    def cluster_ip(self, service: str) -> str:
        (svc,) = [s for s in self.sb.objects().of_kind("Service")
                  if s["metadata"]["namespace"] == NS and s["metadata"]["name"] == service]
        return str(svc["spec"]["clusterIP"])

    def wait_agents_idle(self, timeout: float = 60.0) -> None:
        """Every relayed connection is gone (tcp_open_connections 0 on both nodes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.metric_sum(n, "tcp_open_connections") == 0 for n in self.nodes):
                return
            time.sleep(0.5)
        raise AssertionError(self.open_connections_report())

    def open_connections_report(self) -> str:
        """What is still open, for a failure message: the agents' non-zero open-connection series
        (who to whom) and the node's TCP sockets that are not listeners or TIME_WAIT (their state,
        timers and owning process), so a leak names itself."""
        lines = []
        for n in self.nodes:
            series = [f"  {s.labels} = {s.value:g}"
                      for family in text_string_to_metric_families(self.scrape(n)) for s in family.samples
                      if s.name == "tcp_open_connections" and s.value]
            sockets = self.node_run(n, ["ss", "-Htanpo", "state", "all", "exclude", "listening",
                                        "exclude", "time-wait"])
            lines += [f"{n}: open series", *series, f"{n}: sockets", sockets]
        return "\n".join(lines)


def _wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting: {what}")
        time.sleep(0.2)


@contextlib.contextmanager
def node_processes_run_this_checkout() -> Iterator[None]:
    """The sandbox's kubelet starts node processes (agent, redirector, controller) with a clean
    environment, so they import whichever nodemesh the interpreter finds on its own (the installed
    checkout), not the code under test when PYTHONPATH points elsewhere (a worktree). While this is
    active, node processes started through `Sandbox.start_node_process` get this PYTHONPATH."""
    pythonpath = os.environ.get("PYTHONPATH")
    if not pythonpath:
        yield
        return
    original = Sandbox.start_node_process

    def start(self: Sandbox, node: str, name: str, argv: list[str], env: dict[str, str] | None = None,
              timeout: float = 10.0) -> int:
        return original(self, node, name, argv, {"PYTHONPATH": pythonpath, **(env or {})}, timeout)

    Sandbox.start_node_process = start  # type: ignore[method-assign]
    try:
        yield
    finally:
        Sandbox.start_node_process = original  # type: ignore[method-assign]


@contextlib.contextmanager
def faults_cluster(cni: str, workdir: Path) -> Iterator[Faults]:
    conf = write_nginx(workdir)
    with running_sandbox(nodes=2, cni=cni, manifests=[manifests(conf)], timeout=90, backoff=(1.0, 5.0)) as sb:
        try:
            with node_processes_run_this_checkout():
                install_sandbox(sb.name, workers=AGENT_WORKERS, timeout=60, progress=lambda _msg: None)
            yield Faults(sb, workdir, cni)
        finally:
            with contextlib.suppress(Exception):
                uninstall_sandbox(sb.name, progress=lambda _msg: None)
