"""Issue 11, item 4: the agent never proxies to itself.

On a real node one `curl <nodeIP>:4140` from a pod made the agent loop forever: the connection,
not DNATed, still had a conntrack entry, so SO_ORIGINAL_DST answered "nodeIP:4140" and the agent
dialled its own listener, which did the same again (request_total{authority="10.89.0.1:4140"}
11687 -> 19062 after curl exited, each worker at ~38 % CPU). Any pod can do this to every node.
"""

from __future__ import annotations

import time

import pytest
from realnode_harness import PY, RealNode, series

pytestmark = pytest.mark.root

DIAL = ("import socket, sys\n"
        "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\n"
        "s.sendall(b'GET / HTTP/1.1\\r\\nHost: ' + sys.argv[1].encode() + b':' + sys.argv[2].encode() + b'\\r\\n\\r\\n')\n"
        "s.settimeout(3)\n"
        "try:\n"
        "    print(repr(s.recv(100)))\n"
        "except OSError as exc:\n"
        "    print(repr(exc))\n")


def test_realnode_agent_never_proxies_to_itself(mesh: RealNode) -> None:
    node, other = mesh.nodes[0], mesh.nodes[1]
    client = mesh.client(node)
    before = {n: mesh.agent_metrics(n) for n in mesh.nodes}
    targets = [(mesh.node_ip(node), 4140), (mesh.node_ip(node), 4143), (mesh.node_ip(other), 4140),
               (mesh.node_ip(other), 4143)]
    for ip, port in targets:   # from a pod, as in the issue
        mesh.sb.exec("rn", client, [PY, "-c", DIAL, ip, str(port)], capture_output=True, text=True, timeout=20)
    for ip, port in targets[:2]:  # and from a process on the node itself
        mesh.sb.node_exec(node, [PY, "-c", DIAL, ip, str(port)], capture_output=True, text=True, timeout=20)
    time.sleep(3)  # a loop keeps going after the client left
    after = {n: mesh.agent_metrics(n) for n in mesh.nodes}
    for n in mesh.nodes:
        opened = series(after[n], "tcp_open_total") - series(before[n], "tcp_open_total")
        to_itself = series(after[n], "request_total", authority=r".*:(4140|4143|4191)") - \
            series(before[n], "request_total", authority=r".*:(4140|4143|4191)")
        print(f"{n}: connections opened {opened:.0f}, requests to the agent's own ports {to_itself:.0f}")
        assert to_itself == 0, f"{n}: the agent proxied {to_itself:.0f} requests to its own ports"
        assert opened <= len(targets), f"{n}: {opened:.0f} connections for {len(targets)} dials: a loop"
