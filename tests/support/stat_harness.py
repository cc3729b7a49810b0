"""Helpers of the stat room's end-to-end tests: a meshed 2-node sandbox with a known traffic mix,
the real `nodemesh` CLI as a subprocess, and the arithmetic that turns the clients' own records
into what `stat` must report.

Pod programs (run by the sandbox's kubelet or exec'd into client pods): `stat_httpserver.py`,
`stat_grpcserver.py`, `stat_loadgen.py` beside this file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.api.model import LATENCY_BUCKETS_MS
from nodemesh.cli.client import controller_channel
from nodemesh.manifests.sandbox_install import CONTROLLER_PROCESS, TOKEN_FILE, install_sandbox
from nodemesh.manifests.sandboxfiles import sandbox_ca
from nodemesh.sandbox.cluster import Sandbox
from nodemesh.sandbox.proctools import alive
from nodemesh.sandbox.testing import TapStream, deployment, running_sandbox, service

HERE = Path(__file__).resolve().parents[1] / "integration" / "stat"  # its servers and load generator
HTTP_SERVER = HERE / "stat_httpserver.py"
GRPC_SERVER = HERE / "stat_grpcserver.py"
LOADGEN = HERE / "stat_loadgen.py"
NS = "statns"

Record = dict[str, Any]


# ---------------------------------------------------------------------------- manifests
def _deployment(name: str, replicas: int, argv: list[str], port: int | None) -> str:
    return deployment(name, NS, argv, ports=[("main", port)] if port else [], replicas=replicas,
                      pod_name_env=True)


def _service(name: str, port: int) -> str:
    return service(name, NS, [(port, "main")])


def traffic_manifest() -> str:
    """server (2 replicas, one per node) and echo: the HTTP mix server; grpcsrv: the gRPC pair's
    server; client1/client2: idle pods the tests exec load generators in. Readiness is the default
    TCP connect, so the kubelet's probes send no HTTP request that would count in `stat`."""
    py = sys.executable
    docs = [
        f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n",
        _deployment("server", 2, [py, str(HTTP_SERVER)], 8080), _service("server", 80),
        _deployment("echo", 1, [py, str(HTTP_SERVER)], 8080), _service("echo", 80),
        _deployment("grpcsrv", 1, [py, str(GRPC_SERVER)], 9090), _service("grpcsrv", 9090),
        _deployment("client1", 1, ["sleep", "infinity"], None),
        _deployment("client2", 1, ["sleep", "infinity"], None),
    ]
    return "---".join(docs)


