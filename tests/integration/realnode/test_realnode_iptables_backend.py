"""The node's iptables backend, chosen per node (issue 11's sandbox): node1 keeps its rules in nft,
node2 in legacy. The mesh captures on both, each in the backend the node's rules live in, and pods
of both nodes are proxied."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from realnode_harness import RealNode, realnode_mesh, series, wait_for

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def mesh() -> Iterator[RealNode]:
    with realnode_mesh(nodes=2, iptables={"node2": "legacy"}) as m:
        yield m


def _save(mesh: RealNode, node: str, backend: str) -> str:
    return mesh.sb.node_exec(node, [f"iptables-{backend}-save"], capture_output=True, text=True, timeout=10).stdout


def test_realnode_capture_lives_in_each_nodes_own_backend(mesh: RealNode) -> None:
    assert mesh.healthy()
    for node, backend, other in (("node1", "nft", "legacy"), ("node2", "legacy", "nft")):
        assert mesh.sb.node(node).iptables == backend
        assert "NODEMESH_PREROUTING" in _save(mesh, node, backend), node
        assert "NODEMESH" not in _save(mesh, node, other), node
        assert f"backend={backend}" in mesh.redirector_log(node)
        client = mesh.client(node)
        before = series(mesh.agent_metrics(node), "tcp_open_total", direction="outbound")
        results = [mesh.fetch(client, "http://server.rn/") for _ in range(3)]
        assert all(ok for ok, _ in results), results
        assert wait_for(lambda n=node, b=before: series(mesh.agent_metrics(n), "tcp_open_total",
                                                         direction="outbound") - b >= 3, 5.0) is not None, node
