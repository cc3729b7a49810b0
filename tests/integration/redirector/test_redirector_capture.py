"""Capture on both CNI styles in the redirector's own mini cluster: every path captured once, the real
source kept end to end, and removal leaving the node's rules exactly as they were."""

from __future__ import annotations

import pytest
from nodemesh.redirector.apply import Netfilter, Redirector, detect_backend
from nodemesh.redirector.config import CaptureConfig
from nodemesh.redirector.plan import build_plan
from redirector_minicluster import (
    CLUSTER_IP,
    NODE_IP,
    POD_CIDR,
    MiniCluster,
    assert_same,
    read_records,
    run,
)
from redirector_minicluster import mini_cluster as make_mini_cluster

pytestmark = pytest.mark.root


def _install(cluster: MiniCluster, k: int, **kw: object) -> tuple[Redirector, object]:
    ns = cluster.nodes[k]
    redirector = Redirector(Netfilter(detect_backend(ns), netns=ns))
    plan = build_plan(CaptureConfig(node_ip=NODE_IP[k], pod_cidrs=(POD_CIDR[k],), **kw))  # type: ignore[arg-type]
    redirector.apply(plan)
    return redirector, plan


def test_redirector_every_path_captured_with_real_source(mini_cluster: MiniCluster) -> None:
    cl = mini_cluster
    a, b, c = cl.pods["a"], cl.pods["b"], cl.pods["c"]
    # Before capture: direct, and the destination sees the caller.
    assert cl.dial(a, b.ip, 8080).stdout.strip() == a.ip
    before = {k: cl.snapshot(k) for k in (1, 2)}

    installed = [_install(cl, k) for k in (1, 2)]
    try:
        _, rec1 = cl.standin(1)
        _, rec2 = cl.standin(2)
        cases = [(b.ip, 8080, f"{b.ip}:8080", False),       # same node
                 (c.ip, 8080, f"{c.ip}:8080", True),        # other node
                 (CLUSTER_IP, 80, f"{CLUSTER_IP}:80", True)]  # ClusterIP, endpoint on node 2
        for host, port, orig, crosses in cases:
            n1_before, n2_before = len(read_records(rec1)), len(read_records(rec2))
            res = cl.dial(a, host, port)
            assert res.returncode == 0, res.stderr
            # The destination pod sees the calling pod's IP (transparent upstream on both hops).
            assert res.stdout.strip() == a.ip, (host, res.stdout, res.stderr)
            new1 = read_records(rec1)[n1_before:]
            new2 = read_records(rec2)[n2_before:]
            # Captured exactly once on the caller's node: the onward connection is not captured again.
            assert [(r["port"], r["src_ip"], r["orig_dst"], r["upstream"]) for r in new1] == \
                [(4140, a.ip, orig, "ok")], new1
            if crosses:
                # The destination node captures it inbound, with the caller's IP as source.
                assert [(r["port"], r["src_ip"], r["orig_dst"]) for r in new2] == \
                    [(4143, a.ip, f"{c.ip}:8080")], new2
            else:
                assert new2 == []
    finally:
        for redirector, plan in installed:
            redirector.remove(plan)  # type: ignore[arg-type]
    # Removal leaves iptables (both backends), ip rules, routes and ebtables byte for byte as before.
    for k in (1, 2):
        assert_same(before[k], cl.snapshot(k))


def test_redirector_apply_is_idempotent_and_excludes(mini_cluster: MiniCluster) -> None:
    cl = mini_cluster
    a, b = cl.pods["a"], cl.pods["b"]
    before = cl.snapshot(1)
    redirector, plan = _install(cl, 1, excluded_ips=(a.ip,))
    try:
        after_first = cl.snapshot(1)
        assert redirector.apply(plan) is False          # type: ignore[arg-type]
        assert cl.snapshot(1) == after_first
        _, rec1 = cl.standin(1)
        # a's namespace is excluded: its connection goes direct, nothing reaches the listener.
        assert cl.dial(a, b.ip, 8080).stdout.strip() == a.ip
        assert read_records(rec1) == []
        # b -> a: b is captured outbound (a is excluded only as a source of outbound and dest of inbound).
        cl.whoami(a, 8081)
        assert cl.dial(b, a.ip, 8081).stdout.strip() == b.ip
        assert [r["src_ip"] for r in read_records(rec1)] == [b.ip]
    finally:
        redirector.remove(plan)  # type: ignore[arg-type]
    assert_same(before, cl.snapshot(1))


def test_redirector_legacy_backend_detected_and_used(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A node whose kube-proxy writes legacy iptables: the redirector detects it and works there."""
    with make_mini_cluster("bridge", tmp_path, backend="legacy") as cl:
        a, b = cl.pods["a"], cl.pods["b"]
        ns = cl.nodes[1]
        # kubelet loads mangle on real nodes (KUBE-KUBELET-CANARY); a legacy table once loaded cannot be
        # unloaded from a namespace, so the baseline is taken with it loaded, as on a real node. The
        # same for raw (the agents' conntrack zone), which nodemesh may be the first to load.
        run("iptables-legacy", "-t", "mangle", "-S", ns=ns)
        run("iptables-legacy", "-t", "raw", "-S", ns=ns)
        before = cl.snapshot(1)
        assert detect_backend(ns) == "legacy"
        redirector, plan = _install(cl, 1)
        try:
            assert any("NODEMESH_OUTBOUND" in line for line in
                       run("iptables-legacy-save", "-t", "nat", ns=ns).stdout.splitlines())
            assert "NODEMESH" not in run("iptables-nft-save", ns=ns).stdout
            assert redirector.apply(plan) is False  # type: ignore[arg-type]
            _, rec1 = cl.standin(1)
            for host, port in ((b.ip, 8080), (CLUSTER_IP, 80)):
                assert cl.dial(a, host, port).stdout.strip() == a.ip
            assert [r["orig_dst"] for r in read_records(rec1)] == [f"{b.ip}:8080", f"{CLUSTER_IP}:80"]
        finally:
            redirector.remove(plan)  # type: ignore[arg-type]
        assert_same(before, cl.snapshot(1))
