"""Issue 11, item 7: a rolling update of the agent DaemonSet leaves no capture gap.

With `maxSurge: 1` the new agent pod runs beside the old one; once it is Ready the old pod gets
SIGTERM, and its redirector removed the capture rules both redirectors share. The new one put them
back a second later (`capture_restored reason=rules_missing`): a second of uncaptured, unobserved
traffic per node per upgrade (and the return path of the new agent's in-flight connections went
with them).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from realnode_harness import MESH_NS, RealNode, wait_for

pytestmark = pytest.mark.root

POLL_S = 0.1


class HookWatch:
    """Samples every node's capture hook; the longest run of samples without it, per node."""

    def __init__(self, mesh: RealNode) -> None:
        self.mesh = mesh
        self.samples: dict[str, list[tuple[float, bool]]] = {n: [] for n in mesh.nodes}
        self.unreadable = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for node in self.mesh.nodes:
                state = self.mesh.capture_state(node)
                if state is None:
                    self.unreadable += 1  # a failed read says nothing either way
                else:
                    self.samples[node].append((time.monotonic(), state))
            self.stop.wait(POLL_S)

    def gaps(self, node: str) -> list[float]:
        out, since = [], None
        for t, hooked in self.samples[node]:
            if not hooked and since is None:
                since = t
            elif hooked and since is not None:
                out.append(t - since)
                since = None
        if since is not None:
            out.append(self.samples[node][-1][0] - since)
        return out


def test_realnode_rolling_update_leaves_no_capture_gap(mesh: RealNode, tmp_path: Path) -> None:
    assert mesh.healthy()
    old_pods = {n: mesh.agent_pod(n) for n in mesh.nodes}
    loads = [(node, tmp_path / f"load-{node}.jsonl") for node in mesh.nodes]
    procs = [mesh.start_load(mesh.client(node), "http://server.rn/", out, rate=50.0, duration=40.0)
             for node, out in loads]
    watch = HookWatch(mesh)
    try:
        watch.thread.start()
        time.sleep(2.0)
        started = time.monotonic()
        mesh.apply_install("agentWorkers=2")  # changes the DaemonSet's template only
        done = wait_for(mesh.rollout_done, 90.0, step=0.5)
        time.sleep(2.0)
    finally:
        watch.stop.set()
        watch.thread.join(10)
        for proc in procs:
            proc.kill()
            proc.wait()
    assert done is not None, f"the rollout did not finish:\n{mesh.mesh_logs()}"
    failed = {node: [r for r in mesh.records(out) if not r["ok"]] for node, out in loads}
    sent = {node: len(mesh.records(out)) for node, out in loads}
    for node in mesh.nodes:
        gaps = watch.gaps(node)
        new_log = mesh.redirector_log(node)
        old_log = (Path(mesh.sb.state_dir) / "logs" / f"{MESH_NS}_{old_pods[node]}_redirector.log").read_text()
        restored = new_log.count("event=capture_restored")
        handover = [ln for ln in old_log.splitlines() if "shutdown" in ln or "handed_over" in ln]
        new_pod = mesh.agent_pod(node)
        new_events = [ln.split("event=")[1] for ln in
                      (mesh.log(MESH_NS, new_pod, "fail-open") + new_log).splitlines() if "event=" in ln]
        print(f"{node}: rollout {done:.1f} s after {time.monotonic() - started - done:.1f}; capture gaps "
              f"{[round(g, 2) for g in gaps]} s ({len(watch.samples[node])} samples every {POLL_S} s, "
              f"{watch.unreadable} unreadable); new "
              f"redirector capture_restored x{restored}; old redirector: {handover}; new pod: {new_events[:4]}; "
              f"client-{node}: "
              f"{len(failed[node])} failed of {sent[node]}")
    for node in mesh.nodes:
        assert not watch.gaps(node), f"{node}: capture was gone for {watch.gaps(node)} s during the rollout"
        assert "event=capture_restored" not in mesh.redirector_log(node), \
            f"{node}: the old redirector removed the new one's rules"
    assert not any(failed.values()), f"requests failed during the rollout: {failed}"
