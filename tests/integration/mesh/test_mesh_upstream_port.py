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
