"""`nodemesh edges` on a mesh without mTLS (the shared trust cluster, installed without --mtls):
every edge is unsecured, names no identity, and says why — plaintext across nodes, or never off
its node when both pods share one. (With --mtls: test_trust_mtls.py.)"""

from __future__ import annotations

import json
import time

from trust_harness import NS, PEERS, PY, Trust


def test_trust_edges_without_mtls_are_not_secured(trust: Trust) -> None:
    client = trust.start_in_pod("client", [PY, PEERS, "client", f"http://{trust.service_ip('web')}:8080/x",
                                           f"{trust.service_ip('grpcweb')}:9090", "edges", "20"])
    try:
        deadline = time.monotonic() + 40
        while True:
            res = trust.cli("edges", "deploy", "-n", NS, "-o", "json")
            assert res.returncode == 0, res.stderr
            found = {(e["src"], e["dst"]): e for e in json.loads(res.stdout)}
            if ("client", "web") in found or time.monotonic() > deadline:
                break
            time.sleep(1.0)
    finally:
        client.kill()
        client.communicate()
    edge = found.get(("client", "web"))
    assert edge is not None, found
    same_node = trust.pod("client")["spec"]["nodeName"] == trust.pod("web")["spec"]["nodeName"]
    assert (edge["secured"], edge["client_id"], edge["server_id"]) == (False, "", ""), edge
    assert edge["no_tls_reason"].startswith("same node" if same_node else "not mTLS"), (same_node, edge)
    table = trust.cli("edges", "deploy", "-n", NS)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["SRC", "DST", "SRC_NS", "DST_NS", "SECURED"]
    assert all(line.split()[4] == "no" for line in table.stdout.splitlines()[1:]), table.stdout
