"""Issue 11, item 2: the mesh's own components never depend on the mesh, above all after a restart.

On a real single-node cluster, after a node restart the redirector logged `capture_installed
reason=agent_ready excluded_ips=0`: the agent had no identity yet (it gets it from the controller),
so the restarted controller pod — a pod of the mesh's own namespace, with a new IP — was captured;
its calls to the API server went through the agent and failed (`TokenReview failed: ProtocolError`,
`ConnectionResetError(104)` on /api/v1/services), so the agents could not get their identity, so
the controller stayed captured: a deadlock only uninstall + reinstall ended. Capture must come back
only once the agent is ready *and* has its identity, which needs its own links (agent -> controller
-> API server) to work while capture is still off.

Here: one node, as in the issue (the API server, the controller, the agent and the app on it), the
whole node restarted (every process killed, pods renumbered, rules from before kept).
"""

from __future__ import annotations

import re
import time

import pytest
from realnode_harness import RealNode, realnode_mesh, series, wait_for

pytestmark = pytest.mark.root

RECOVERY_TIMEOUT_S = 120.0


def _controller_traffic(mesh: RealNode, node: str) -> float:
    """Connections the agent proxied for the controller pod (by name once known, by IP before)."""
    pod = mesh.controller_pod()
    metrics = mesh.agent_metrics(node)
    return (series(metrics, "tcp_open_total", src_pod=re.escape(pod["metadata"]["name"]))
            + series(metrics, "tcp_open_total", src_name=re.escape(pod["status"]["podIP"])))


def _capture_installs(log: str) -> list[int]:
    """excluded_ips of each `capture_installed` line of a redirector log."""
    return [int(m) for m in re.findall(r"event=capture_installed .*excluded_ips=(\d+)", log)]


def test_realnode_restart_capture_waits_for_the_agents_own_links() -> None:
    with realnode_mesh(nodes=1) as mesh:
        node = mesh.nodes[0]
        old_ip = mesh.controller_pod()["status"]["podIP"]
        assert mesh.healthy()
        started = time.monotonic()
        mesh.sb.restart_node(node)
        recovered = wait_for(mesh.healthy, RECOVERY_TIMEOUT_S, step=0.5)
        new_ip = mesh.controller_pod()["status"]["podIP"]
        print(f"node restart: controller {old_ip} -> {new_ip}; mesh healthy again after "
              f"{f'{recovered:.1f} s' if recovered is not None else 'NEVER'}")
        assert recovered is not None, (f"the mesh did not come back within {RECOVERY_TIMEOUT_S:.0f}s of a node "
                                       f"restart (only a reinstall would):\n{mesh.mesh_logs()}")
        assert new_ip != old_ip
        # Let a report or two land, then look at what the restarted agent proxied.
        time.sleep(3)
        proxied = _controller_traffic(mesh, node)
        installs = _capture_installs(mesh.redirector_log(node))
        print(f"controller connections proxied by the agent since the restart: {proxied:.0f}; "
              f"redirector capture_installed excluded_ips: {installs}; total {time.monotonic() - started:.1f}s")
        assert proxied == 0, "the controller pod was captured: the mesh's control plane depended on the mesh"
        assert installs and installs[0] >= 1, \
            "capture came back before the agent knew which pods to exclude (its identity)"
