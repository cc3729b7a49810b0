"""Network namespaces for the agent's integration tests: client -> agent (router) -> servers.

    client ns  10.201.1.2 --veth-- 10.201.1.1  agent ns  10.201.2.1 --veth-- 10.201.2.2 server ns
                                                                                10.201.2.3 (second IP)

The agent namespace routes between the two and REDIRECTs every TCP connection arriving from the
client side to the agent's outbound port (what the redirector does on a node), plus the
return-path rules that let the agent's upstream keep the client's address (IP_TRANSPARENT):
replies addressed to the client that belong to a transparent socket are delivered locally.
Names carry a random prefix; everything is removed with the namespaces.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

CLIENT_IP = "10.201.1.2"
AGENT_CLIENT_SIDE = "10.201.1.1"
AGENT_SERVER_SIDE = "10.201.2.1"
SERVER_IP = "10.201.2.2"
SERVER_IP2 = "10.201.2.3"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


@dataclass
class Topology:
    prefix: str
    client: str
    agent: str
    server: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def exec(self, ns: str, *argv: str, **kw: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def run(self, ns: str, *argv: str, timeout: float = 60, input: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                              timeout=timeout, input=input, check=check)

    def python(self, ns: str, code: str, timeout: float = 60) -> str:
        """Run Python code in a namespace; returns stdout, raises with stderr on failure."""
        res = self.run(ns, sys.executable, "-c", code, timeout=timeout, check=False)
        if res.returncode != 0:
            raise AssertionError(f"python in {ns} failed ({res.returncode}):\n{res.stderr}\n{res.stdout}")
        return res.stdout

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


@contextmanager
def topology() -> Iterator[Topology]:
    prefix = "nmat" + uuid.uuid4().hex[:6]
    t = Topology(prefix, f"{prefix}c", f"{prefix}a", f"{prefix}s")
    try:
        for ns in (t.client, t.agent, t.server):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", f"{prefix}c0", "netns", t.client, "type", "veth",
           "peer", "name", f"{prefix}a0", "netns", t.agent)
        sh("ip", "link", "add", f"{prefix}s0", "netns", t.server, "type", "veth",
           "peer", "name", f"{prefix}a1", "netns", t.agent)
        cmds = [
            (t.client, f"addr add {CLIENT_IP}/24 dev {prefix}c0"),
            (t.client, f"link set {prefix}c0 up"),
            (t.client, f"route add default via {AGENT_CLIENT_SIDE}"),
            (t.agent, f"addr add {AGENT_CLIENT_SIDE}/24 dev {prefix}a0"),
            (t.agent, f"addr add {AGENT_SERVER_SIDE}/24 dev {prefix}a1"),
            (t.agent, f"link set {prefix}a0 up"),
            (t.agent, f"link set {prefix}a1 up"),
            (t.agent, "rule add fwmark 0x1 lookup 100"),
            (t.agent, "route add local 0.0.0.0/0 dev lo table 100"),
            (t.server, f"addr add {SERVER_IP}/24 dev {prefix}s0"),
            (t.server, f"addr add {SERVER_IP2}/24 dev {prefix}s0"),
            (t.server, f"link set {prefix}s0 up"),
            (t.server, f"route add default via {AGENT_SERVER_SIDE}"),
        ]
        for ns, cmd in cmds:
            sh("ip", "-n", ns, *cmd.split())
        t.run(t.agent, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # The capture rule (the redirector's job on a node) and the transparent return path.
        t.run(t.agent, "iptables", "-t", "nat", "-A", "PREROUTING", "-i", f"{prefix}a0", "-p", "tcp",
              "-j", "REDIRECT", "--to-ports", "4140")
        t.run(t.agent, "iptables", "-t", "mangle", "-A", "PREROUTING", "-i", f"{prefix}a1", "-p", "tcp",
              "-m", "socket", "--transparent", "-j", "MARK", "--set-mark", "1")
        # The agent's upstream connections in a conntrack zone of their own (the redirector's
        # raw-table rule): their tuples may be the client's own.
        t.run(t.agent, "iptables", "-t", "raw", "-A", "OUTPUT", "-p", "tcp", "-m", "addrtype", "!",
              "--src-type", "LOCAL", "-j", "CT", "--zone-orig", "4140")
        yield t
    finally:
        t.stop_all()
        for ns in (t.client, t.agent, t.server):
            sh("ip", "netns", "del", ns, check=False)


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    event_log: Path
    stderr: Path

    def events(self) -> list[dict[str, object]]:
        if not self.event_log.exists():
            return []
        return [json.loads(line) for line in self.event_log.read_text().splitlines() if line.strip()]

    def sigterm(self) -> None:
        self.proc.send_signal(signal.SIGTERM)


def start_agent(t: Topology, tmp: Path, name: str = "agent", workers: int = 1,
                extra: tuple[str, ...] = ()) -> Agent:
    event_log = tmp / f"{name}-events.jsonl"
    stderr = tmp / f"{name}.log"
    argv = [sys.executable, "-m", "nodemesh.agent", "--node", "n1", "--node-ip", AGENT_CLIENT_SIDE,
            "--pod-cidr", "10.201.1.0/24", "--workers", str(workers), "--event-log", str(event_log),
            "--log-level", "info", *extra]
    with open(stderr, "wb") as err:
        proc = t.exec(t.agent, *argv, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if "event=agent_ready" in stderr.read_text(errors="replace"):
            return Agent(proc, event_log, stderr)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"agent did not become ready:\n{stderr.read_text(errors='replace')}")


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def wait_port(t: Topology, ns: str, host: str, port: int, timeout: float = 10.0) -> None:
    code = (f"import socket,time\nd=time.time()+{timeout}\n"
            f"while True:\n"
            f"    try:\n        socket.create_connection(('{host}',{port}),0.5).close(); break\n"
            f"    except OSError:\n        assert time.time()<d; time.sleep(0.05)\n")
    t.python(ns, code, timeout=timeout + 5)


NGINX_CONF = """
user root;
worker_processes 1;
daemon off;
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
    keepalive_requests 1000000;
    server {{
        listen {ip}:80 reuseport;
        root {dir}/www;
        location = /status500 {{ return 500 "boom"; }}
        location = /nocontent {{ return 204; }}
        location = /echo {{ client_max_body_size 100m; return 200 "posted"; }}
        location / {{ }}
    }}
    server {{
        listen {ip}:8080 http2;
        root {dir}/www;
        location / {{ }}
    }}
}}
"""


def start_nginx(t: Topology, tmp: Path, ip: str = SERVER_IP) -> Path:
    d = tmp / "nginx"
    (d / "www").mkdir(parents=True, exist_ok=True)
    (d / "www" / "index.html").write_text("hello from nginx\n")
    (d / "www" / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (d / "nginx.conf").write_text(NGINX_CONF.format(dir=d, ip=ip))
    t.exec(t.server, "nginx", "-c", str(d / "nginx.conf"), stdout=subprocess.DEVNULL,
           stderr=subprocess.DEVNULL)
    wait_port(t, t.server, ip, 80)
    return d


def requests_of(events: list[dict[str, object]]) -> list[dict[str, object]]:
    """Join request/response/end events into one record per request."""
    reqs: dict[str, dict[str, object]] = {}
    order = []
    for e in events:
        if e["ev"] == "request":
            reqs[e["req"]] = dict(e)  # type: ignore[index]
            order.append(e["req"])
        elif e["ev"] == "response":
            with suppress(KeyError):
                reqs[e["req"]]["status"] = e["status"]  # type: ignore[index]
        elif e["ev"] == "end":
            with suppress(KeyError):
                reqs[e["req"]].update({k: v for k, v in e.items() if k not in ("ev", "req")})  # type: ignore
                reqs[e["req"]]["ended"] = True  # type: ignore[index]
    return [reqs[r] for r in order]  # type: ignore[index]
