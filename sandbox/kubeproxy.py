"""ClusterIPs without a mesh, the way kube-proxy's iptables mode does it: pure rule rendering.

`render(services, slices)` returns iptables-restore input for one node: nat chains
KUBE-SERVICES -> KUBE-SVC-<hash> -> KUBE-SEP-<hash> (DNAT), spreading over READY endpoints with
`-m statistic --mode random`, hairpin masquerade through KUBE-MARK-MASQ/KUBE-POSTROUTING, and
a filter KUBE-SERVICES that rejects ClusterIP ports with no ready endpoint (a fast
"connection refused" instead of a timeout). It is applied with `iptables-restore --noflush`:
declaring a chain flushes it, so every sync rewrites our chains and nobody else's.

The jumps from the built-in chains (`base_jumps`) are installed once at `sandbox up` and
*appended*, so a mesh chain inserted later at position 1 of nat PREROUTING runs first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nodemesh.sandbox.naming import kube_chain

MASQ_MARK = "0x4000/0x4000"
_PORTALS = '-m comment --comment "kubernetes service portals"'


@dataclass(frozen=True)
class ServicePort:
    namespace: str
    name: str
    port_name: str
    cluster_ip: str
    port: int
    protocol: str
    endpoints: tuple[tuple[str, int], ...]  # ready (ip, port), sorted

    @property
    def svc_port_name(self) -> str:
        return f"{self.namespace}/{self.name}" + (f":{self.port_name}" if self.port_name else "")

    @property
    def svc_chain(self) -> str:
        return kube_chain("KUBE-SVC-", self.svc_port_name, self.protocol.lower())

    def sep_chain(self, ip: str, port: int) -> str:
        return kube_chain("KUBE-SEP-", self.svc_port_name, self.protocol.lower(), f"{ip}:{port}")


def service_ports(services: list[dict[str, Any]], slices: list[dict[str, Any]]) -> list[ServicePort]:
    by_svc: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for s in slices:
        key = (s["metadata"]["namespace"], s["metadata"]["labels"].get("kubernetes.io/service-name", ""))
        by_svc.setdefault(key, []).append(s)
    out = []
    for svc in services:
        ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
        for sp in svc["spec"]["ports"]:
            eps: set[tuple[str, int]] = set()
            for sl in by_svc.get((ns, name), []):
                port = next((p["port"] for p in sl.get("ports") or [] if p.get("name", "") == sp.get("name", "")),
                            None)
                if port is None:
                    continue
                for ep in sl.get("endpoints") or []:
                    if ep.get("conditions", {}).get("ready"):
                        eps.update((a, port) for a in ep["addresses"])
            out.append(ServicePort(ns, name, sp.get("name", ""), svc["spec"]["clusterIP"], sp["port"],
                                   sp.get("protocol", "TCP"), tuple(sorted(eps))))
    out.sort(key=lambda s: (s.namespace, s.name, s.port_name))
    return out


def base_jumps() -> str:
    """Once per node at `up`: our chains and the jumps into them, appended after anyone's rules."""
    return "\n".join([
        "*nat",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-MARK-MASQ - [0:0]",
        ":KUBE-POSTROUTING - [0:0]",
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        "COMMIT",
        "*filter",
        ":KUBE-SERVICES - [0:0]",
        f"-A FORWARD -m conntrack --ctstate NEW {_PORTALS} -j KUBE-SERVICES",
        f"-A OUTPUT -m conntrack --ctstate NEW {_PORTALS} -j KUBE-SERVICES",
        "COMMIT",
        "",
    ])


