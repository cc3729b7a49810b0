"""Identity looked up when used, on the real agent (issue 10, items 1-2), without a sandbox.

The agent namespace plays a node: kube-proxy's DNAT for a ClusterIP in nat OUTPUT, the agent fed
from a recorded objects file (rewritten as the test goes). Three things the issue saw go wrong:

* a keep-alive connection opened while the client pod was unknown: its later requests name it;
* a connection from an unknown address of the node's pod CIDR waits (bounded) for the identity,
  so even its first request is attributed, and the wait is counted;
* a ClusterIP the agent does not know: it dials it, kube-proxy picks, and the agent asks conntrack
  who answered: the destination is the pod, not `unknown/<ClusterIP>`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_traffic_net import (
    CLIENT_IP,
    SERVER_IP,
    Agent,
    Topology,
    start_agent,
    start_nginx,
    topology,
    wait_for,
)
from clusterobjects import namespace, pod
from nodemesh.api.clusterstate import ClusterObjects, write_objects
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.root

CLUSTER_IP = "10.96.77.10"


@pytest.fixture
def net(tmp_path: Path) -> Iterator[tuple[Topology, Agent, Path]]:
    state = tmp_path / "state"
    state.mkdir()
    objs = ClusterObjects(1, [namespace("shop"), pod("server-1", "shop", SERVER_IP, "n2", owner=("StatefulSet", "server"))])
    write_objects(state, objs)
    with topology() as t:
        start_nginx(t, tmp_path)
        prefix = t.prefix
        t.run(t.agent, "ip", "route", "add", "10.96.77.0/24", "dev", f"{prefix}a1")
        t.run(t.agent, "iptables", "-t", "nat", "-A", "OUTPUT", "-d", CLUSTER_IP, "-p", "tcp", "--dport", "80",
              "-j", "DNAT", "--to-destination", f"{SERVER_IP}:80")
        # The redirector's return path for transparent dials of a ClusterIP: replies come from the
        # endpoint, not the address the socket is connected to; conntrack remembers the connection.
        t.run(t.agent, "iptables", "-t", "mangle", "-A", "OUTPUT", "-p", "tcp", "-m", "addrtype", "!",
              "--src-type", "LOCAL", "-j", "CONNMARK", "--set-xmark", "0x1")
        t.run(t.agent, "iptables", "-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-m", "connmark",
              "--mark", "0x1", "-j", "MARK", "--set-xmark", "0x1")
        agent = start_agent(t, tmp_path, extra=("--identity-file", str(state), "--identity-wait", "1.5"))
        yield t, agent, state


def metrics(t: Topology) -> list[dict[str, str]]:
    res = t.run(t.agent, "python3", "-c", "import urllib.request;print(urllib.request.urlopen("
                "'http://127.0.0.1:4191/metrics').read().decode())", check=False)
    out = []
    for fam in text_string_to_metric_families(res.stdout):
        for s in fam.samples:
            out.append({**s.labels, "__name__": s.name, "__value__": str(s.value)})
    return out


def requests_by_peer(t: Topology) -> dict[tuple[str, str, str], float]:
    out: dict[tuple[str, str, str], float] = {}
    for s in metrics(t):
        if s["__name__"] == "request_total" and s["direction"] == "outbound":
            k = (s["src_name"], s["dst_name"], s["dst_service"])
            out[k] = out.get(k, 0) + float(s["__value__"])
    return out


def identity_has(t: Topology, ip: str) -> bool:
    res = t.run(t.agent, "python3", "-c", "import urllib.request;print(urllib.request.urlopen("
                "'http://127.0.0.1:4191/identity').read().decode())", check=False)
    return res.returncode == 0 and ip in json.loads(res.stdout)["pods"]


def record(state: Path, *items: dict) -> None:  # type: ignore[type-arg]
    data = json.loads((state / "objects.json").read_text())
    write_objects(state, ClusterObjects(int(data["resourceVersion"]) + 1, [*data["items"], *items]))
    os.utime(state / "objects.json", ns=(time.time_ns(), time.time_ns()))


KEEPALIVE_CLIENT = """
import socket, sys, time
s = socket.create_connection(('{ip}', 80), timeout=10)
f = s.makefile('rb')
def get():
    s.sendall(b'GET /index.html HTTP/1.1\\r\\nHost: server\\r\\n\\r\\n')
    status = f.readline(); n = 0
    while (line := f.readline()) not in (b'\\r\\n', b''):
        if line.lower().startswith(b'content-length:'): n = int(line.split(b':')[1])
    f.read(n); return status
