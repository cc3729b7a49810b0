"""Must-show 1: a 2-node sandbox, a 2-replica Deployment spread over both nodes and a client pod;
the client reaches the Service by DNS name and by ClusterIP, with no mesh installed. Both CNIs."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from nodemesh.sandbox.cluster import Sandbox
from nodemesh.sandbox.testing import FETCH, WHOAMI_APP, running_sandbox

pytestmark = pytest.mark.root


@pytest.fixture(scope="module", params=["bridge", "routed"])
def cluster(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    with running_sandbox(nodes=2, cni=request.param, manifests=[WHOAMI_APP]) as sb:
        yield sb


def _client(sb: Sandbox) -> str:
    return next(p["metadata"]["name"] for p in sb.pods("shop") if p["metadata"]["name"].startswith("client-"))


def _fetch(sb: Sandbox, urls: list[str]) -> list[str]:
    res = sb.exec("shop", _client(sb), [sys.executable, "-c", FETCH, *urls], capture_output=True, text=True,
                  timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def test_replicas_spread_over_both_nodes(cluster: Sandbox) -> None:
    web = [p for p in cluster.pods("shop") if p["metadata"]["labels"].get("app") == "web"]
    assert len(web) == 2
    assert {p["spec"]["nodeName"] for p in web} == {"node1", "node2"}
    for p in web:
        node = cluster.node(p["spec"]["nodeName"])
        assert ipaddress.ip_address(p["status"]["podIP"]) in ipaddress.ip_network(node.pod_cidr)


@pytest.mark.parametrize("host", ["web", "web.shop", "web.shop.svc", "web.shop.svc.cluster.local"])
def test_client_reaches_service_by_dns_name(cluster: Sandbox, host: str) -> None:
    names = {p["metadata"]["name"] for p in cluster.pods("shop") if p["metadata"]["labels"].get("app") == "web"}
    answers = _fetch(cluster, [f"http://{host}/"] * 3)
    assert set(answers) <= names and answers


def test_client_reaches_service_by_cluster_ip_on_both_replicas(cluster: Sandbox) -> None:
    svc = next(o for o in cluster.objects().of_kind("Service") if o["metadata"]["name"] == "web")
    ip = svc["spec"]["clusterIP"]
    assert ipaddress.ip_address(ip) in cluster.plan.service_cidr
    names = {p["metadata"]["name"] for p in cluster.pods("shop") if p["metadata"]["labels"].get("app") == "web"}
    answers = _fetch(cluster, [f"http://{ip}/"] * 24)
    # statistic --mode random over 2 ready endpoints: both answer (P(miss one) = 2 * 2^-24)
    assert set(answers) == names


def test_cluster_ip_from_the_node_netns(cluster: Sandbox) -> None:
    """The mesh agent dials ClusterIPs from the node: nat OUTPUT must DNAT too."""
    svc = next(o for o in cluster.objects().of_kind("Service") if o["metadata"]["name"] == "web")
    res = cluster.node_exec("node2", [sys.executable, "-c", FETCH, f"http://{svc['spec']['clusterIP']}/"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().startswith("web-")


def test_pod_to_pod_across_nodes(cluster: Sandbox) -> None:
    far = next(p for p in cluster.pods("shop") if p["metadata"]["labels"].get("app") == "web"
               and p["spec"]["nodeName"] != cluster.pod("shop", _client(cluster))["spec"]["nodeName"])
    assert _fetch(cluster, [f"http://{far['status']['podIP']}:8080/"]) == [far["metadata"]["name"]]


def test_pod_reaches_itself_through_its_own_service(cluster: Sandbox) -> None:
    """Hairpin: kube-proxy DNATs a web pod's call to its own Service back to that pod, so on a bridge
    the frame leaves by the port it came in on (the bridge port needs hairpin mode). Each call is
    sent until it hits the caller itself (P(never in 24) = 2^-24); it used to time out."""
    me = next(p for p in cluster.pods("shop") if p["metadata"]["labels"].get("app") == "web")
    res = cluster.exec("shop", me["metadata"]["name"], [sys.executable, "-c", FETCH, *["http://web/"] * 24],
                       capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-300:]
    assert me["metadata"]["name"] in res.stdout.split()


CONNECT = (
    "import socket, sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\n"
    "except OSError as e:\n"
    "    print(type(e).__name__, e.errno); sys.exit(3)\n"
    "sys.exit(0)\n"
)


@pytest.mark.parametrize("where", ["pod", "node"])
def test_connection_to_a_non_sandbox_address_fails(cluster: Sandbox, where: str) -> None:
    # Nothing may listen there, so this can only succeed if traffic leaves the sandbox. The
    # address is the documentation range TEST-NET-3; refused or unreachable, never "timed out"
    # while a packet travels out of the machine: there is no route out of any sandbox netns.
    argv = [sys.executable, "-c", CONNECT, "203.0.113.7", "80"]
    if where == "pod":
        res = cluster.exec("shop", _client(cluster), argv, capture_output=True, text=True, timeout=20)
    else:
        res = cluster.node_exec("node1", argv, capture_output=True, text=True, timeout=20)
    assert res.returncode == 3, res.stdout + res.stderr
    routes = cluster.node_exec("node1", ["ip", "-4", "route", "show", "default"], capture_output=True, text=True)
    assert routes.stdout.strip() == ""


def test_unknown_cluster_ip_is_refused_fast(cluster: Sandbox) -> None:
    unused = str(cluster.plan.service_cidr.network_address + 200)
    res = cluster.exec("shop", _client(cluster), [sys.executable, "-c", CONNECT, unused, "80"],
                       capture_output=True, text=True, timeout=20)
    assert res.returncode == 3


def test_host_reaches_node_address_through_the_one_host_link(cluster: Sandbox) -> None:
    node = cluster.nodes()[0]
    srv = cluster.node_exec(node.name, ["true"], check=True)
    assert srv.returncode == 0
    # a listener in node1's netns, dialled from the root namespace
    listener = ("import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
                "s.bind(('0.0.0.0',18085));s.listen();print('up',flush=True);c,_=s.accept();"
                "c.sendall(b'hi');c.close()")
    proc = subprocess.Popen(["ip", "netns", "exec", node.netns, sys.executable, "-c", listener],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        with socket.create_connection((cluster.controller_address, 18085), timeout=3) as s:
            assert s.recv(2) == b"hi"
    finally:
        proc.kill()
        proc.wait()
    routes = subprocess.run(["ip", "-4", "route", "show", "dev", cluster.host_link], capture_output=True,
                            text=True, check=True).stdout.strip().splitlines()
    assert len(routes) == 1 and routes[0].startswith(str(cluster.plan.underlay))