# ---------------------------------------------------------------------------- the meshed sandbox
@dataclass
class Mesh:
    sb: Sandbox
    controller: str
    token: str

    # ------------------------------------------------------------------ the cluster
    def pods_of(self, deploy: str) -> list[dict[str, Any]]:
        return sorted((p for p in self.sb.pods(NS) if p["metadata"]["labels"].get("app") == deploy),
                      key=lambda p: p["metadata"]["name"])

    def pod(self, deploy: str) -> str:
        pods = self.pods_of(deploy)
        assert len(pods) == 1, f"{deploy}: expected one pod, got {[p['metadata']['name'] for p in pods]}"
        return pods[0]["metadata"]["name"]

    def node_of(self, pod: str) -> str:
        return self.sb.pod(NS, pod)["spec"]["nodeName"]

    def service_ip(self, name: str) -> str:
        svc = next(s for s in self.sb.objects().of_kind("Service") if s["metadata"]["name"] == name
                   and s["metadata"]["namespace"] == NS)
        return svc["spec"]["clusterIP"]

    # ------------------------------------------------------------------ the real CLI
    def cli_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("NODEMESH_CONTROLLER", "NODEMESH_TOKEN")}
        env["NODEMESH_SANDBOX"] = self.sb.name  # the CLI finds controller.addr and the token itself
        return env

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "nodemesh", *args], env=self.cli_env(),
                              capture_output=True, text=True, timeout=timeout, check=False)

    def stat_json(self, *args: str) -> StatAnswer:
        started = time.time()
        res = self.cli("stat", *args, "-o", "json")
        ended = time.time()
        assert res.returncode == 0, f"nodemesh stat {' '.join(args)}: rc={res.returncode}\n{res.stderr}"
        return StatAnswer(list(args), json.loads(res.stdout), started, ended)

    def tap(self, *args: str) -> TapStream:
        return TapStream([sys.executable, "-m", "nodemesh", "tap", *args], self.cli_env())

    # ------------------------------------------------------------------ load generators in pods
    def loadgen(self, client_pod: str, out: Path, *args: str) -> subprocess.Popen[bytes]:
        """Run stat_loadgen.py inside the client pod's network namespace (its traffic is the
        pod's: the mesh captures it and names the pod's Deployment as the source)."""
        argv = ["ip", "netns", "exec", self.sb.pod_netns(NS, client_pod), sys.executable, str(LOADGEN),
                *args, "--out", str(out)]
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def run_clients(self, tmp_path: Path, duration: float, tag: str, rate: float) -> dict[str, list[Record]]:
        """Both clients against the `server` ClusterIP at `rate` for `duration`; their records."""
        ip = self.service_ip("server")
        procs = {}
        for client in ("client1", "client2"):
            out = tmp_path / f"{tag}-{client}.json"
            procs[client] = (out, self.loadgen(self.pod(client), out, "http", "--target", f"{ip}:80",
                                               "--host", f"server.{NS}", "--rate", str(rate),
                                               "--duration", str(duration)))
        return {c: Mesh.wait_records(p, out, duration + 30) for c, (out, p) in procs.items()}

    @staticmethod
    def wait_records(proc: subprocess.Popen[bytes], out: Path, timeout: float) -> list[Record]:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError(f"load generator did not finish within {timeout}s") from None
        assert proc.returncode == 0 and out.exists(), f"load generator failed: {err.decode()[-2000:]}"
        return json.loads(out.read_text())

    # ------------------------------------------------------------------ the controller, directly
    def check_rpc(self) -> pb.CheckResponse | None:
        try:
            with controller_channel(self.controller, sandbox_ca(self.sb.state_dir)) as channel:
                return pb_grpc.ControllerStub(channel).Check(
                    pb.CheckRequest(), timeout=2, metadata=(("authorization", f"Bearer {self.token}"),))
        except grpc.RpcError:
            return None

    def responses_seen(self, deploy: str, window_s: int = 60) -> int:
        """success + failure count of a Deployment's inbound row (to wait for reports to land)."""
        with controller_channel(self.controller, sandbox_ca(self.sb.state_dir)) as channel:
            resp = pb_grpc.ControllerStub(channel).StatSummary(
                pb.StatRequest(selector=pb.Resource(namespace=NS, type="deployment", name=deploy),
                               window_seconds=window_s),
                timeout=3, metadata=(("authorization", f"Bearer {self.token}"),))
        return sum(r.success_count + r.failure_count for r in resp.rows)

    def mesh_healthy(self, max_report_age_ms: int = 3000) -> bool:
        resp = self.check_rpc()
        nodes = {n.name for n in self.sb.nodes()}
        if resp is None:
            return False
        good = {n.node for n in resp.nodes if n.agent_connected and n.agent_ready and n.capture_installed
                and 0 <= n.last_report_age_ms <= max_report_age_ms}
        return nodes <= good

    def explain_broken(self, records: Sequence[Record]) -> str:
        """For an assertion message: the broken records and what the agents logged about it."""
        bad = broken_records(records)
        logs = []
        for node in self.sb.nodes():
            path = self.sb.node_process_log(node.name, f"nodemesh-agent-{node.name}")
            text = path.read_text(errors="replace") if path.exists() else ""
            logs += [f"{node.name}: {ln}" for ln in text.splitlines()
                     if "level=WARNING" in ln or "level=ERROR" in ln][-20:]
        return json.dumps(bad[:5], indent=1) + f"\n({len(bad)} broken)\nagent warnings:\n" + "\n".join(logs)

    def controller_pid(self) -> int | None:
        return self.sb.node_process_pid(CONTROLLER_PROCESS)

    def kill_controller(self) -> dict[str, Any]:
        """`kill -9` the controller and keep it down (the sandbox would restart it after 1 s):
        returns its spec for `start_controller`."""
        pid = self.controller_pid()
        assert pid is not None, "no controller running"
        spec = self.sb.status()["node_processes"][CONTROLLER_PROCESS]
        os.kill(pid, signal.SIGKILL)
        # Out of the kubelet's list before its 1 s restart back-off is over.
        with self.sb.state.infra_txn() as infra:
            infra.get("node_processes", {}).pop(CONTROLLER_PROCESS, None)
        wait_until(lambda: not alive(pid), 10, f"the killed controller (pid {pid}) gone")
        return spec

    def start_controller(self, spec: dict[str, Any]) -> int:
        """The controller again, as it was started (same argv, address and token): a new process
        with an empty memory."""
        return self.sb.start_node_process(spec["node"], CONTROLLER_PROCESS, spec["argv"], env=spec["env"])


