"""Issue 14 item 3: with eBPF capture, `kill -9` of every agent process fails the node open at once.

The connect4 program redirects a pod's connect only while an agent listening socket is in its
sockmap; the kernel removes a socket from every sockmap as it closes, so the next connect after the
last agent process is gone goes direct — no redirector, heartbeat or grace involved. Here a client pod
sends 200 requests/s, each on a new connection, through the Service `nginx` (the server on the other
node: the client's node is the one whose agent dies); then every agent process of the client's node
(`agent`), or those and its redirector (`agent+redirector`: nobody of ours left on the node) get
SIGKILL. The sandbox restarts them (1 s back-off).

Printed: the gap from the kill to the first new connection established (then served) after it, and
to the first answer,
the failed requests that started after the kill (and their errors), the requests in flight at the
kill (they die with the processes that carried them: not failed connects), and that the node is
captured again afterwards (the agent counts requests again). Asserted: the issue's 100 ms for new
connections, with a margin for a loaded 2-core machine (350 ms, as the iptables crash test), and no
failure past that window. Measured with other work on the machine.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mesh_harness import NS, Mesh, mesh_cluster, parse_counters
from nodemesh.manifests.sandbox_install import agent_process, redirector_process
from nodemesh.redirector import sockmap
from nodemesh.sandbox import cgroups

pytestmark = pytest.mark.root

RATE = 200.0
MAX_GAP_S = 0.35     # the 100 ms, with a margin for a loaded 2-core machine
LOAD = Path(__file__).resolve().parents[1] / "realnode" / "realnode_load.py"


@pytest.fixture(scope="module", params=["ebpf", "ebpf-sockmap"])
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """eBPF capture, and the same with sockmap acceleration: a killed agent's accelerated sockets
    leave the sockhash with it, and fail-open stays the capture's (issue 14 item 2)."""
    _capture, _, accelerate = request.param.partition("-")
    with mesh_cluster("bridge", tmp_path_factory.mktemp(f"failopen-{request.param}"), "ebpf",
                      accelerate or "none") as m:
        yield m


def _records(out: Path) -> list[dict[str, Any]]:
    import json

    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def _start_load(mesh: Mesh, client_name: str, node: str, url: str, out: Path, duration: float) -> subprocess.Popen[bytes]:
    pod = mesh.sb.pod(NS, client_name)
    argv = ["ip", "netns", "exec", mesh.sb.pod_netns(NS, client_name), sys.executable, str(LOAD),
            "--url", url, "--rate", str(RATE), "--duration", str(duration), "--timeout", "3", "--out", str(out)]
    # In the pod's cgroup, as the pod's own processes are: that is where capture is attached.
    argv = cgroups.join_argv(cgroups.pod_cgroup(mesh.sb.name, node, pod["metadata"]["uid"]), argv)
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _outbound_requests(mesh: Mesh, node: str) -> float:
    return float(sum(v for (_n, name, labels), v in parse_counters(mesh.scrape(node), node).items()
                     if name == "request_total" and labels[0] == "outbound"))


