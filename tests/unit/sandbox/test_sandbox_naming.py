"""Names and the address plan: unique per cluster, within kernel limits."""

from __future__ import annotations

import ipaddress
import itertools
from pathlib import Path

import pytest
from nodemesh.sandbox import naming
from nodemesh.sandbox.addressing import MAX_INDEX, AddressPlan, allocate
from nodemesh.sandbox.state import allocate_index, lookup_index, release_index


@pytest.mark.parametrize("bad", ["", "a-b", "UPPER", "x" * 13, "a.b", "a_b"])
def test_cluster_names_refused(bad: str) -> None:
    with pytest.raises(naming.NameError_):
        naming.check_cluster_name(bad)


def test_netns_names() -> None:
    assert naming.node_netns("nodemesh", 1) == "nm-nodemesh-node1"
    assert naming.underlay_netns("t1") == "nm-t1-underlay"
    assert naming.pod_netns("t1", "shop", "web-abc-xyz12") == "nm-t1-pod-shop.web-abc-xyz12"
    # no cluster's prefix is a prefix of another's names (cluster names have no dash)
    assert not naming.node_netns("ab", 1).startswith(naming.netns_prefix("a"))


def test_interface_names_fit_ifnamsiz() -> None:
    assert naming.host_link(MAX_INDEX) == "nmsb63"
    for cni, prefix in (("bridge", "veth"), ("routed", "cali")):
        name = naming.pod_host_veth(cni, "a-very-long-namespace-name", "a-very-long-pod-name-7d9f8c-abcde")
        assert len(name) == naming.IFNAMSIZ and name.startswith(prefix)
    assert naming.pod_host_veth("routed", "a", "b") != naming.pod_host_veth("routed", "a", "c")


def test_template_hash_is_stable_and_kube_alphabet() -> None:
    t = {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c"}]}}
    h = naming.template_hash(t)
    assert h == naming.template_hash({"spec": {"containers": [{"name": "c"}]}, "metadata": {"labels": {"app": "web"}}})
    assert len(h) == 10 and set(h) <= set("bcdfghjklmnpqrstvwxz2456789")
    assert naming.template_hash({**t, "spec": {"containers": [{"name": "d"}]}}) != h
    assert len(naming.random_suffix()) == 5


def test_kube_chain_names() -> None:
    chain = naming.kube_chain("KUBE-SVC-", "shop/web", "tcp")
    assert chain.startswith("KUBE-SVC-") and len(chain) == 9 + 16 and chain.upper() == chain


def test_default_cluster_uses_classic_ranges() -> None:
    p = AddressPlan(0)
    assert str(p.pod_cidr(1)) == "10.244.1.0/24" and str(p.pod_cidr(2)) == "10.244.2.0/24"
    assert str(p.service_cidr) == "10.96.0.0/16" and str(p.underlay) == "10.240.0.0/24"
    assert p.node_ip(1) == "10.240.0.1" and p.pod_gateway(1) == "10.244.1.1"
    assert p.host_ip == "10.240.0.253" and p.underlay_gateway == "10.240.0.254"
    assert p.pod_ip_candidates(1)[0] == "10.244.1.2" and p.service_ip_candidates()[0] == "10.96.0.10"


def test_every_index_gets_disjoint_ranges() -> None:
    nets: list[tuple[int, ipaddress.IPv4Network]] = []
    for i in range(MAX_INDEX + 1):
        p = AddressPlan(i)
        nets += [(i, p.underlay), (i, p.pod_supernet), (i, p.service_cidr)]
    for (i, a), (j, b) in itertools.combinations(nets, 2):
        assert not a.overlaps(b), (i, a, j, b)
    with pytest.raises(ValueError):
        AddressPlan(MAX_INDEX + 1)


def test_allocate_lowest_free() -> None:
    assert allocate(["a", "b", "c"], {"a"}) == "b"
    with pytest.raises(RuntimeError):
        allocate(["a"], {"a"})


def test_registry_allocates_distinct_indexes(tmp_path: Path) -> None:
    assert allocate_index(tmp_path, "nodemesh") == 0
    a = allocate_index(tmp_path, "a1")
    b = allocate_index(tmp_path, "b1")
    assert {a, b} == {1, 2}
    assert allocate_index(tmp_path, "a1") == a  # stable
    release_index(tmp_path, "a1")
    assert lookup_index(tmp_path, "a1") is None
    assert allocate_index(tmp_path, "c1") == a  # reused
