"""Issue 11, item 8, and issue 12 item 1: whatever of the agent dies or hangs, new connections go direct fast.

On a real node `kill -9` of the agent failed 6 requests within ~1 s: the capture rules stayed (the
agent came back before the redirector's 2 s grace), so connections went to ports nobody served. Issue 12
wants at most 100 ms of failed connects, whatever dies, and a hung agent failed open within 1 s whatever
restarted. Here a client on the node sends 200 requests/s, each on a new connection, through the
Service `server`; then one of: every agent process (`agent`), the agent's parent only (`parent`), its
only worker (`worker`), the agent and then the redirector (`agent+redirector`), the redirector and then
the agent (`redirector+agent`) is killed with SIGKILL, or the agent hangs (SIGSTOP, `hung`; with the
redirector killed too, `hung+redirector`: a fresh redirector finds the rules and an agent that does not
answer) and is continued 6 s later. The kubelet restarts what died (1 s back-off). Both CNI styles.
Printed: the failed requests, the requests that succeeded only after a SYN retransmission (slow: a
connect dropped while no agent listened, redirector/heartbeat.py), the time from the first to the last
of those, the redirector's first events, and that the node is captured again (requests counted by the
agent) afterwards.

Bounds: 100 ms of failed connects (asserted with a margin, 350 ms, for a loaded 2-core machine) when
agent processes die, with or without the redirector: the kernel heartbeat fails the node open 0.7 s
after the agent's last beat, and connects to its ports in between are dropped and retried (1 s later,
direct), not reset. A hung agent is alive and its listeners take connections it never serves: those
fail until the heartbeat expires (0.7 s): asserted at most 1 s, the issue's bound.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from realnode_harness import MESH_NS, RealNode, realnode_mesh, series, wait_for

pytestmark = pytest.mark.root

RATE = 200.0
# Issue 12's bound is 100 ms of failed connects; the margin is for a loaded 2-core machine.
MAX_FAILING_S = {"agent": 0.35, "parent": 0.35, "worker": 0.35, "agent+redirector": 0.35,
                 "redirector+agent": 0.35,
                 # a hung agent's listeners accept what it never serves until its heartbeat expires
                 # (0.7 s of silence); the bound is 1 s
                 "hung": 1.0, "hung+redirector": 1.0}
SLOW_S = 0.5   # a request this slow waited for a SYN retransmission (1 s) or the hang


@pytest.fixture(scope="module", params=["bridge", "routed"])
def mesh(request: pytest.FixtureRequest) -> Iterator[RealNode]:
    """Two nodes of each CNI style, the mesh as pods (this module's own: issue 12 wants both styles)."""
    with realnode_mesh(nodes=2, cni=request.param) as m:
        yield m


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
    redirector = _container_pid(mesh, pod, "redirector")
    if what == "redirector+agent":
        os.killpg(redirector, signal.SIGKILL)
    if what in ("agent", "agent+redirector", "redirector+agent"):
        os.killpg(agent, signal.SIGKILL)  # the container's process group: the parent and its workers
    if what in ("hung", "hung+redirector"):
        os.killpg(agent, signal.SIGSTOP)
    if what in ("agent+redirector", "hung+redirector"):
        os.killpg(redirector, signal.SIGKILL)
    if what == "parent":
        os.kill(agent, signal.SIGKILL)
    if what == "worker":
        (worker,) = _children(agent)  # agentWorkers=1
        os.kill(worker, signal.SIGKILL)
    return agent


def _dropped_syns(mesh: RealNode, node: str) -> int:
    """Captured SYNs dropped because no agent listened (mangle NODEMESH_INPUT's DROP counter)."""
    backend = mesh.sb.node(node).iptables
    res = mesh.sb.node_exec(node, [f"iptables-{backend}", "-t", "mangle", "-nvxL", "NODEMESH_INPUT"],
                            capture_output=True, text=True, timeout=10)
    return sum(int(line.split()[0]) for line in res.stdout.splitlines() if " DROP " in line)


def _requests_counted(mesh: RealNode, node: str) -> float:
    return series(mesh.agent_metrics(node), "request_total", direction="outbound")


@pytest.mark.parametrize("what", ["agent", "parent", "worker", "agent+redirector", "redirector+agent",
                                  "hung", "hung+redirector"])
def test_realnode_agent_crash_fails_connects_for_at_most_100ms(mesh: RealNode, tmp_path: Path, what: str) -> None:
    node = "node1"
    assert wait_for(mesh.healthy, 60.0) is not None, "the mesh is not healthy before the crash"
    out = tmp_path / "load.jsonl"
    load = mesh.start_load(mesh.client(node), "http://server.rn/", out, rate=RATE, duration=12.0, timeout=3.0)
    try:
        assert wait_for(lambda: len(mesh.records(out)) > RATE * 2, 15.0) is not None, "the load did not start"
        dropped_before = _dropped_syns(mesh, node)
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
    slow = [r for r in after if r["ok"] and r["dt"] > SLOW_S]
    hit = failed + slow
    # Requests under way at the kill (started before it) die with the processes that carried them:
    # counted apart, they are not failed connects.
    in_flight = [r for r in records if r["t"] < killed and not r["ok"] and r["t"] + r["dt"] >= killed]
    span = (max(r["t"] for r in hit) - min(r["t"] for r in hit) + 1 / RATE) if hit else 0.0
    errors: dict[str, int] = {}
    for r in failed:
        errors[str(r.get("error"))] = errors.get(str(r.get("error")), 0) + 1
    first = min((r["t"] for r in hit), default=killed) - killed
    captured_again = wait_for(lambda: mesh.capture_hooked(node), 30.0)
    dropped = _dropped_syns(mesh, node) - dropped_before
    events = []
    for line in mesh.redirector_log(node).splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if float(fields.get("ts", 0)) >= killed - 0.05 and "event" in fields:
            events.append(f"+{(float(fields['ts']) - killed) * 1000:.0f}ms {fields['event']} {fields.get('reason', '')}")
    # Open loop at a fixed rate: each failed request stands for 1/RATE s during which connects failed.
    failing = len(failed) / RATE
    slowest = max((r["dt"] for r in slow), default=0.0)
    buckets: dict[int, list[int]] = {}
    for r in hit:   # per half second after it: failed/slow
        buckets.setdefault(int((r["t"] - killed) * 2), [0, 0])[0 if not r["ok"] else 1] += 1
    timeline = " ".join(f"+{k / 2:.1f}s:{f}/{s}" for k, (f, s) in sorted(buckets.items()))
    print(f"\n{mesh.cni} {what}: {len(failed)} of {len(after)} requests started after it failed ({errors}) = "
          f"{failing * 1000:.0f} ms of failed connects; {len(slow)} slow (up to {slowest * 1000:.0f} ms; "
          f"{dropped} SYNs dropped for want of a listener); "
          f"failed or slow from +{first * 1000:.0f} ms over {span * 1000:.0f} ms; "
          f"{len(in_flight)} in flight lost; capture back: {captured_again is not None}; redirector: {events[:4]}; "
          f"failed/slow per 0.5 s: {timeline}")
    assert failing <= MAX_FAILING_S[what], f"{failing * 1000:.0f} ms of failed connects after {what}"
    assert wait_for(mesh.healthy, 60.0) is not None, f"the mesh did not recover:\n{mesh.mesh_logs()}"
    # Captured again for real (the heartbeat beats, the hook is in): the agent counts new requests.
    before = _requests_counted(mesh, node)
    assert wait_for(lambda: mesh.fetch(mesh.client(node), "http://server.rn/")[0]
                    and _requests_counted(mesh, node) > before, 30.0) is not None, \
        f"the node is not captured again after {what}:\n{mesh.mesh_logs()}"
