"""The redirector's configuration: one typed object, built once from flags, passed down."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from typing import Literal

from nodemesh.api.model import ADMIN_PORT, CONNTRACK_ZONE, INBOUND_PORT, OUTBOUND_PORT

Mechanism = Literal["dnat", "tproxy"]
CaptureMode = Literal["iptables", "ebpf"]

# A single mark bit clear of kube-proxy's (0x4000 masquerade, 0x8000 drop), Calico's default mask
# (0xffff0000) and Cilium's magic marks (0x0f00). Configurable for clusters that use it.
DEFAULT_TRANSPARENT_MARK = 0x1000
DEFAULT_ROUTE_TABLE = 4140
DEFAULT_RULE_PRIORITY = 4140
# The conntrack zone of the agent's transparent upstream connections (original direction only): a
# tuple they share with a pod's own connection (captured, DNATed to the agent) is then never taken
# for it. Zones are 16-bit; 0 is everyone else's.
DEFAULT_CONNTRACK_ZONE = CONNTRACK_ZONE


class ConfigError(ValueError):
    """The capture configuration cannot describe a working plan."""


def ipv4_only(items: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The IPv4 entries (addresses or CIDRs). Capture is iptables, IPv4 only: on a dual-stack node
    the IPv6 pod CIDRs and pod IPs (node.spec.podCIDRs, the agent's /capture) are left uncaptured."""
    return tuple(i for i in items if ":" not in i)


@dataclass(frozen=True)
class CaptureConfig:
    node_ip: str                                  # capture target (DNAT) and the node's own address
    pod_cidrs: tuple[str, ...]                    # this node's pod CIDR(s): who is a "local pod"
    outbound_port: int = OUTBOUND_PORT
    inbound_port: int = INBOUND_PORT
    admin_port: int = ADMIN_PORT
    # Destination ports never captured at all ("skipped": no proxy). None: the agent's own ports.
    skip_ports: tuple[int, ...] | None = None
    # Pods of Namespaces labelled nodemesh.io/capture=disabled; iptables cannot see namespaces.
    excluded_ips: tuple[str, ...] = ()
    # Packets carrying any of these marks are never captured (e.g. a mark the agent sets on its sockets).
    ignore_marks: tuple[int, ...] = ()
    mechanism: Mechanism = "dnat"
    transparent_mark: int = DEFAULT_TRANSPARENT_MARK
    route_table: int = DEFAULT_ROUTE_TABLE
    rule_priority: int = DEFAULT_RULE_PRIORITY
    conntrack_zone: int = DEFAULT_CONNTRACK_ZONE
    # Route (not switch) TCP between local pods on a bridge so replies reach transparent sockets.
    bridge_replies: bool = True
    # Capture only while the agent beats (redirector/heartbeat.py): the rules fail open by
    # themselves when the agent dies or hangs, even with no redirector left to remove them.
    # The DaemonSet and `install --sandbox` turn it on; off, a stand-in agent that does not beat
    # is captured as before.
    agent_heartbeat: bool = False
    # How pods' outbound connections reach the agent: iptables (nat PREROUTING, the default) or
    # ebpf (cgroup/connect4 in each pod's cgroup, redirector/ebpf.py; inbound stays iptables).
    capture: CaptureMode = "iptables"

    def __post_init__(self) -> None:
        try:
            ipaddress.IPv4Address(self.node_ip)
            for cidr in self.pod_cidrs:
                ipaddress.IPv4Network(cidr, strict=False)
            for ip in self.excluded_ips:
                ipaddress.IPv4Address(ip)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        # Sorted and deduplicated, so the same set of pods always gives the same plan.
        object.__setattr__(self, "excluded_ips",
                           tuple(sorted(set(self.excluded_ips), key=ipaddress.IPv4Address)))
        if not self.pod_cidrs:
            raise ConfigError("at least one pod CIDR is needed: capture works from the pod CIDR")
        if self.mechanism not in ("dnat", "tproxy"):
            raise ConfigError(f"unknown mechanism {self.mechanism!r} (dnat or tproxy)")
        if self.capture not in ("iptables", "ebpf"):
            raise ConfigError(f"unknown capture {self.capture!r} (iptables or ebpf)")
        if self.capture == "ebpf" and self.mechanism != "dnat":
            raise ConfigError("--capture ebpf takes inbound with dnat only (no tproxy)")
        if not 0 < self.conntrack_zone < 65536:
            raise ConfigError(f"invalid conntrack zone {self.conntrack_zone} (1-65535)")
        for port in (self.outbound_port, self.inbound_port, self.admin_port, *(self.skip_ports or ())):
            if not 0 < port < 65536:
                raise ConfigError(f"invalid port {port}")

    @property
    def effective_skip_ports(self) -> tuple[int, ...]:
        if self.skip_ports is not None:
            ports = set(self.skip_ports)
        else:
            ports = set()
        # The agent's own ports are never captured, whatever the user lists: capturing them loops.
        ports |= {self.outbound_port, self.inbound_port, self.admin_port}
        return tuple(sorted(ports))

    @property
    def networks(self) -> tuple[str, ...]:
        return tuple(str(ipaddress.IPv4Network(c, strict=False)) for c in self.pod_cidrs)

    def with_excluded(self, ips: tuple[str, ...] | list[str]) -> CaptureConfig:
        """The same config with a new set of excluded pod IPs (sorted, deduplicated)."""
        return replace(self, excluded_ips=tuple(ips))