@contextlib.contextmanager
def meshed_sandbox(manifests: Sequence[str] = ()) -> Iterator[Mesh]:
    """A 2-node sandbox running `manifests`, with nodemesh installed (controller on node1, agent and
    redirector on each node). The whole cluster goes away afterwards, also when setup fails."""
    with running_sandbox(nodes=2, manifests=list(manifests), timeout=60) as sb:
        controller = install_sandbox(sb.name, timeout=60, progress=lambda msg: None)
        token = (Path(sb.state_dir) / TOKEN_FILE).read_text().strip()
        yield Mesh(sb, controller, token)


# ---------------------------------------------------------------------------- expectations
@dataclass
class StatAnswer:
    args: list[str]
    rows: list[dict[str, Any]]
    started: float  # wall clock around the CLI call: the controller's "now" lies in between
    ended: float

    def row(self, name: str, kind: str | None = None) -> dict[str, Any]:
        hits = [r for r in self.rows if r["name"] == name and (kind is None or r["kind"] == kind)]
        assert len(hits) == 1, f"stat {' '.join(self.args)}: want one row {name!r}, got {self.rows}"
        return hits[0]


def bucket_of(value_ms: float) -> tuple[float, float]:
    """The Linkerd latency bucket (lower, upper] that holds a value."""
    lower = 0.0
    for upper in LATENCY_BUCKETS_MS:
        if value_ms <= upper:
            return lower, float(upper)
        lower = float(upper)
    return lower, math.inf


def true_quantile(latencies: Sequence[float], q: float) -> float:
    """The value at rank q*n (the element histogram_quantile's rank lands on)."""
    ordered = sorted(latencies)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def ok_records(records: Sequence[Record]) -> list[Record]:
    return [r for r in records if "status" in r]


def broken_records(records: Sequence[Record]) -> list[Record]:
    """Records the data plane broke: errors, or a failure the server did not design."""
    return [r for r in records if "error" in r or (r["status"] != 200 and not (r["status"] == 500 and r["designed"]))]


@dataclass
class Check:
    problems: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # what was compared, printed with -s

    def row_matches(self, what: str, row: dict[str, Any], records: Sequence[Record], window_s: float) -> None:
        """One stat row against the client records it should describe (all inside the window)."""
        done = ok_records(records)
        n = len(done)
        if n == 0:
            self.problems.append(f"{what}: no client records to compare with")
            return
        success = sum(1 for r in done if r["status"] < 500) / n
        rps = n / window_s
        if row["success"] is None or abs(row["success"] - success) > 0.01:
            self.problems.append(f"{what}: success {row['success']} vs client {success:.4f} (n={n})")
        if row["rps"] is None or abs(row["rps"] - rps) > 0.05 * rps:
            self.problems.append(f"{what}: rps {row['rps']} vs client {rps:.3f} (n={n})")
        lat = [r["latency_ms"] for r in done]
        self.lines.append(f"{what}: n={n} success {row['success']:.4f}/{success:.4f} rps {row['rps']:.3f}/{rps:.3f} "
                          f"p50 {row['latency_ms_p50']}/{true_quantile(lat, 0.5):.1f} "
                          f"p95 {row['latency_ms_p95']}/{true_quantile(lat, 0.95):.1f} "
                          f"p99 {row['latency_ms_p99']}/{true_quantile(lat, 0.99):.1f} (stat/client)")
        for q, key in ((0.5, "latency_ms_p50"), (0.95, "latency_ms_p95"), (0.99, "latency_ms_p99")):
            true = true_quantile(lat, q)
            lower, upper = bucket_of(true)
            got = row[key]
            if got is None or not (lower <= got <= upper):
                self.problems.append(f"{what}: {key} {got} not in the bucket [{lower:g}, {upper:g}] of the "
                                     f"client's {true:.1f}ms (n={n})")

    def assert_ok(self) -> None:
        print("\n".join(self.lines))
        assert not self.problems, "\n".join(self.problems)


def count_ended(records: Sequence[Record], lo: float, hi: float) -> int:
    return sum(1 for r in ok_records(records) if lo <= r["end"] <= hi)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            if predicate():
                return
        except Exception as exc:  # noqa: BLE001 - not yet; shown if it never works
            last_error = exc
        if time.monotonic() > deadline:
            why = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{why}")
        time.sleep(interval)
