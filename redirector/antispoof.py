"""Per-pod anti-spoofing: traffic from a pod's interface must carry that pod's IP, else it is dropped.

The agent names a connection's source pod by its source address, so a pod that takes another pod's
IP (adds it to its interface and sends a gratuitous ARP) would be counted, tapped and served as
that pod. Like Calico's per-interface RPF, the redirector pins each local pod IP to the host-side
interface it lives behind and drops anything else that interface sends:

* routed CNIs (a /32 route per pod via its own veth, Calico-style): iptables raw PREROUTING,
  `-i <veth> ! -s <pod IP>/32 -j DROP`. The binding is the CNI's route: trustworthy as is.
* bridge CNIs (every pod a port of one bridge, flannel/bridge-style): iptables cannot tell the
  ports apart (`rp_filter` sees one bridge), so ebtables filters per bridge port:
  `-i <port> -p IPv4 --ip-src ! <pod IP> -j DROP` and the same for ARP's sender IP (gratuitous ARP
  cannot poison the node's neighbour table; ARP probes from 0.0.0.0 pass). The binding is learned
  from the node's neighbour entry for the IP and the bridge's forwarding entry for its MAC, and
  then pinned: a later neighbour or FDB entry that moves the IP to another port (a spoofer's ARP)
  is ignored (logged `event=antispoof_conflict`) until the pinned port disappears (the pod is gone).
  Limit: an IP is pinned the first time the node has resolved it; a pod that claims a pod IP no
  one on the node has used yet could claim it first.

Drops are counted by the rules' own counters; the loop logs `event=spoof_dropped` with the
interface, the IP it is pinned to and the packets dropped since the last line. `plan()` is sans-IO
(bindings in, rule lines out, golden-testable); `AntiSpoof` reads the kernel with pyroute2 and
applies with the node's iptables/ebtables (the capture's Netfilter).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

CHAIN = "NODEMESH_ANTISPOOF"
COMMENT = "nodemesh: anti-spoofing"
EB_HOOKS = ("INPUT", "FORWARD")
HOOK = f'-A PREROUTING -m comment --comment "{COMMENT}" -j {CHAIN}'
_NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x80  # REACHABLE STALE DELAY PROBE PERMANENT


@dataclass(frozen=True, order=True)
class Binding:
    """Pod IP `ip` lives behind host interface `iface` (a bridge port when `bridged`)."""

    iface: str
    ip: str
    bridged: bool


def iptables_rules(bindings: Iterable[Binding]) -> list[str]:
    """raw-table rules (iptables-save form) for the routed interfaces."""
    return [f'-A {CHAIN} ! -s {b.ip}/32 -i {b.iface} -m comment --comment "{COMMENT}: {b.ip}" -j DROP'
            for b in sorted(bindings) if not b.bridged]


def ebtables_rules(bindings: Iterable[Binding]) -> list[str]:
    """filter-table rules (ebtables-save form) for the bridge ports."""
    out: list[str] = []
    for b in sorted(bindings):
        if b.bridged:
            out += [f"-A {CHAIN} -p ARP -i {b.iface} --arp-ip-src 0.0.0.0 -j RETURN",
                    f"-A {CHAIN} -p ARP -i {b.iface} --arp-ip-src ! {b.ip} -j DROP",
                    f"-A {CHAIN} -p IPv4 -i {b.iface} --ip-src ! {b.ip} -j DROP"]
    return out


def merge(pinned: dict[str, Binding], seen: Iterable[Binding], live_ifaces: set[str],
          on_conflict: Callable[[Binding, Binding], None] = lambda new, old: None) -> dict[str, Binding]:
    """The pins after a look at the kernel (ip -> binding). A pin stays while its interface exists;
    a new sighting pins an IP not pinned and an interface not pinned (one IPv4 per pod interface);
    a sighting that contradicts a pin is a spoofer's, reported and ignored."""
    pins = {ip: b for ip, b in pinned.items() if b.iface in live_ifaces}
    by_iface = {b.iface: b for b in pins.values()}
    for b in sorted(seen):
        old = pins.get(b.ip) or by_iface.get(b.iface)
        if old is None:
            pins[b.ip] = by_iface[b.iface] = b
        elif old != b:
            on_conflict(b, old)
    return pins


