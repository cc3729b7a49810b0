"""Issue 11, item 8 (and issue 12's crash rows): `kill -9` of the agent fails as few requests as possible.

On a real node `kill -9` of the agent failed 6 requests within ~1 s: the capture rules stayed (the
agent came back before the redirector's 2 s grace), so connections went to ports nobody served. Issue 12
wants at most 100 ms of failed connects, whatever dies. Here a client on the node sends 200 requests/s,
each on a new connection, through the Service `server`; then one of: every agent process (`agent`),
the agent's parent only (`parent`), its only worker (`worker`), the agent and the redirector together
(`agent+redirector`) is killed with SIGKILL, or the agent hangs (SIGSTOP, `hung`; with the redirector
killed too, `hung+redirector`). The kubelet restarts what died (1 s back-off). Printed: the failed
requests and the time from the first to the last failure.

Bounds: 100 ms (asserted with a margin, 350 ms, for a loaded 2-core machine) when an agent process
dies. When the redirector dies with it, only its restart can take the rules out: the kubelet's back-off
plus its start. A hung agent is not dead: it is failed open after the redirector's grace (2 s).
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
MAX_FAILING_S = {"agent": 0.35, "parent": 0.35, "worker": 0.35,
                 # the kubelet's restart back-off (1 s here) + the redirector's start
                 "agent+redirector": 3.0,
                 # the redirector's grace (2 s) + a poll and its timeout, and its restart for the second
                 "hung": 3.5, "hung+redirector": 5.0}


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


def _kill(mesh: RealNode, node: str, what: str) -> int:
    """Do it; returns the agent's process group (to SIGCONT a hung one)."""
    pod = mesh.agent_pod(node)
    agent = _container_pid(mesh, pod, "agent")
    if what in ("agent", "agent+redirector"):
        os.killpg(agent, signal.SIGKILL)  # the container's process group: the parent and its workers
    if what in ("hung", "hung+redirector"):
        os.killpg(agent, signal.SIGSTOP)
    if what in ("agent+redirector", "hung+redirector"):
        os.killpg(_container_pid(mesh, pod, "redirector"), signal.SIGKILL)
    if what == "parent":
        os.kill(agent, signal.SIGKILL)
    if what == "worker":
        (worker,) = _children(agent)  # agentWorkers=1
        os.kill(worker, signal.SIGKILL)
    return agent


@pytest.mark.parametrize("what", ["agent", "parent", "worker", "agent+redirector", "hung", "hung+redirector"])
def test_realnode_agent_crash_fails_connects_for_at_most_100ms(mesh: RealNode, tmp_path: Path, what: str) -> None:
    node = "node1"
    assert wait_for(mesh.healthy, 60.0) is not None, "the mesh is not healthy before the crash"
    out = tmp_path / "load.jsonl"
    load = mesh.start_load(mesh.client(node), "http://server.rn/", out, rate=RATE, duration=12.0, timeout=3.0)
    try:
        assert wait_for(lambda: len(mesh.records(out)) > RATE * 2, 15.0) is not None, "the load did not start"
        killed = time.time()
        group = _kill(mesh, node, what)
        if what.startswith("hung"):
            time.sleep(6.0)
            os.killpg(group, signal.SIGCONT)
        load.wait(timeout=60)
    finally:
        load.kill()
        load.wait()
    records = mesh.records(out)
    after = [r for r in records if r["t"] >= killed]
    failed = [r for r in after if not r["ok"]]
    # Requests under way at the kill (started before it) die with the processes that carried them:
    # counted apart, they are not failed connects.
    in_flight = [r for r in records if r["t"] < killed and not r["ok"] and r["t"] + r["dt"] >= killed]
    span = (max(r["t"] for r in failed) - min(r["t"] for r in failed) + 1 / RATE) if failed else 0.0
    errors: dict[str, int] = {}
    for r in failed:
        errors[str(r.get("error"))] = errors.get(str(r.get("error")), 0) + 1
    first = min((r["t"] for r in failed), default=killed) - killed
    captured_again = wait_for(lambda: mesh.capture_hooked(node), 30.0)
    events = []
    for line in mesh.redirector_log(node).splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if float(fields.get("ts", 0)) >= killed - 0.05 and "event" in fields:
            events.append(f"+{(float(fields['ts']) - killed) * 1000:.0f}ms {fields['event']} {fields.get('reason', '')}")
    # Open loop at a fixed rate: each failed request stands for 1/RATE s during which connects failed.
    failing = len(failed) / RATE
    print(f"\n{what}: {len(failed)} of {len(after)} requests started after it failed ({errors}) = "
          f"{failing * 1000:.0f} ms of failed connects, first to last {span * 1000:.0f} ms from +{first * 1000:.0f} ms; "
          f"{len(in_flight)} in flight lost; capture back: {captured_again is not None}; redirector: {events[:4]}")
    assert failing <= MAX_FAILING_S[what], f"{failing * 1000:.0f} ms of failed connects after {what}"
    assert wait_for(mesh.healthy, 60.0) is not None, f"the mesh did not recover:\n{mesh.mesh_logs()}"
