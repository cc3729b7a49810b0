"""A two-node mini cluster of network namespaces for the redirector's own tests, in both CNI styles.

Independent of the sandbox (so capture can be tested on its own): node netns joined by one veth
(the underlay), pods attached as a bridge CNI (cni0 + bridge-nf-call-iptables) or a routed CNI (host
veth without IPv4, /32 route, proxy ARP), and a kube-proxy-like ClusterIP DNAT in KUBE-SERVICES. Every
name starts with a unique prefix; everything is deleted afterwards, even when a test fails.
Addresses exist only inside these namespaces.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

NODE_IP = {1: "10.200.0.1", 2: "10.200.0.2"}
POD_CIDR = {1: "10.201.1.0/24", 2: "10.201.2.0/24"}
CLUSTER_IP = "10.202.0.10"
SERVICE_CIDR = "10.202.0.0/24"
ROUTED_GW = "169.254.1.1"


def run(*argv: str, ns: str | None = None, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(full)}: {proc.returncode} {proc.stderr.strip()}")
    return proc


def sysctl(ns: str, key: str, value: str) -> None:
    run("sysctl", "-qw", f"{key}={value}", ns=ns)


@dataclass
class Pod:
    name: str
    netns: str
    ip: str
    node: int


@dataclass
class MiniCluster:
    prefix: str
    cni: str
    workdir: Path
    nodes: dict[int, str] = field(default_factory=dict)        # k -> netns
    pods: dict[str, Pod] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    # ----------------------------------------------------------------------------------- building
    def build(self) -> None:
        for k in (1, 2):
            ns = f"{self.prefix}-n{k}"
            run("ip", "netns", "add", ns)
            self.nodes[k] = ns
            run("ip", "link", "set", "lo", "up", ns=ns)
            sysctl(ns, "net.ipv4.ip_forward", "1")
        n1, n2 = self.nodes[1], self.nodes[2]
        run("ip", "link", "add", "ul0", "netns", n1, "type", "veth", "peer", "ul0", "netns", n2)
        for k, other in ((1, 2), (2, 1)):
            ns = self.nodes[k]
            run("ip", "addr", "add", f"{NODE_IP[k]}/24", "dev", "ul0", ns=ns)
            run("ip", "link", "set", "ul0", "up", ns=ns)
            run("ip", "route", "add", POD_CIDR[other], "via", NODE_IP[other], ns=ns)
            # ClusterIPs need a route before kube-proxy's DNAT rewrites them (no default route here).
            run("ip", "route", "add", SERVICE_CIDR, "via", NODE_IP[other], ns=ns)
            if self.cni == "bridge":
                gw = POD_CIDR[k].replace(".0/24", ".1")
                run("ip", "link", "add", "cni0", "type", "bridge", ns=ns)
                run("ip", "addr", "add", f"{gw}/24", "dev", "cni0", ns=ns)
                run("ip", "link", "set", "cni0", "up", ns=ns)
                run("modprobe", "br_netfilter", check=False)
                sysctl(ns, "net.bridge.bridge-nf-call-iptables", "1")

    def add_pod(self, name: str, node: int, host: int) -> Pod:
        ns = f"{self.prefix}-{name}"
        node_ns = self.nodes[node]
        ip = POD_CIDR[node].replace(".0/24", f".{host}")
        run("ip", "netns", "add", ns)
        run("ip", "link", "set", "lo", "up", ns=ns)
        hveth = f"v{name}"
        run("ip", "link", "add", hveth, "netns", node_ns, "type", "veth", "peer", "eth0", "netns", ns)
        if self.cni == "bridge":
            gw = POD_CIDR[node].replace(".0/24", ".1")
            run("ip", "link", "set", hveth, "master", "cni0", "up", ns=node_ns)
            run("ip", "addr", "add", f"{ip}/24", "dev", "eth0", ns=ns)
            run("ip", "link", "set", "eth0", "up", ns=ns)
            run("ip", "route", "add", "default", "via", gw, ns=ns)
        else:
            # Calico's trick: every host veth has the same MAC, which pods hold as their gateway's.
            run("ip", "link", "set", hveth, "address", "ee:ee:ee:ee:ee:ee", "up", ns=node_ns)
            sysctl(node_ns, f"net.ipv4.conf.{hveth}.proxy_arp", "1")
            run("ip", "route", "add", f"{ip}/32", "dev", hveth, ns=node_ns)
            run("ip", "addr", "add", f"{ip}/32", "dev", "eth0", ns=ns)
            run("ip", "link", "set", "eth0", "up", ns=ns)
            run("ip", "route", "add", ROUTED_GW, "dev", "eth0", "scope", "link", ns=ns)
            run("ip", "neigh", "add", ROUTED_GW, "lladdr", "ee:ee:ee:ee:ee:ee", "dev", "eth0", "nud",
                "permanent", ns=ns)
            run("ip", "route", "add", "default", "via", ROUTED_GW, ns=ns)
        pod = Pod(name, ns, ip, node)
        self.pods[name] = pod
        return pod

    def add_cluster_ip(self, port: int, endpoint: Pod, target_port: int, backend: str = "") -> None:
        """What kube-proxy does: KUBE-SERVICES jumped from nat PREROUTING and OUTPUT, DNAT to an endpoint."""
        for ns in self.nodes.values():
            rules = (
                "*nat\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\n"
                f"-A KUBE-SERVICES -d {CLUSTER_IP}/32 -p tcp -m tcp --dport {port} "
                f"-j DNAT --to-destination {endpoint.ip}:{target_port}\nCOMMIT\n"
            )
            restore = f"iptables-{backend}-restore" if backend else "iptables-restore"
            subprocess.run(["ip", "netns", "exec", ns, restore, "--noflush"], input=rules,
                           text=True, check=True)

    # -------------------------------------------------------------------------------- processes
    def spawn(self, ns: str, *args: str, log: str) -> subprocess.Popen:
        with open(self.workdir / log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *args], stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def whoami(self, pod: Pod, port: int = 8080) -> subprocess.Popen:
        proc = self.spawn(pod.netns, "-m", "nodemesh.redirector.testing", "whoami", "--port", str(port),
                          log=f"whoami-{pod.name}.log")
        wait_listening(pod.netns, port)
        return proc

    def standin(self, k: int) -> tuple[subprocess.Popen, Path]:
        record = self.workdir / f"standin-n{k}.jsonl"
        record.touch()
        proc = self.spawn(self.nodes[k], "-m", "nodemesh.redirector.testing", "standin", "--record",
                          str(record), "--excluded-file", str(self.excluded_file(k)), log=f"standin-n{k}.log")
        wait_listening(self.nodes[k], 4191)
        return proc, record

    def excluded_file(self, k: int) -> Path:
        return self.workdir / f"excluded-n{k}.txt"

    def dial(self, pod: Pod, host: str, port: int, timeout: float = 3.0) -> subprocess.CompletedProcess:
        return run(sys.executable, "-m", "nodemesh.redirector.testing", "dial", host, str(port),
                   "--timeout", str(timeout), ns=pod.netns, check=False)

    def snapshot(self, k: int) -> str:
        """Everything capture may touch on node k, as text: iptables (both backends), ip rules,
        every routing table, ebtables. Counters and dates left out."""
        ns = self.nodes[k]
        parts = []
        for cmd in (["iptables-nft-save"], ["iptables-legacy-save"], ["ip", "-4", "rule"],
                    ["ip", "-4", "route", "show", "table", "all"], ["ebtables-nft-save"]):
            parts.append(f"## {' '.join(cmd)}\n{strip_counters(run(*cmd, ns=ns).stdout)}")
        return "\n".join(parts)

    def teardown(self) -> None:
        for proc in self.procs:
            try:
                self.stop(proc, signal.SIGKILL, 5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        for pod in self.pods.values():
            run("ip", "netns", "del", pod.netns, check=False)
        for ns in self.nodes.values():
            run("ip", "netns", "del", ns, check=False)


def strip_counters(text: str) -> str:
    from nodemesh.redirector.apply import strip_save
    return strip_save(text)


def wait_listening(ns: str, port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = run("ss", "-Hltn", f"sport = :{port}", ns=ns, check=False).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on :{port} in {ns}")


def assert_same(before: str, after: str, *logs: Path) -> None:
    """Byte-for-byte equality, failing with a readable diff (and the tails of `logs`: what the
    redirectors said about their shutdown)."""
    import difflib
    diff = "\n".join(difflib.unified_diff(before.splitlines(), after.splitlines(), "before", "after",
                                          lineterm=""))
    tails = "".join(f"\n--- {p.name} (tail)\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    assert before == after, diff + tails


def read_records(path: Path) -> list[dict]:
    import json
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def mini_cluster(cni: str, workdir: Path, backend: str = "") -> Iterator[MiniCluster]:
    """Nodes n1, n2; pods a (caller) and b on n1, c on n2; whoami on b and c; ClusterIP -> c:8080.
    `backend`: which iptables the kube-proxy-like rules go to ("" = `iptables` on PATH)."""
    cluster = MiniCluster(prefix=f"nmrd{uuid.uuid4().hex[:5]}", cni=cni, workdir=workdir)
    try:
        cluster.build()
        cluster.add_pod("a", 1, 5)
        cluster.add_pod("b", 1, 6)
        c = cluster.add_pod("c", 2, 7)
        cluster.whoami(cluster.pods["b"])
        cluster.whoami(c)
        cluster.add_cluster_ip(80, c, 8080, backend)
        yield cluster
    finally:
        cluster.teardown()
