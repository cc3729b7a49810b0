"""Issue 3, "In the sandbox": `nodemesh install --sandbox --name X` and `nodemesh uninstall --sandbox
--name X` are idempotent (each run twice), the app keeps working across all four (client loops in
pods, a fresh HTTP/1.1 connection per request, same node and cross node, see zero failures), the
mesh really carries the traffic while installed, and every mesh process logs under the sandbox's
state directory. Uninstall leaves each node's netfilter and policy routing as they were.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mesh_harness import KEY_LABELS, NS, PEERS, PY, Mesh, manifests, write_nginx
from nodemesh.manifests.sandbox_install import CONTROLLER_PROCESS, agent_process, redirector_process
from nodemesh.redirector.apply import strip_save
from nodemesh.sandbox.cluster import Sandbox
from nodemesh.sandbox.testing import running_sandbox

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sandbox, Path]]:
    workdir = tmp_path_factory.mktemp("mesh-install")
    conf = write_nginx(workdir)
    with running_sandbox(nodes=2, cni="bridge", manifests=[manifests(conf, servers=("nginx", "grpc"))], timeout=60,
                         backoff=(1.0, 5.0)) as sb:
        try:
            yield sb, workdir
        finally:
            nodemesh(sb, "uninstall")  # whatever state a failure left, nothing of ours survives


def nodemesh(sb: Sandbox, verb: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "nodemesh", verb, "--sandbox", "--name", sb.name], check=False,
                          capture_output=True, text=True, timeout=120)


def net_snapshot(sb: Sandbox, node: str) -> str:
    parts = []
    for cmd in (["iptables-save"], ["ip", "-4", "rule"], ["ip", "-4", "route", "show", "table", "all"],
                ["ebtables-save"]):
        out = sb.node_exec(node, cmd, capture_output=True, text=True, check=True).stdout
        parts.append(f"## {' '.join(cmd)}\n{strip_save(out)}")
    return "\n".join(parts)


def mesh_pids(sb: Sandbox) -> dict[str, tuple[int | None, int]]:
    return {name: (p["pid"], p["restarts"]) for name, p in sb.status()["node_processes"].items()}


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.1)


def mesh_logs(sb: Sandbox) -> str:
    return "\n".join(f"===== {f.name}\n{f.read_text(errors='replace')[-4000:]}"
                     for f in sorted((sb.state_dir / "logs").glob("node_*.log")))


class Loop:
    """`mesh_peers.py http-loop` running in a client pod until told to stop."""

    def __init__(self, sb: Sandbox, pod: str, url: str, workdir: Path, reuse: bool = False) -> None:
        tag = f"{pod}-{'reuse' if reuse else 'fresh'}"
        self.stop_file = workdir / f"stop-{tag}"
        self.progress_file = workdir / f"progress-{tag}"
        self.proc = subprocess.Popen(["ip", "netns", "exec", sb.pod_netns(NS, pod), PY, PEERS, "http-loop", url,
                                      str(self.stop_file), str(self.progress_file), *(["reuse"] if reuse else [])],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def progress(self) -> int:
        try:
            return int(self.progress_file.read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return 0

    def advance(self, n: int = 20, timeout: float = 15.0) -> None:
        """Wait until n more requests completed (the app is being exercised right now)."""
        start = self.progress()
        wait(lambda: self.progress() >= start + n or self.proc.poll() is not None, timeout, "loop progress")
        assert self.proc.poll() is None, self.proc.communicate()

    def finish(self) -> dict[str, object]:
        self.stop_file.touch()
        try:
            out, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        assert self.proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])


def test_mesh_install_uninstall_idempotent_app_keeps_working(app: tuple[Sandbox, Path]) -> None:
    sb, workdir = app
    nodes = [n.name for n in sb.nodes()]
    before = {n: net_snapshot(sb, n) for n in nodes}
    loops: list[Loop] = []
    marks: list[tuple[float, str]] = []  # when each step ran: failures carry their time, to place them
    try:
        # One caller on nginx's node, one on the other; both dial the Service by name with a fresh
        # connection per request.
        clients = [p["metadata"]["name"] for p in sb.pods(NS) if p["metadata"]["labels"]["app"] == "client"]
        for pod in clients:
            loops.append(Loop(sb, pod, "http://nginx/ok", workdir))
        for loop in loops:
            loop.advance()

        marks.append((time.time(), "install 1"))
        first = nodemesh(sb, "install")
        marks.append((time.time(), "installed 1"))
        assert first.returncode == 0, first.stderr
        # Now meshed: each caller also opens one long-lived keep-alive connection, which goes through
        # the agents; at uninstall they must drain it (`Connection: close` on its next request).
        for pod in clients:
            loops.append(Loop(sb, pod, "http://nginx/ok", workdir, reuse=True))
        installed = mesh_pids(sb)
        expected = {CONTROLLER_PROCESS, *(agent_process(n) for n in nodes), *(redirector_process(n) for n in nodes)}
        assert set(installed) == expected and all(pid for pid, _ in installed.values()), installed
        for loop in loops:
            loop.advance()

        marks.append((time.time(), "install 2"))
        second = nodemesh(sb, "install")  # a no-op: same processes, not restarted; capture hooked once
        assert second.returncode == 0, second.stderr
        assert mesh_pids(sb) == installed
        for node in nodes:
            save = sb.node_exec(node, ["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
            hooks = [ln for ln in save.splitlines() if ln.startswith("-A PREROUTING ") and "-j NODEMESH_" in ln]
            assert len(hooks) == 1, save

        # The mesh carries the loops' requests: both agents count them (outbound on each caller's node).
        mesh = Mesh(sb, workdir, "bridge")

        def outbound_requests() -> dict[str, int]:
            seen: dict[str, int] = {}
            for (node, name, values), v in mesh.counters().items():
                labels = dict(zip(KEY_LABELS, values))
                if name == "request_total" and labels["direction"] == "outbound" and labels["dst_name"] == "nginx" \
                        and labels["dst_service"] == "nginx.mesh" and labels["protocol"] == "http1":
                    seen[node] = seen.get(node, 0) + v
            return seen

        wait(lambda: set(outbound_requests()) == set(nodes), 15, "loop requests counted on both agents")
        # The keep-alive connections are meshed: held open by the caller's agent (gauges arrive ~1 s late).
        wait(lambda: {labels[3] for (_n, _m, labels) in mesh.open_connections() if labels[0] == "outbound"}
             == set(clients), 15, "keep-alive connections held by the agents")

        # A long gRPC server stream (10 s) through the mesh, in flight while the mesh goes away: the
        # agents drain it (HTTP/2 GOAWAY, the stream runs to its end) before they exit.
        stream = subprocess.Popen(["ip", "netns", "exec", sb.pod_netns(NS, clients[0]), PY, PEERS, "grpc-stream",
                                   "grpc:9090", "100", "100"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        wait(lambda: any(labels[5] == "grpc" for (_n, _m, labels) in mesh.open_connections()), 15,
             "the gRPC stream is open through the mesh")
        for attempt in ("first", "second"):  # the second finds nothing to do and succeeds
            marks.append((time.time(), f"uninstall {attempt}"))
            res = nodemesh(sb, "uninstall")
            marks.append((time.time(), f"uninstalled {attempt}"))
            assert res.returncode == 0, (attempt, res.stderr)
            assert sb.status()["node_processes"] == {}, attempt
            assert all(sb.node_process_pid(name) is None for name in installed), attempt
            for loop in loops:
                loop.advance()
        out, err = stream.communicate(timeout=60)
        assert stream.returncode == 0, err
        streamed = json.loads(out.strip().splitlines()[-1])
        assert streamed["messages"] == 100 and streamed["intact"], streamed
    finally:
        results = [loop.finish() for loop in loops]
        if "stream" in locals() and stream.poll() is None:
            stream.kill()
            stream.wait()

    for loop, result in zip(loops, results):
        # A failure carries its time; `marks` and the mesh logs place it in the install/uninstall story.
        assert result["failures"] == [], (loop.progress_file.name, result, marks, mesh_logs(sb))
    assert all(int(r["ok"]) >= 100 for r in results), results  # type: ignore[call-overload]
    for node in nodes:
        assert net_snapshot(sb, node) == before[node], f"{node}: capture not removed exactly"

    # Logs per process under the sandbox state dir, each telling its part of the story.
    logs = {name: sb.node_process_log(node, name)
            for name, node in [(CONTROLLER_PROCESS, nodes[0])]
            + [(agent_process(n), n) for n in nodes] + [(redirector_process(n), n) for n in nodes]}
    for name, path in logs.items():  # the controller logs at warning by default: its file may be empty
        assert path.is_relative_to(sb.state_dir) and path.exists(), (name, path)
    for n in nodes:
        agent_log = logs[agent_process(n)].read_text()
        assert agent_log.count("event=agent_ready") == 1, agent_log  # started once across both installs
        assert "event=drain_done aborted=0" in agent_log, agent_log  # drained, not killed
        redirector_log = logs[redirector_process(n)].read_text()
        assert redirector_log.count("event=capture_installed") == 1, redirector_log
        # Capture hooks first, return path last: what keeps in-flight requests alive at uninstall.
        assert redirector_log.index("event=capture_draining reason=shutdown") < \
            redirector_log.index("event=capture_uninstalled reason=shutdown"), redirector_log
        assert "Traceback" not in agent_log + redirector_log
    drained_s = [float(m) for n in nodes
                 for m in re.findall(r"event=drain_done aborted=0 seconds=([\d.]+)",
                                     logs[agent_process(n)].read_text())]
    assert max(drained_s) > 1.0, drained_s  # the stream was still running at drain, and finished
    print(f"install/uninstall loops ok={[r['ok'] for r in results]} failures=0 stream={streamed} "
          f"drained_s={drained_s}")