# ---------------------------------------------------------------------------- the kernel


def discover(ipr: Any, pod_cidrs: Iterable[str]) -> tuple[list[Binding], set[str]]:
    """(what the kernel says about local pod IPs, the names of the interfaces that exist)."""
    nets = [ipaddress.ip_network(c, strict=False) for c in pod_cidrs]
    nets = [n for n in nets if n.version == 4]

    def ours(ip: str | None) -> bool:
        return ip is not None and ip != "" and any(ipaddress.ip_address(ip) in n for n in nets)

    links = {link["index"]: link for link in ipr.get_links()}
    names = {i: link.get_attr("IFLA_IFNAME") for i, link in links.items()}
    bridges = {i for i, link in links.items()
               if (link.get_attr("IFLA_LINKINFO") or {}) and link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND")
               == "bridge"}
    found: list[Binding] = []
    for route in ipr.get_routes(family=socket.AF_INET, table=254):
        dst, oif = route.get_attr("RTA_DST"), route.get_attr("RTA_OIF")
        if route["dst_len"] == 32 and ours(dst) and oif in names and oif not in bridges:
            found.append(Binding(names[oif], dst, False))
    if bridges:
        port_of_mac: dict[tuple[int, str], int] = {}
        for entry in ipr.fdb("dump"):
            master, mac = entry.get_attr("NDA_MASTER"), entry.get_attr("NDA_LLADDR")
            if master in bridges and mac and entry["ifindex"] not in bridges:
                port_of_mac[(master, mac)] = entry["ifindex"]
        for bridge in bridges:
            for neigh in ipr.get_neighbours(family=socket.AF_INET, ifindex=bridge):
                ip, mac = neigh.get_attr("NDA_DST"), neigh.get_attr("NDA_LLADDR")
                port = port_of_mac.get((bridge, mac or ""))
                if ours(ip) and port in names and neigh["state"] & _NUD_USABLE:
                    found.append(Binding(names[port], ip, True))
    return found, set(names.values())


_EB_COUNT = re.compile(r"-i (\S+) --ip-src ! (\S+) -j DROP , pcnt = (\d+)")
_IPT_COUNT = re.compile(r"^\[(\d+):\d+\] -A " + CHAIN + r" ! -s ([\d.]+)/32 -i (\S+) ")


