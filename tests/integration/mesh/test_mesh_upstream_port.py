"""The agent's transparent upstream socket never takes the caller's own source port.

Found by the sandbox-wide tests: inbound, the caller's port was picked by the other node's agent with
bind(0), from the same (odd) half of the port range as ours, so about 1 in 14000 cross-node connections
reused it; conntrack then took the upstream SYN for the captured connection and NATed it back to the
agent's own listener (connect timeout, a failed request). Here a private netns with a 2-port range makes
the kernel's pick deterministic.
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
    free, _ = upstream_socket("10.1.2.3")       # IP_TRANSPARENT: a non-local address, port from the range
    clash = free.getsockname()[1]
    free.close()
    sock, transparent = upstream_socket("10.1.2.3", avoid_port=clash)
    print(clash, sock.getsockname()[1], transparent)
""")


def test_mesh_upstream_socket_avoids_callers_port() -> None:
    ns = "nmmesh" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        # Only 40000 and 40001 to choose from: bind(0) prefers the odd one, so the first pick is known.
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40001"],
                       check=True)
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE], capture_output=True,
                             text=True, check=True).stdout.split()
        clash, got, transparent = int(out[0]), int(out[1]), out[2]
        assert transparent == "True"
        assert clash in (40000, 40001) and got in (40000, 40001)
        assert got != clash, out
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
