"""Network namespaces, links, addresses, routes and sysctls of a sandbox, built with pyroute2.

Layout of one cluster (index i, see addressing.py):

    root ns:      nmsb<i> 10.240.i.253/24 ──┐   (the only thing in the root namespace)
    nm-C-underlay: bridge br0 10.240.i.254/24, forwarding off; ports host, node1, node2, ...
    nm-C-node<k>:  eth0 10.240.i.k/24; routes to other nodes' pod CIDRs; ip_forward=1; no default
                   bridge style: cni0 = pod CIDR .1/24, pods' veth* enslaved
                   routed style: cali* per pod, no IPv4, /32 route + proxy ARP
    nm-C-pod-NS.POD: eth0 = pod IP; default route to the node (and nothing else)
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from nodemesh.sandbox import naming
from nodemesh.sandbox.addressing import ROUTED_GATEWAY, AddressPlan
from pyroute2 import IPRoute, NetNS, netns

UNDERLAY_BRIDGE = "br0"
POD_BRIDGE = "cni0"


@dataclass(frozen=True)
class NodeInfo:
    """What other rooms need to know about a sandbox node."""

    name: str  # Kubernetes node name: node1, node2, ...
    index: int  # k
    netns: str
    ip: str  # underlay (InternalIP)
    pod_cidr: str
    cni: str  # "bridge" or "routed"
    bridge: str | None  # the pods' bridge in the node netns (bridge style only)
    iptables: str = "nft"  # the node's iptables backend: where kube-proxy's rules live (nft or legacy)

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict[str, object]) -> NodeInfo:
        return cls(**d)  # type: ignore[arg-type]


@contextlib.contextmanager
def _ns(name: str) -> Iterator[NetNS]:
    ipr = NetNS(name)
    try:
        yield ipr
    finally:
        ipr.close()


def _idx(ipr: IPRoute | NetNS, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise RuntimeError(f"link {ifname} not found")
    return int(found[0])


def write_sysctls(ns: str, values: dict[str, str]) -> None:
    """Write /proc/sys entries inside netns `ns` (net sysctls follow the writing thread's netns)."""
    netns.pushns(ns)
    try:
        for key, value in values.items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)
    finally:
        netns.popns()


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/var/run/netns/{name}")


def create_netns(name: str) -> None:
    if netns_exists(name):
        remove_netns(name)  # a leftover from a crash: start clean
    netns.create(name)
    with _ns(name) as ipr:
        ipr.link("set", index=_idx(ipr, "lo"), state="up")


def remove_netns(name: str) -> None:
    with contextlib.suppress(FileNotFoundError, OSError):
        netns.remove(name)


def create_underlay(cluster: str, plan: AddressPlan) -> None:
    ul = naming.underlay_netns(cluster)
    create_netns(ul)
    host = naming.host_link(plan.index)
    with _ns(ul) as ipr:
        ipr.link("add", ifname=UNDERLAY_BRIDGE, kind="bridge")
        br = _idx(ipr, UNDERLAY_BRIDGE)
        ipr.addr("add", index=br, address=plan.underlay_gateway, prefixlen=24)
        ipr.link("set", index=br, state="up")
    with IPRoute() as root:
        for stale in root.link_lookup(ifname=host):
            root.link("del", index=stale)
        root.link("add", ifname=host, kind="veth", peer={"ifname": "host", "net_ns_fd": ul})
        idx = _idx(root, host)
        root.addr("add", index=idx, address=plan.host_ip, prefixlen=24)
        root.link("set", index=idx, state="up")
    with _ns(ul) as ipr:
        port = _idx(ipr, "host")
        ipr.link("set", index=port, master=_idx(ipr, UNDERLAY_BRIDGE), state="up")
    # The underlay is a switch, not a router: nothing arriving here is ever forwarded onwards.
    write_sysctls(ul, {"net.ipv4.ip_forward": "0"})


