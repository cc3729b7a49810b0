"""Issue 11, item 8 (and issue 12's crash rows): `kill -9` of the agent fails as few requests as possible.

On a real node `kill -9` of the agent failed 6 requests within ~1 s: the capture rules stayed (the
agent came back before the redirector's 2 s grace), so connections went to ports nobody served. Issue 12
wants at most 100 ms of failed connects, whatever dies. Here a client on the node sends 200 requests/s,
each on a new connection, through the Service `server`; then one of: every agent process (`agent`),
the agent's parent only (`parent`), its only worker (`worker`), the agent and the redirector together
(`agent+redirector`) is killed with SIGKILL. The kubelet restarts what died (1 s back-off). Printed:
the failed requests and the time from the first to the last failure.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from realnode_harness import MESH_NS, RealNode, wait_for

pytestmark = pytest.mark.root

RATE = 200.0
# Issue 12's bound is 100 ms of failed connects; the margin is for a loaded 2-core machine.
MAX_FAILING_S = 0.35


def _container_pid(mesh: RealNode, pod: str, container: str) -> int:
    from nodemesh.sandbox.state import read_json

    uid = mesh.sb.pod(MESH_NS, pod)["metadata"]["uid"]
    pid = read_json(Path(mesh.sb.state_dir) / "runtime.json", {})["pids"].get(f"pod/{uid}/{container}")
    assert pid, f"{pod}/{container} is not running"
    return int(pid)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _kill(mesh: RealNode, node: str, what: str) -> None:
    pod = mesh.agent_pod(node)
    agent = _container_pid(mesh, pod, "agent")
    if what in ("agent", "agent+redirector"):
        os.killpg(agent, signal.SIGKILL)  # the container's process group: the parent and its workers
    if what == "agent+redirector":
        os.killpg(_container_pid(mesh, pod, "redirector"), signal.SIGKILL)
    if what == "parent":
        os.kill(agent, signal.SIGKILL)
    if what == "worker":
        (worker,) = _children(agent)  # agentWorkers=1
        os.kill(worker, signal.SIGKILL)


@pytest.mark.parametrize("what", ["agent", "parent", "worker", "agent+redirector"])
def test_realnode_agent_crash_fails_connects_for_at_most_100ms(mesh: RealNode, tmp_path: Path, what: str) -> None:
    node = "node1"
    assert wait_for(mesh.healthy, 60.0) is not None, "the mesh is not healthy before the crash"
    out = tmp_path / "load.jsonl"
    load = mesh.start_load(mesh.client(node), "http://server.rn/", out, rate=RATE, duration=12.0, timeout=3.0)
    try:
        assert wait_for(lambda: len(mesh.records(out)) > RATE * 2, 15.0) is not None, "the load did not start"
        killed = time.time()
        _kill(mesh, node, what)
        load.wait(timeout=60)
    finally:
        load.kill()
        load.wait()
    records = mesh.records(out)
    after = [r for r in records if r["t"] >= killed - 0.5]
    failed = [r for r in after if not r["ok"]]
    span = (max(r["t"] for r in failed) - min(r["t"] for r in failed) + 1 / RATE) if failed else 0.0
    errors: dict[str, int] = {}
    for r in failed:
        errors[str(r.get("error"))] = errors.get(str(r.get("error")), 0) + 1
    first = min((r["t"] for r in failed), default=killed) - killed
    captured_again = wait_for(lambda: mesh.capture_hooked(node), 30.0)
    print(f"\nkill -9 {what}: {len(failed)} of {len(after)} requests failed ({errors}), failing for {span * 1000:.0f} ms "
          f"starting {first * 1000:.0f} ms after the kill; capture back: {captured_again is not None}")
    assert span <= MAX_FAILING_S, f"connects failed for {span * 1000:.0f} ms after kill -9 {what}"
    assert wait_for(mesh.healthy, 60.0) is not None, f"the mesh did not recover:\n{mesh.mesh_logs()}"
