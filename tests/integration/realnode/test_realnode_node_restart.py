"""Issue 11, "must show": a whole node restarted under steady load; the mesh comes back by itself.

Two nodes; node1 runs the API server, a server replica, a client, the hostNetwork echo and its agent
pod; the controller runs on node2. A client on node2 sends 100 requests/s (a new connection each)
to Service `server`, whose endpoints are on both nodes. node1 is restarted: every process on it is
killed, its pods come back with new IPs, the iptables rules from before stay. No manual step may
follow: the mesh must be healthy again (`nodemesh check`), node1's capture back, node1's agent
observing its pods' traffic again, and `nodemesh stat` counting it. The times are printed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from realnode_harness import RealNode, series, wait_for

pytestmark = pytest.mark.root

RATE = 100.0
RECOVERY_TIMEOUT_S = 120.0


def _stat_rps(mesh: RealNode, deployment: str) -> float:
    rows = mesh.stat_json("deploy", "-n", "rn", "-t", "10s")
    return next((float(r["rps"] or 0) for r in rows if r["name"] == deployment), 0.0)


def test_realnode_whole_node_restart_under_load_recovers_by_itself(mesh: RealNode, tmp_path: Path) -> None:
    node = "node1"
    out = tmp_path / "load.jsonl"
    assert mesh.healthy()
    load = mesh.start_load(mesh.client("node2"), "http://server.rn/", out, rate=RATE, duration=75.0)
    try:
        assert wait_for(lambda: len(mesh.records(out)) > RATE * 3, 20.0) is not None, "the load did not start"
        restart = time.monotonic()
        restart_wall = time.time()
        mesh.sb.restart_node(node)

        def since_restart(predicate, step: float) -> float | None:  # type: ignore[no-untyped-def]
            left = RECOVERY_TIMEOUT_S - (time.monotonic() - restart)
            return None if wait_for(predicate, left, step) is None else time.monotonic() - restart

        def seconds(value: float | None) -> str:
            return "never" if value is None else f"{value:.1f} s"

        # The rules from before the restart are still in the kernel: first they must go (nothing
        # serves the agent's ports yet), then come back once the agent is ready with its identity.
        stale_gone = since_restart(lambda: not mesh.capture_hooked(node), 0.05)
        capture = since_restart(lambda: mesh.capture_hooked(node), 0.1)
        observed = since_restart(lambda: series(mesh.agent_metrics(node), "request_total", direction="inbound",
                                                dst_name="server-node1") > 0, 0.2)
        healthy = since_restart(mesh.healthy, 0.5)
        # A 10 s window that starts after the restart holds only what the restarted agent reported.
        time.sleep(max(0.0, restart + 10.0 - time.monotonic()))
        stat = since_restart(lambda: _stat_rps(mesh, "server-node1") > 0, 1.0)
        print(f"\nnode restart under {RATE:.0f} req/s: stale capture rules removed after {seconds(stale_gone)}, "
              f"capture back after {seconds(capture)}, node1's agent "
              f"observing after {seconds(observed)}, mesh healthy (check) after {seconds(healthy)}, "
              f"stat counting server-node1 again after {seconds(stat)} (10 s window: >= 10 s by construction)")
        assert stale_gone is not None, f"the rules from before the restart stayed on {node}"
        assert capture is not None, f"capture never came back on {node}:\n{mesh.mesh_logs()}"
        assert observed is not None, f"{node}'s agent never saw its pods' traffic again:\n{mesh.mesh_logs()}"
        assert healthy is not None, f"the mesh never became healthy again:\n{mesh.mesh_logs()}"
        assert stat is not None, "nodemesh stat never counted server-node1 again"
        load.wait(timeout=120)
    finally:
        load.kill()
        load.wait()
    records = mesh.records(out)
    during = [r for r in records if r["t"] >= restart_wall]
    failed = [r for r in during if not r["ok"]]
    last = [r for r in records if r["t"] >= records[-1]["t"] - 10.0]
    to_node1 = [r for r in during if r["ok"] and r.get("body", "").startswith("server-node1")]
    errors: dict[str, int] = {}
    for r in failed:
        errors[str(r.get("error"))] = errors.get(str(r.get("error")), 0) + 1
    span = (max(r["t"] for r in failed) - min(r["t"] for r in failed)) if failed else 0.0
    print(f"load: {len(records)} requests, {len(during)} after the restart, {len(failed)} failed over {span:.1f} s "
          f"({errors}; node1's server itself was down), last 10 s: {sum(not r['ok'] for r in last)} failed of "
          f"{len(last)}; {len(to_node1)} answered by server-node1 after the restart")
    retries = {n: series(mesh.agent_metrics(n), "nodemesh_endpoint_retries_total") for n in ("node2",)}
    print(f"upstream connects retried on another endpoint (nodemesh_endpoint_retries_total): {retries}")
    assert to_node1, "no request reached server-node1 after its node restarted"
    assert all(r["ok"] for r in last), "requests still failing at the end of the run"
