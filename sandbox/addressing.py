"""Address plan of one sandbox cluster, derived from its index alone.

Index 0 (the default cluster `nodemesh`) uses the classic ranges; every other index shifts an
octet so several sandboxes can run side by side. Only the underlay range is routed in the root
namespace (as the connected route of the one host link), so it is the range that must be unique;
the others are made distinct too, so addresses never confuse a reader.

| index | underlay          | pod CIDR of node k   | services        |
|-------|-------------------|----------------------|-----------------|
| 0     | 10.240.0.0/24     | 10.244.k.0/24        | 10.96.0.0/16    |
| i≥1   | 10.240.i.0/24     | 10.(100+i).k.0/24    | 10.97.i.0/24    |
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

MAX_INDEX = 63
MAX_NODES = 200
FIRST_SERVICE_OFFSET = 10  # .1-.9 stay free, like the API server's own service takes .1
# Routed style: pods' default gateway, answered by proxy ARP on the node side (Calico's address).
ROUTED_GATEWAY = "169.254.1.1"


@dataclass(frozen=True)
class AddressPlan:
    index: int

    def __post_init__(self) -> None:
        if not 0 <= self.index <= MAX_INDEX:
            raise ValueError(f"cluster index {self.index} out of range 0..{MAX_INDEX}")

    @property
    def underlay(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.240.{self.index}.0/24")

    @property
    def pod_supernet(self) -> ipaddress.IPv4Network:
        second = 244 if self.index == 0 else 100 + self.index
        return ipaddress.IPv4Network(f"10.{second}.0.0/16")

    @property
    def service_cidr(self) -> ipaddress.IPv4Network:
        if self.index == 0:
            return ipaddress.IPv4Network("10.96.0.0/16")
        return ipaddress.IPv4Network(f"10.97.{self.index}.0/24")

    def node_ip(self, k: int) -> str:
        self._check_node(k)
        return str(self.underlay.network_address + k)

    def pod_cidr(self, k: int) -> ipaddress.IPv4Network:
        self._check_node(k)
        base = self.pod_supernet.network_address + (k << 8)
        return ipaddress.IPv4Network(f"{base}/24")

    def pod_gateway(self, k: int) -> str:
        """Bridge style: the bridge's address, the pods' default gateway."""
        return str(self.pod_cidr(k).network_address + 1)

    @property
    def host_ip(self) -> str:
        """The root namespace's end of the host link."""
        return str(self.underlay.network_address + 253)

    @property
    def underlay_gateway(self) -> str:
        """An address in the underlay netns, which never forwards: the nodes' route for ClusterIPs
        nobody DNATs, so such a connection fails fast with ICMP unreachable instead of leaving."""
        return str(self.underlay.network_address + 254)

    def pod_ip_candidates(self, k: int) -> list[str]:
        net = self.pod_cidr(k)
        return [str(net.network_address + i) for i in range(2, 255)]

    def service_ip_candidates(self) -> list[str]:
        net = self.service_cidr
        last = min(net.num_addresses - 2, 65000)
        return [str(net.network_address + i) for i in range(FIRST_SERVICE_OFFSET, last + 1)]

    @staticmethod
    def _check_node(k: int) -> None:
        if not 1 <= k <= MAX_NODES:
            raise ValueError(f"node number {k} out of range 1..{MAX_NODES}")


def allocate(candidates: list[str], used: set[str]) -> str:
    for ip in candidates:
        if ip not in used:
            return ip
    raise RuntimeError("address range exhausted")