class AntiSpoof:
    """Keeps the anti-spoofing rules in step with the node's pods, from a thread of the redirector."""

    def __init__(self, nf: Any, pod_cidrs: Iterable[str], log: Callable[..., None], interval_s: float = 1.0,
                 iproute: Callable[[], Any] | None = None) -> None:
        self.nf = nf
        self.pod_cidrs = tuple(pod_cidrs)
        self.log = log
        self.interval_s = interval_s
        self._iproute = iproute
        self.pins: dict[str, Binding] = {}
        self._applied: tuple[list[str], list[str]] | None = None
        self._dropped: dict[tuple[str, str], int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one round
    def sync(self) -> bool:
        """Look at the kernel, re-pin, apply what changed; True when rules were written."""
        from pyroute2 import IPRoute

        with (self._iproute() if self._iproute else IPRoute()) as ipr:
            seen, live = discover(ipr, self.pod_cidrs)
        self.pins = merge(self.pins, seen, live, self._conflict)
        want = (iptables_rules(self.pins.values()), ebtables_rules(self.pins.values()))
        if want == self._applied and self._hooked():
            return False
        self._write(*want)
        self._applied = want
        self.log("antispoof_applied", pods=str(len(self.pins)))
        return True

    def _hooked(self) -> bool:
        """Are our hooks still there (a full `redirector remove` takes them out with the capture)?"""
        eb = self.nf.eb_save("filter")
        return HOOK in self.nf.save("raw") and all(f"-A {c} -j {CHAIN}" in eb for c in EB_HOOKS)

    def _conflict(self, new: Binding, old: Binding) -> None:
        self.log("antispoof_conflict", claimed_ip=new.ip, claimed_iface=new.iface, pinned_ip=old.ip,
                 pinned_iface=old.iface)

    def _write(self, ipt: list[str], eb: list[str]) -> None:
        # iptables: declaring our chain in a --noflush restore empties it; the hook goes in once.
        have_hook = HOOK in self.nf.save("raw")
        lines = ["*raw", f":{CHAIN} - [0:0]", *ipt]
        if not have_hook:
            lines.append(f'-I PREROUTING 1 -m comment --comment "{COMMENT}" -j {CHAIN}')
        self.nf.restore("\n".join([*lines, "COMMIT", ""]))
        # ebtables (filter): flush our chain and fill it; hooks from INPUT (to the node) and
        # FORWARD (to other pods on the bridge).
        saved = self.nf.eb_save("filter")
        if f":{CHAIN} " in saved:
            self.nf.eb("-t", "filter", "-F", CHAIN)
        else:
            self.nf.eb("-t", "filter", "-N", CHAIN, "-P", "RETURN")
        for hook_chain in EB_HOOKS:
            if f"-A {hook_chain} -j {CHAIN}" not in saved:
                self.nf.eb("-t", "filter", "-I", hook_chain, "1", "-j", CHAIN)
        for rule in eb:
            self.nf.eb("-t", "filter", *rule.split())

    def count(self) -> dict[tuple[str, str], int]:
        """Packets dropped so far per (interface, IP it is pinned to), from the rules' counters."""
        counts: dict[tuple[str, str], int] = {}
        text = self.nf.eb("-t", "filter", "-L", CHAIN, "--Lc", check=False)
        for iface, ip, n in _EB_COUNT.findall(text):
            counts[(iface, ip)] = counts.get((iface, ip), 0) + int(n)
        for line in self.nf._run([f"iptables-{self.nf.backend}-save", "-c", "-t", "raw"], check=False).splitlines():
            m = _IPT_COUNT.match(line)
            if m:
                counts[(m.group(3), m.group(2))] = int(m.group(1))
        return counts

    def _report(self) -> None:
        for key, n in self.count().items():
            before = self._dropped.get(key, 0)
            if n > before:
                self.log("spoof_dropped", iface=key[0], pinned_ip=key[1], packets=str(n - before), total=str(n))
            self._dropped[key] = n

    # -- the loop
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="antispoof", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
                self._report()
            except Exception as exc:  # noqa: BLE001 - a bad round must not end protection for good
                self.log("antispoof_failed", error=repr(exc)[:300])
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        """Stop the loop and take every rule out (the redirector is leaving the node)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.remove()

    def halt(self) -> None:
        """Stop writing rules (the redirector is shutting down); the loop thread ends soon after."""
        self._stop.set()

    def remove(self) -> None:
        """Take our chains and hooks out (remove_rules)."""
        remove_rules(self.nf)
        self._applied = None


def remove_rules(nf: Any) -> bool:
    """Take the anti-spoofing chains and hooks out; a table only they used is deleted too (nft), so
    the node's ruleset reads as before. True if anything was there."""
    from nodemesh.redirector.apply import Redirector, _is_empty, parse_table

    changed = False
    before = parse_table(nf.save("raw"), "raw")
    if CHAIN in before.chains:
        lines = [f"-D PREROUTING {spec}" for spec in before.rules.get("PREROUTING", []) if spec.endswith(f"-j {CHAIN}")]
        nf.restore("\n".join(["*raw", *lines, f"-F {CHAIN}", f"-X {CHAIN}", "COMMIT", ""]))
        after = parse_table(nf.save("raw"), "raw")
        if nf.backend == "nft" and _is_empty(after) and Redirector._table_was_ours(before):
            nf.restore("*raw\nCOMMIT\n", noflush=False)
        changed = True
    eb_before = parse_table(nf.eb_save("filter"), "filter")
    if CHAIN in eb_before.chains:
        for hook_chain in EB_HOOKS:
            for _ in range(eb_before.rules.get(hook_chain, []).count(f"-j {CHAIN}")):
                nf.eb("-t", "filter", "-D", hook_chain, "-j", CHAIN)
        nf.eb("-t", "filter", "-F", CHAIN)
        nf.eb("-t", "filter", "-X", CHAIN)
        others = [s for c, specs in eb_before.rules.items() if c != CHAIN for s in specs if s != f"-j {CHAIN}"]
        after = parse_table(nf.eb_save("filter"), "filter")
        if nf.eb_backend == "nft" and not others and _is_empty(after):
            nf.eb_restore("*filter\n", noflush=False)
        changed = True
    return changed