def create_node(cluster: str, plan: AddressPlan, k: int, cni: str, all_nodes: list[int],
                iptables: str = "nft") -> NodeInfo:
    ns = naming.node_netns(cluster, k)
    ul = naming.underlay_netns(cluster)
    create_netns(ns)
    port = f"node{k}"
    with _ns(ul) as uipr:
        uipr.link("add", ifname=port, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
        uipr.link("set", index=_idx(uipr, port), master=_idx(uipr, UNDERLAY_BRIDGE), state="up")
    sysctls = {
        "net.ipv4.ip_forward": "1",
        "net.ipv4.conf.all.rp_filter": "0",
        "net.ipv4.conf.default.rp_filter": "0",
        # What kube-proxy sets on every node at start (its `conntrack` config defaults:
        # tcpEstablishedTimeout 24h, tcpCloseWaitTimeout 1h). The kernel's own close_wait timeout
        # is 60 s: a connection one side half-closed longer than that leaves conntrack while both
        # sockets live on, and a new connection NATed onto the same tuple then meets the old
        # socket (SYN challenge ACKs, connect delays) — a node without kube-proxy's values is not
        # what the mesh meets in a cluster.
        "net.netfilter.nf_conntrack_tcp_timeout_established": "86400",
        "net.netfilter.nf_conntrack_tcp_timeout_close_wait": "3600",
    }
    cidr = plan.pod_cidr(k)
    bridge = None
    with _ns(ns) as ipr:
        eth0 = _idx(ipr, "eth0")
        ipr.addr("add", index=eth0, address=plan.node_ip(k), prefixlen=24)
        ipr.link("set", index=eth0, state="up")
        for other in all_nodes:
            if other != k:
                ipr.route("add", dst=str(plan.pod_cidr(other)), gateway=plan.node_ip(other))
        # ClusterIPs dialled from the node itself need a route to pass the output lookup; nat
        # OUTPUT then DNATs them. Unknown ones reach the underlay, which refuses to forward.
        ipr.route("add", dst=str(plan.service_cidr), gateway=plan.underlay_gateway)
        if cni == "bridge":
            bridge = POD_BRIDGE
            ipr.link("add", ifname=POD_BRIDGE, kind="bridge")
            bi = _idx(ipr, POD_BRIDGE)
            ipr.addr("add", index=bi, address=plan.pod_gateway(k), prefixlen=24)
            ipr.link("set", index=bi, state="up")
            sysctls["net.bridge.bridge-nf-call-iptables"] = "1"
        else:
            # Routed style: pods' gateway 169.254.1.1 is answered by proxy ARP on each cali*
            # link. Proxy ARP needs a route to the target that leaves by another link; with no
            # default route in the node, a host-scope address on lo provides it.
            ipr.addr("add", index=_idx(ipr, "lo"), address=ROUTED_GATEWAY, prefixlen=32, scope=254)
            # The node owns the whole pod CIDR; unknown pod IPs are refused here, not sent on.
            ipr.route("add", dst=str(cidr), type="unreachable")
    write_sysctls(ns, sysctls)
    return NodeInfo(naming.node_name(k), k, ns, plan.node_ip(k), str(cidr), cni, bridge, iptables)


def attach_pod(cluster: str, plan: AddressPlan, node: NodeInfo, namespace: str, pod: str, ip: str) -> str:
    """Create the pod's netns and wire it to its node like the node's CNI would. Returns the netns."""
    pns = naming.pod_netns(cluster, namespace, pod)
    create_netns(pns)
    host_veth = naming.pod_host_veth(node.cni, namespace, pod)
    with _ns(node.netns) as nipr:
        for stale in nipr.link_lookup(ifname=host_veth):
            nipr.link("del", index=stale)
        nipr.link("add", ifname=host_veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": pns})
        hv = _idx(nipr, host_veth)
        if node.cni == "bridge":
            nipr.link("set", index=hv, master=_idx(nipr, POD_BRIDGE), state="up")
            # hairpin: a pod reaching itself through its own Service comes back on the same port.
            # IFLA_BRPORT_MODE is pyroute2's `mode`; an unknown keyword (`hairpin`) is silently ignored.
            nipr.brport("set", index=hv, mode=1)
        else:
            nipr.link("set", index=hv, state="up")
            nipr.route("add", dst=f"{ip}/32", oif=hv, scope=253)
    if node.cni == "routed":
        write_sysctls(node.netns, {f"net.ipv4.conf.{host_veth}.proxy_arp": "1"})
    with _ns(pns) as pipr:
        eth0 = _idx(pipr, "eth0")
        pipr.link("set", index=eth0, state="up")
        if node.cni == "bridge":
            pipr.addr("add", index=eth0, address=ip, prefixlen=24)
            pipr.route("add", dst="default", gateway=plan.pod_gateway(node.index))
        else:
            pipr.addr("add", index=eth0, address=ip, prefixlen=32)
            pipr.route("add", dst=f"{ROUTED_GATEWAY}/32", oif=eth0, scope=253)
            pipr.route("add", dst="default", gateway=ROUTED_GATEWAY, oif=eth0)
    if node.cni == "bridge":
        # A reused IP: the node may still map it to the previous pod's MAC and send the new pod's
        # packets there until that entry fails (seconds to tens of seconds). Forget it, now that
        # the new pod answers ARP for the address.
        with _ns(node.netns) as nipr, contextlib.suppress(Exception):
            nipr.neigh("del", dst=ip, ifindex=_idx(nipr, POD_BRIDGE))
    return pns


def detach_pod(cluster: str, node: NodeInfo, namespace: str, pod: str) -> None:
    host_veth = naming.pod_host_veth(node.cni, namespace, pod)
    if netns_exists(node.netns):
        with _ns(node.netns) as nipr:
            for idx in nipr.link_lookup(ifname=host_veth):
                with contextlib.suppress(Exception):
                    nipr.link("del", index=idx)
    remove_netns(naming.pod_netns(cluster, namespace, pod))


def remove_host_link(index: int) -> None:
    with IPRoute() as root:
        for idx in root.link_lookup(ifname=naming.host_link(index)):
            with contextlib.suppress(Exception):
                root.link("del", index=idx)


def list_cluster_netns(cluster: str) -> list[str]:
    prefix = naming.netns_prefix(cluster)
    try:
        names = os.listdir("/var/run/netns")
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def netns_inode(name: str) -> int | None:
    try:
        return os.stat(f"/var/run/netns/{name}").st_ino
    except OSError:
        return None


def socket_in_netns(ns: str) -> socket.socket:
    """A non-blocking TCP socket living in netns `ns` (a socket keeps the netns it was created in)."""
    netns.pushns(ns)
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    finally:
        netns.popns()
    sock.setblocking(False)
    return sock
