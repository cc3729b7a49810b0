"""`nodemesh edges` against a real grpc server: table, wide and json pinned by goldens."""

from __future__ import annotations

import json

from cli_testkit import Served, assert_golden
from nodemesh.api.gen import nodemesh_pb2 as pb


def _edge(src: str, dst: str, ns: str = "emojivoto", dst_ns: str | None = None, kind: str = "deployment") -> pb.Edge:
    return pb.Edge(src=pb.Resource(namespace=ns, type=kind, name=src),
                   dst=pb.Resource(namespace=dst_ns or ns, type=kind, name=dst), no_identity_msg="no_identity")


SECURED = pb.Edge(src=pb.Resource(namespace="emojivoto", type="deployment", name="web"),
                 dst=pb.Resource(namespace="emojivoto", type="deployment", name="emoji"), secured=True,
                 client_id="spiffe://cluster.local/ns/emojivoto/sa/web",
                 server_id="spiffe://cluster.local/ns/emojivoto/sa/emoji")
EDGES = [_edge("web", "voting"), _edge("vote-bot", "web"), SECURED,
         pb.Edge(src=pb.Resource(type="unknown", name="10.0.2.15"),
                 dst=pb.Resource(namespace="emojivoto", type="deployment", name="web"))]


def test_cli_edges_table(controller: Served) -> None:
    controller.fake.edges = pb.EdgesResponse(edges=EDGES)
    result = controller.run("edges", "deploy", "-n", "emojivoto")
    assert result.exit_code == 0, result.output
    assert_golden("edges", result.stdout)
    req = controller.fake.requests[0]
    assert (req.selector.type, req.selector.namespace, req.window_seconds) == ("deployment", "emojivoto", 60)


def test_cli_edges_wide(controller: Served) -> None:
    controller.fake.edges = pb.EdgesResponse(edges=EDGES)
    result = controller.run("edges", "deploy", "-n", "emojivoto", "-o", "wide")
    assert result.exit_code == 0, result.output
    assert_golden("edges_wide", result.stdout)


def test_cli_edges_json(controller: Served) -> None:
    controller.fake.edges = pb.EdgesResponse(edges=EDGES)
    result = controller.run("edges", "deploy", "-A", "-o", "json")
    assert result.exit_code == 0, result.output
    assert_golden("edges_json", result.stdout)
    data = json.loads(result.stdout)
    assert {"src": "vote-bot", "src_namespace": "emojivoto", "dst": "web", "dst_namespace": "emojivoto",
            "secured": False, "client_id": "", "server_id": "", "no_tls_reason": "no_identity"} in data
    assert {"src": "web", "src_namespace": "emojivoto", "dst": "emoji", "dst_namespace": "emojivoto",
            "secured": True, "client_id": "spiffe://cluster.local/ns/emojivoto/sa/web",
            "server_id": "spiffe://cluster.local/ns/emojivoto/sa/emoji", "no_tls_reason": ""} in data
    assert controller.fake.requests[0].all_namespaces


def test_cli_edges_none(controller: Served) -> None:
    result = controller.run("edges", "po")
    assert result.exit_code == 0
    assert result.stdout == "" and result.stderr == "No edges found.\n"
