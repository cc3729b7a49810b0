"""Per-pod anti-spoofing (redirector/antispoof.py): the rules a set of pins makes, and how pins
follow the kernel without letting a spoofer move an IP to its own interface."""

from __future__ import annotations

from nodemesh.redirector.antispoof import Binding, ebtables_rules, iptables_rules, merge

A = Binding("veth-a", "10.244.1.3", True)
V = Binding("veth-v", "10.244.1.4", True)
R = Binding("cali-r", "10.244.1.9", False)


def test_redirector_antispoof_rules_per_style() -> None:
    assert iptables_rules([A, V, R]) == [
        ('-A NODEMESH_ANTISPOOF ! -s 10.244.1.9/32 -i cali-r -m comment --comment '
         '"nodemesh: anti-spoofing: 10.244.1.9" -j DROP')]
    assert ebtables_rules([V, R, A]) == [
        "-A NODEMESH_ANTISPOOF -p ARP -i veth-a --arp-ip-src 0.0.0.0 -j RETURN",
        "-A NODEMESH_ANTISPOOF -p ARP -i veth-a --arp-ip-src ! 10.244.1.3 -j DROP",
        "-A NODEMESH_ANTISPOOF -p IPv4 -i veth-a --ip-src ! 10.244.1.3 -j DROP",
        "-A NODEMESH_ANTISPOOF -p ARP -i veth-v --arp-ip-src 0.0.0.0 -j RETURN",
        "-A NODEMESH_ANTISPOOF -p ARP -i veth-v --arp-ip-src ! 10.244.1.4 -j DROP",
        "-A NODEMESH_ANTISPOOF -p IPv4 -i veth-v --ip-src ! 10.244.1.4 -j DROP",
    ]
    assert iptables_rules([]) == ebtables_rules([]) == []


def test_redirector_antispoof_pins_hold_against_a_spoofer() -> None:
    conflicts: list[tuple[Binding, Binding]] = []
    live = {"veth-a", "veth-v", "cali-r", "cni0"}
    pins = merge({}, [A, V], live)
    assert pins == {A.ip: A, V.ip: V}
    # The attacker's gratuitous ARP: the node now maps the victim's IP to the attacker's port.
    spoofed = Binding("veth-a", V.ip, True)
    pins = merge(pins, [spoofed, A], live, lambda new, old: conflicts.append((new, old)))
    assert pins == {A.ip: A, V.ip: V}
    assert conflicts == [(spoofed, V)]            # the victim holds that IP (and the port its own)
    # A second address on an unpinned port: still one IPv4 per pod interface.
    pins = merge(pins, [Binding("veth-n", "10.244.1.5", True), Binding("veth-n", "10.244.1.6", True)],
                 live | {"veth-n"})
    assert pins["10.244.1.5"].iface == "veth-n" and "10.244.1.6" not in pins
    # The victim's pod goes away (its veth with it): its IP may be pinned again, to a new pod's port.
    pins = merge(pins, [Binding("veth-w", V.ip, True)], (live - {"veth-v"}) | {"veth-n", "veth-w"})
    assert pins[V.ip] == Binding("veth-w", V.ip, True)