print(get(), flush=True)
sys.stdin.readline()          # the test updates the identity meanwhile
print(get(), flush=True)
"""


def test_keepalive_connection_picks_up_identity_learned_later(net: tuple[Topology, Agent, Path]) -> None:
    t, _agent, state = net
    # The client pod is unknown when it connects: its address is in the node's pod CIDR, so the
    # agent waits up to --identity-wait; nothing arrives, the first request counts as unknown.
    proc = t.exec(t.client, sys.executable, "-c", KEEPALIVE_CLIENT.format(ip=SERVER_IP),
                  stdin=-1, stdout=-1, stderr=-1)
    assert proc.stdout is not None and proc.stdin is not None
    assert b"200" in proc.stdout.readline()
    record(state, pod("client-1", "shop", CLIENT_IP, "n1", owner=("StatefulSet", "client")))
    assert wait_for(lambda: identity_has(t, CLIENT_IP), timeout=10)
    proc.stdin.write(b"\n")
    proc.stdin.flush()
    assert b"200" in proc.stdout.readline()
    proc.wait(10)
    assert wait_for(lambda: sum(requests_by_peer(t).values()) >= 2, timeout=10)
    assert requests_by_peer(t) == {(CLIENT_IP, "server", ""): 1, ("client", "server", ""): 1}
    waits = [s for s in metrics(t) if s["__name__"] == "nodemesh_identity_wait_ms_count"]
    assert [(s["outcome"], float(s["__value__"])) for s in waits] == [("timeout", 1.0)]


def test_first_request_of_a_new_pod_waits_for_its_identity(net: tuple[Topology, Agent, Path]) -> None:
    t, _agent, state = net
    proc = t.exec(t.client, sys.executable, "-c", KEEPALIVE_CLIENT.format(ip=SERVER_IP),
                  stdin=-1, stdout=-1, stderr=-1)
    time.sleep(0.3)  # the connection is held: its identity is on the way (the file is polled)
    record(state, pod("client-1", "shop", CLIENT_IP, "n1", owner=("StatefulSet", "client")))
    assert proc.stdout is not None and proc.stdin is not None
    assert b"200" in proc.stdout.readline()
    proc.stdin.write(b"\n")
    proc.stdin.flush()
    proc.wait(10)
    assert wait_for(lambda: sum(requests_by_peer(t).values()) >= 2, timeout=10)
    assert requests_by_peer(t) == {("client", "server", ""): 2}
    waits = {s["outcome"]: float(s["__value__"]) for s in metrics(t)
             if s["__name__"] == "nodemesh_identity_wait_ms_count"}
    assert waits == {"known": 1.0}


def test_unknown_cluster_ip_is_attributed_to_the_pod_kube_proxy_chose(net: tuple[Topology, Agent, Path]) -> None:
    t, _agent, state = net
    record(state, pod("client-1", "shop", CLIENT_IP, "n1", owner=("StatefulSet", "client")))
    assert wait_for(lambda: identity_has(t, CLIENT_IP), timeout=10)
    out = t.python(t.client, f"""
import urllib.request
for _ in range(3):
    print(urllib.request.urlopen('http://{CLUSTER_IP}/index.html', timeout=5).status)
""")
    assert out.split() == ["200"] * 3
    assert wait_for(lambda: sum(requests_by_peer(t).values()) >= 3, timeout=10)
    assert requests_by_peer(t) == {("client", "server", ""): 3}, "not unknown/<ClusterIP>"
    lookups = {s["outcome"]: float(s["__value__"]) for s in metrics(t)
               if s["__name__"] == "nodemesh_endpoint_lookups_total"}
    assert lookups == {"found": 3.0}
