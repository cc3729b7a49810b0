"""The agent's transparent upstream socket takes its source port at connect(), per 4-tuple.

upstream_socket binds the calling pod's address with IP_BIND_ADDRESS_NO_PORT, so the kernel picks a
port that makes the whole tuple unique when it connects: one source port serves many destinations,
as it does for the pod itself. With bind(0) every upstream held a port of the pod address whatever
its destination, and a pod ran out of them through the agent long before it would directly. Here a
private netns with a 2-port range makes the count exact. (That a tuple the agent picks may be one
the pod has in conntrack is the redirector's conntrack-zone rule's business: tests/integration/faults.)
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.root

PROBE = textwrap.dedent("""
    import socket
    from nodemesh.agent.sockets import upstream_socket
    servers = []
    for port in (7001, 7002):
        s = socket.socket(); s.bind(("127.0.0.1", port)); s.listen(8); servers.append(s)
    out = []
    for port in (7001, 7001, 7002, 7002):
        sock, transparent = upstream_socket("10.1.2.3")  # a local address here, bound transparently
        unbound = sock.getsockname()
        sock.setblocking(True)
        try:
            sock.connect(("127.0.0.1", port))
            out.append((port, unbound[1], sock.getsockname()[1], transparent))
        except OSError as exc:
            out.append((port, unbound[1], exc.errno, transparent))
    print(out)
""")


def test_mesh_upstream_socket_port_is_per_destination() -> None:
    ns = "nmmesh" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", "10.1.2.3/32", "dev", "lo"],
                    ["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40001"]):
            subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)
        out = eval(subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE], capture_output=True,
                                  text=True, check=True).stdout)
        assert all(unbound == 0 and transparent for _, unbound, _, transparent in out), out  # no port before connect
        per_dest = {7001: sorted(p for d, _, p, _ in out if d == 7001), 7002: sorted(p for d, _, p, _ in out if d == 7002)}
        # Both ports of the range serve each destination: four connections out of two ports.
        assert per_dest == {7001: [40000, 40001], 7002: [40000, 40001]}, out
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


KEPT = textwrap.dedent("""
    import errno, socket, time
    from nodemesh.agent.sockets import upstream_socket
    servers = {}
    for port in (7001, 7002):
        s = socket.socket(); s.bind(("127.0.0.1", port)); s.listen(8); servers[port] = s
    out = {}

    def dial(port, keep):
        sock, transparent = upstream_socket("10.1.2.3", keep)
        bound = sock.getsockname()[1]
        sock.setblocking(True)
        try:
            sock.connect(("127.0.0.1", port))
            return sock, (bound, sock.getsockname()[1], transparent)
        except OSError as exc:
            sock.close()
            return None, (bound, errno.errorcode[exc.errno], transparent)

    a, out["kept"] = dial(7001, 45000)
    b, out["kept_other_destination"] = dial(7002, 45000)   # the same port towards another server
    _, out["same_tuple_open"] = dial(7001, 45000)          # that tuple is connected: connect refuses
    held = socket.socket(); held.bind(("0.0.0.0", 45001)); held.listen(1)
    c, out["port_held_by_a_listener"] = dial(7001, 45001)  # bind refuses: falls back to port 0
    d, out["tw_first"] = dial(7001, 45002)
    peer, _ = servers[7001].accept()
    d.close()                                               # we close first: the tuple goes to TIME_WAIT
    time.sleep(0.2)
    peer.close()
    time.sleep(0.2)
    _, out["tw_again"] = dial(7001, 45002)
    print(out)
""")


def test_mesh_upstream_socket_keeps_the_callers_port_when_it_can() -> None:
    """With a NATed capture the agent dials from the caller's own port (one tuple to check instead
    of a search through every port in TIME_WAIT); where the kernel refuses that port the relay
    asks again with port 0 (`agent/relay.py` _dial)."""
    ns = "nmmesh" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", "10.1.2.3/32", "dev", "lo"],
                    ["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=0"]):
            subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)
        out = eval(subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", KEPT], capture_output=True,
                                  text=True, check=True).stdout)
        assert out["kept"] == (45000, 45000, True), out
        assert out["kept_other_destination"] == (45000, 45000, True), out
        assert out["same_tuple_open"] == (45000, "EADDRNOTAVAIL", True), out
        bound, port, transparent = out["port_held_by_a_listener"]
        assert bound == 0 and port not in (0, 45001) and transparent, out
        assert out["tw_first"] == (45002, 45002, True), out
        # A tuple in TIME_WAIT is taken over at once for a socket that bound its port (TCP
        # timestamps make that safe): no search, no fallback.
        assert out["tw_again"] == (45002, 45002, True), out
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
