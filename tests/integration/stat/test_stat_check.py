"""Issue 4, must-show 4: `nodemesh check` on the real sandbox.

Passes (exit 0, every step ✓) on a healthy meshed 2-node sandbox; with node2's agent stopped it
exits 1 and its × line names node2 with a hint; after the agent is started again (same argv as
`install --sandbox` gave it) it passes again.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from nodemesh.manifests.sandbox_install import agent_process
from stat_harness import Mesh, meshed_sandbox, wait_until

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with meshed_sandbox() as m:
        yield m


def marks(stdout: str) -> tuple[list[str], list[str]]:
    lines = stdout.splitlines()
    return [ln for ln in lines if ln.startswith("✓")], [ln for ln in lines if ln.startswith("×")]


def healthy(mesh: Mesh) -> bool:
    res = mesh.cli("check")
    ok, bad = marks(res.stdout)
    return res.returncode == 0 and len(ok) >= 5 and not bad


def test_stat_check_names_the_stopped_agent(mesh: Mesh) -> None:
    res = mesh.cli("check")
    ok, bad = marks(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    # controller, agents, capture, the capture mode of each of the 2 nodes, the stat backend,
    # versions, clock skew
    assert not bad and len(ok) == 8, res.stdout
    assert "\u2713 stat backend memory" in ok, res.stdout
    assert "controller reachable" in ok[0]
    assert [ln for ln in ok if "capture mode iptables" in ln] == [ok[3], ok[4]], res.stdout

    node = "node2"
    name = agent_process(node)
    argv = mesh.sb.status()["node_processes"][name]["argv"]
    env = mesh.sb.status()["node_processes"][name].get("env") or {}
    mesh.sb.stop_node_process(node, name, timeout=40.0)
    try:
        broken: dict[str, object] = {}

        def reports_node2() -> bool:
            res = mesh.cli("check")
            broken["res"] = res
            return res.returncode == 1 and any(ln.startswith("×") for ln in res.stdout.splitlines())

        wait_until(reports_node2, 30, "check to notice the stopped agent")
        res = broken["res"]
        print(res.stdout)
        lines = res.stdout.splitlines()
        agent_step = next(i for i, ln in enumerate(lines) if "agent" in ln and ln[:1] in "✓×")
        assert lines[agent_step].startswith("×"), res.stdout
        # The lines under the × name node2 (and not node1), then the hint.
        detail: list[str] = []
        for ln in lines[agent_step + 1:]:
            if not ln.startswith("    "):
                break
            detail.append(ln.strip())
        assert any(d.startswith(f"{node}:") for d in detail), res.stdout
        assert not any(d.startswith("node1:") for d in detail), res.stdout
        assert any(d.startswith("hint:") for d in detail), res.stdout
        assert lines[-1].endswith("×"), res.stdout
        assert "Traceback" not in res.stdout + res.stderr
    finally:
        mesh.sb.start_node_process(node, name, argv, env=env)
    # The redirector puts capture back once the agent is ready again; check turns green.
    wait_until(lambda: healthy(mesh), 60, "check to pass again after the agent restart", interval=0.5)
