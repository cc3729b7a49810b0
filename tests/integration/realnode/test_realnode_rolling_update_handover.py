"""Issue 12 item 2 with the mesh as DaemonSet pods: a real rolling update (maxSurge: the new agent pod
beside the old one, the old one stopped once the new one is Ready) keeps long-lived connections.

Each agent pod is its own container (own mount namespace, own health file); both are on the host
network, where the old pod's workers find the new pod's hand-over sockets. Echo connections (lines
and a stream kept 512 KB deep, every byte checked) from a client on each node to a server pod on
node1, held across the rollout of both nodes: none may be cut, and the old pods must say they
handed them over. (The same with TCP, HTTP/1 and gRPC, node processes, both CNI styles:
tests/integration/faults/test_faults_upgrade_handover.py.)
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from realnode_harness import MESH_NS, PY, RealNode, wait_for

pytestmark = pytest.mark.root

PEERS = str(Path(__file__).parents[1] / "faults" / "faults_peers.py")
ECHO_PORT = 9000
N_ECHO, N_BULK = 3, 1


def _progress(path: Path) -> dict[str, int]:
    try:
        return json.loads(path.read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return {}


def test_realnode_rolling_update_hands_over_long_lived_connections(mesh: RealNode, tmp_path: Path) -> None:
    assert mesh.healthy()
    sb = mesh.sb
    server = mesh.pod("rn", "server-node1-")
    server_ip = sb.pod("rn", server)["status"]["podIP"]
    old_pods = {n: mesh.agent_pod(n) for n in mesh.nodes}
    echo = subprocess.Popen(["ip", "netns", "exec", sb.pod_netns("rn", server), PY, PEERS, "echo-server",
                             str(ECHO_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clients: dict[str, subprocess.Popen[str]] = {}
    stop = tmp_path / "stop"
    try:
        time.sleep(1.0)
        for node in mesh.nodes:
            clients[node] = subprocess.Popen(
                ["ip", "netns", "exec", sb.pod_netns("rn", mesh.client(node)), PY, PEERS, "longlived", server_ip,
                 str(ECHO_PORT), server_ip, "1", "/", str(N_ECHO), str(N_BULK), "0", str(stop),
                 str(tmp_path / f"progress-{node}.json"), "0.05"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert wait_for(lambda: all(_progress(tmp_path / f"progress-{n}.json").get("echo", 0) > 10
                                    for n in mesh.nodes), 30), "no traffic"
        before = {n: _progress(tmp_path / f"progress-{n}.json") for n in mesh.nodes}
        started = time.monotonic()
        mesh.apply_install("agentWorkers=2")  # changes the DaemonSet's template only: a rolling update
        done = wait_for(mesh.rollout_done, 90.0, step=0.5)
        assert done is not None, f"the rollout did not finish:\n{mesh.mesh_logs()}"
        time.sleep(2.0)
        after = {n: _progress(tmp_path / f"progress-{n}.json") for n in mesh.nodes}
    finally:
        stop.write_text("stop")
        results = {}
        for node, proc in clients.items():
            out, err = proc.communicate(timeout=60)
            results[node] = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": err}
        echo.kill()
        echo.wait()
    handed: dict[str, list[str]] = {}
    for node in mesh.nodes:
        log = (Path(sb.state_dir) / "logs" / f"{MESH_NS}_{old_pods[node]}_agent.log").read_text(errors="replace")
        handed[node] = [ln.split("event=handover_done ")[1] for ln in log.splitlines() if "handover_done" in ln]
    print(f"rolling update took {time.monotonic() - started:.1f} s; old agent pods: {handed}; clients: {results}; "
          f"rounds before {before}, after the rollout {after}")
    for node, res in results.items():
        assert res.get("cut") == 0 and res.get("failed") == {}, (node, res)
        for kind in ("echo", "bulk"):
            assert res["rounds"][kind] > after[node].get(kind, 0) > before[node].get(kind, 0), (node, res, after)
    # Relayed on node1: both clients' outbound or inbound ones; on node2: its client's outbound ones.
    per_client = N_ECHO + N_BULK
    moved = {n: sum(int(dict(kv.split("=", 1) for kv in line.split())["tcp"]) for line in handed[n])
             for n in mesh.nodes}
    assert moved == {"node1": 2 * per_client, "node2": per_client}, handed
