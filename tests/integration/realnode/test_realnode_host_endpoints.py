"""Issue 11, item 3: Services whose endpoint is on the node's own network work from captured pods.

The API server (`kubernetes.default`, which every operator calls) and any hostNetwork pod listen
on a node address. Through the mesh, `curl` timed out (agent: `error="connect: timeout"`): the
agent's transparent upstream socket is bound to the pod's IP, and when the endpoint is on the
same node its SYN-ACK is sent locally — the return-path rules only saw packets arriving from
outside, so the reply went to the pod (which answered with a reset) instead of the agent.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from realnode_harness import RealNode, realnode_mesh, series, wait_for

pytestmark = pytest.mark.root


@pytest.fixture(scope="module", params=["bridge", "routed"])
def mesh(request: pytest.FixtureRequest) -> Iterator[RealNode]:
    with realnode_mesh(nodes=2, cni=request.param) as m:
        yield m


@pytest.mark.parametrize("client_node,url,what", [
    ("node1", "http://kubernetes.default.svc.cluster.local:443/version", "the API server on the caller's node"),
    ("node2", "http://kubernetes.default.svc.cluster.local:443/version", "the API server on another node"),
    ("node1", "http://hostecho.rn/", "a hostNetwork pod on the caller's node"),
    ("node2", "http://hostecho.rn/", "a hostNetwork pod on another node"),
])
def test_realnode_host_network_endpoint_reachable_through_the_mesh(mesh: RealNode, client_node: str, url: str,
                                                                   what: str) -> None:
    assert mesh.capture_hooked(client_node)
    client = mesh.client(client_node)
    before = series(mesh.agent_metrics(client_node), "tcp_open_total", direction="outbound")
    results = [mesh.fetch(client, url, timeout=3.0) for _ in range(3)]

    def opened() -> float:
        return series(mesh.agent_metrics(client_node), "tcp_open_total", direction="outbound") - before

    wait_for(lambda: opened() >= 3, timeout=5.0)  # workers hand their counts to /metrics every second
    print(f"{what}: {results}; agent outbound connections +{opened():.0f}")
    assert all(ok for ok, _ in results), f"{what} unreachable through the mesh: {results}"
    assert opened() >= 3, "the requests did not go through the agent (capture off?)"