def render(ports: list[ServicePort], stale_chains: set[str] = frozenset()) -> str:  # type: ignore[assignment]
    """iptables-restore --noflush input rewriting every KUBE-* chain; `stale_chains` are deleted."""
    nat_chains = ["KUBE-SERVICES", "KUBE-MARK-MASQ", "KUBE-POSTROUTING"]
    rules: list[str] = [
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK.split('/')[0]}",
        f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK.split('/')[0]}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE',
    ]
    filter_rules: list[str] = []
    for sp in ports:
        proto = sp.protocol.lower()
        comment = f'"{sp.svc_port_name} cluster IP"'
        if not sp.endpoints:
            filter_rules.append(
                f'-A KUBE-SERVICES -d {sp.cluster_ip}/32 -p {proto} -m comment --comment '
                f'"{sp.svc_port_name} has no endpoints" -m {proto} --dport {sp.port} '
                f"-j REJECT --reject-with icmp-port-unreachable"
            )
            continue
        nat_chains.append(sp.svc_chain)
        rules.append(f"-A KUBE-SERVICES -d {sp.cluster_ip}/32 -p {proto} -m comment --comment {comment} "
                     f"-m {proto} --dport {sp.port} -j {sp.svc_chain}")
        n = len(sp.endpoints)
        for i, (ip, port) in enumerate(sp.endpoints):
            sep = sp.sep_chain(ip, port)
            nat_chains.append(sep)
            ep_comment = f'"{sp.svc_port_name} -> {ip}:{port}"'
            if i < n - 1:
                prob = 1.0 / (n - i)
                rules.append(f"-A {sp.svc_chain} -m comment --comment {ep_comment} -m statistic --mode random "
                             f"--probability {prob:.11f} -j {sep}")
            else:
                rules.append(f"-A {sp.svc_chain} -m comment --comment {ep_comment} -j {sep}")
            rules.append(f'-A {sep} -s {ip}/32 -m comment --comment "{sp.svc_port_name}" -j KUBE-MARK-MASQ')
            rules.append(f'-A {sep} -p {proto} -m comment --comment "{sp.svc_port_name}" -m {proto} '
                         f"-j DNAT --to-destination {ip}:{port}")
    lines = ["*nat"]
    lines += [f":{c} - [0:0]" for c in nat_chains]
    dead = sorted(set(stale_chains) - set(nat_chains))
    lines += [f":{c} - [0:0]" for c in dead]  # declared (flushed) so it can be deleted below
    lines += rules
    lines += [f"-X {c}" for c in dead]
    lines += ["COMMIT", "*filter", ":KUBE-SERVICES - [0:0]", *filter_rules, "COMMIT", ""]
    return "\n".join(lines)


def chains_of(text: str) -> set[str]:
    """The per-service chains a rendered plan declares (to delete them when they go away)."""
    return {ln[1:].split()[0] for ln in text.splitlines()
            if ln.startswith((":KUBE-SVC-", ":KUBE-SEP-"))}


def render_hosts(pod_namespace: str, pod_name: str, pod_ip: str, services: list[dict[str, Any]],
                 domain: str = "cluster.local") -> str:
    """A pod's /etc/hosts: itself, then every Service by its DNS names (short name only in its ns)."""
    lines = ["# Kubernetes-managed hosts file (nodemesh sandbox).",
             "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
             f"{pod_ip}\t{pod_name}"]
    for svc in sorted(services, key=lambda s: (s["metadata"]["namespace"], s["metadata"]["name"])):
        ns, name, ip = svc["metadata"]["namespace"], svc["metadata"]["name"], svc["spec"].get("clusterIP")
        if not ip:
            continue
        names = [f"{name}.{ns}.svc.{domain}", f"{name}.{ns}.svc", f"{name}.{ns}"]
        if ns == pod_namespace:
            names.append(name)
        lines.append(f"{ip}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


def render_resolv(pod_namespace: str, domain: str = "cluster.local") -> str:
    # No reachable nameserver on purpose: names resolve from the hosts file or not at all, and a
    # lookup never leaves the sandbox (127.0.0.1 refuses at once instead of timing out).
    return (f"search {pod_namespace}.svc.{domain} svc.{domain} {domain}\n"
            "nameserver 127.0.0.1\noptions ndots:5 attempts:1 timeout:1\n")