def _wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("what", ["agent", "agent+redirector"])
def test_mesh_ebpf_kill_agent_new_connections_go_direct_within_100ms(mesh: Mesh, tmp_path: Path, what: str) -> None:
    server = mesh.server("nginx")
    client = mesh.client_near(server, False)
    node = client.node
    assert _wait(lambda: _outbound_requests(mesh, node) >= 0 and mesh.sb.node_process_pid(agent_process(node)), 30)
    out = tmp_path / "load.jsonl"
    counted_before = _outbound_requests(mesh, node)
    load = _start_load(mesh, client.name, node, f"http://nginx.{NS}/ok", out, duration=12.0)
    try:
        assert _wait(lambda: len(_records(out)) > RATE * 2, 20.0), "the load did not start"
        # (workers report about every second)
        assert _wait(lambda: _outbound_requests(mesh, node) > counted_before, 5.0), \
            "requests were not captured before the kill"
        agent = mesh.sb.node_process_pid(agent_process(node))
        redirector = mesh.sb.node_process_pid(redirector_process(node))
        assert agent and redirector
        killed = time.time()
        os.killpg(agent, signal.SIGKILL)          # the parent and its workers (one process group)
        if what == "agent+redirector":
            os.killpg(redirector, signal.SIGKILL)
        load.wait(timeout=60)
    finally:
        load.kill()
        load.wait()
    records = _records(out)
    after = sorted((r for r in records if r["t"] >= killed), key=lambda r: r["t"])
    failed = [r for r in after if not r["ok"]]
    in_flight = [r for r in records if r["t"] < killed and not r["ok"] and r["t"] + r["dt"] >= killed]
    first_ok = next((r for r in after if r["ok"]), None)
    assert first_ok is not None, ("no request succeeded after the kill", len(after), after[:3])
    # The measure: kill -> the first new connection that was established and then served.
    gap = min(r["t"] + r["tc"] - killed for r in after if r["ok"])
    answered = first_ok["t"] + first_ok["dt"] - killed
    window = max((r["t"] - killed for r in failed), default=0.0)
    errors: dict[str, int] = {}
    for r in failed:
        errors[str(r.get("error"))] = errors.get(str(r.get("error")), 0) + 1
    # The node is captured again once the restarted agent is ready and registered.
    counted = _outbound_requests(mesh, node) if _wait(lambda: mesh.scrape(node), 30) else 0.0
    log = mesh.sb.node_process_log(node, redirector_process(node)).read_text(errors="replace")
    print(f"\nebpf{'+sockmap' if mesh.accelerate == 'sockmap' else ''} kill -9 {what} on {node}: gap kill -> first successful new connection {gap * 1000:.1f} ms "
          f"(first answered {answered * 1000:.1f} ms after the kill; first attempt {(after[0]['t'] - killed) * 1000:.1f} ms); "
          f"failed after the kill {len(failed)} of {len(after)} (last started {window * 1000:.1f} ms after the kill; "
          f"errors {errors}); in flight at the kill and failed {len(in_flight)}")
    print("redirector:", [ln.split(" component=redirector ")[-1][:120] for ln in log.splitlines()
                          if re.search(r"event=(capture_|started)", ln)][-6:])
    # The load generator is one process on a loaded machine: when it stalls right after the kill
    # (the kubelet restarting the mesh), nothing is attempted for a while. What the kernel owes is
    # that the attempts made succeed: measured from the first attempt after the kill.
    stall = after[0]["t"] - killed
    assert gap - stall <= MAX_GAP_S, f"new connections succeeded only {gap:.3f}s after the kill ({stall:.3f}s stall)"
    assert window <= MAX_GAP_S, f"requests started {window:.3f}s after the kill still failed: {failed[-5:]}"
    # Capture comes back with the restarted agent: new requests are counted again.
    client2 = tmp_path / "after.jsonl"
    assert _wait(lambda: mesh.sb.node_process_pid(agent_process(node)), 30)
    before_after = _outbound_requests(mesh, node) if counted else 0.0

    def captured_again() -> bool:
        p = _start_load(mesh, client.name, node, f"http://nginx.{NS}/ok", client2, duration=0.5)
        p.wait(timeout=30)
        return _outbound_requests(mesh, node) > before_after

    assert _wait(captured_again, 40.0), "the node was not captured again after the agent restarted"


def test_mesh_ebpf_uninstall_leaves_no_program_map_or_pin(mesh: Mesh) -> None:
    """`nodemesh uninstall --sandbox`: every node's pins gone, no program attached to any pod cgroup,
    and the programs and maps that were attached freed by the kernel. (Runs last in this module.)"""
    import json as _json

    from nodemesh.manifests.sandbox_install import uninstall_sandbox

    def bpftool(*args: str) -> Any:
        res = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=False)
        return _json.loads(res.stdout) if res.returncode == 0 and res.stdout.strip() else None

    pod_dirs = [Path(d) for n in mesh.nodes for d in cgroups.node_cgroup(mesh.sb.name, n).glob("pod*")]
    # sockmap acceleration attaches once at the node's directory (the agent's and the pods' parent).
    pod_dirs += [cgroups.node_cgroup(mesh.sb.name, n) for n in mesh.nodes]
    attached = [p for d in pod_dirs for p in bpftool("cgroup", "show", str(d)) or []]
    prog_ids = {p["id"] for p in attached}
    assert prog_ids, "no program attached before the uninstall"
    if mesh.accelerate == "sockmap":
        assert "nm_accel_sockops" in {p["name"] for p in attached}, attached
    map_ids = {m for pid in prog_ids for m in (bpftool("prog", "show", "id", str(pid)) or {}).get("map_ids", [])}
    uninstall_sandbox(mesh.sb.name, progress=lambda _m: None)
    for n in mesh.nodes:
        assert not os.path.exists(cgroups.node_bpf_dir(mesh.sb.name, n)), n
        assert not os.path.exists(sockmap.accel_dir(cgroups.node_bpf_dir(mesh.sb.name, n))), n
    assert not [(d, bpftool("cgroup", "show", str(d))) for d in pod_dirs if bpftool("cgroup", "show", str(d))]
    deadline = time.monotonic() + 10
    while True:
        left = ({p["id"] for p in bpftool("prog", "show") or []} & prog_ids,
                {m["id"] for m in bpftool("map", "show") or []} & map_ids)
        if not any(left) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not any(left), left
