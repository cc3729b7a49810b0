"""The controller's scale harness (issue 16): N simulated agents against a real controller.

    python3 tests/scale/run.py --nodes 10,100,500,1000 --pods 50 [--json OUT]

For each N: a synthetic cluster of N nodes x P pods (tests/scale/cluster.py) recorded as the
sandbox records it; a real controller process started as `nodemesh install --sandbox` starts it
(`--token-file`, TLS) that learns the cluster as on a real one (`--source kubernetes`: the real
`kubernetes` client lists and watches the sandbox's API server, sandbox/apiserver.py, run on
loopback as its own process, so a change reaches the controller as watch events and the API
server's own cost is not the controller's; `--source sandbox`: the controller polls and re-reads
the objects file itself, ~2.4 s of its loop per change at 50,000 pods); N simulated agents (tests/scale/agents.py: real gRPC
clients, the agent's protocol, its 1 s report cadence) spread over a few client processes. Then,
in order:

1. connect: until every agent has its identity snapshot;
2. steady state (`--duration` s): the controller's CPU (utime + stime from /proc, in cores) and
   RSS; report ingest latency = report sent -> the ReportAck covering it, as the agents saw it;
3. `stat deploy -A` and `stat po -n ns-0`, `--queries` each, through the gRPC API the CLI calls,
   with the CLI's request (p50/p99);
4. tap open latency: Tap on one deployment until its first event (agents answer a TapOpen with
   an event right away);
5. identity fan-out: one pod replaced, then a 500-pod rollout; time from the objects file's write
   to every agent holding a message of the new version (p50 and max over agents). With
   `--source kubernetes` this includes the sandbox API server noticing the write (it polls the
   file every 50 ms and re-reads it: ~1–2 s at 50,000 pods) before its watch events go out.

Numbers, not pass/fail: the machine is shared, repeat the ones you compare. The simulated agents
share the machine with the controller: their CPU (every client process, /proc) is reported beside
the controller's, for the connect phase and the steady state, with the load average, so a figure
held back by the simulator rather than the controller shows as such.

`--no-ingest`: the controller runs `--no-ingest --stat-backend prometheus` (it acknowledges reports
and stores nothing) with a Prometheus URL nobody answers: `stat` is refused, the rest is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cluster import Cluster
from nodemesh.api.certs import write_controller_pki
from nodemesh.api.clusterstate import ClusterObjects, write_objects
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.api.model import GRPC_CHANNEL_OPTIONS
from nodemesh.sandbox.podspec import kubeconfig

AGENTS_PER_PROCESS = 250


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcWatch:
    """CPU seconds and RSS of one process, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def cpu_s(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.tick

    def mem_mb(self) -> tuple[float, float]:
        rss = hwm = 0.0
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
        return rss, hwm


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


class Run:
    def __init__(self, nodes: int, pods: int, args: argparse.Namespace) -> None:
        self.n, self.p, self.args = nodes, pods, args
        self.dir = Path(tempfile.mkdtemp(prefix=f"nmscale-{nodes}-"))
        self.cluster = Cluster(nodes, pods, args.fanout)
        self.rv = 1
        self.procs: list[subprocess.Popen] = []
        self.apiserver: subprocess.Popen | None = None
        self.apiserver_watch: ProcWatch | None = None
        self.tap_starts: list[float] = []
        self.figures: dict = {"nodes": nodes, "pods_per_node": pods, "pods": nodes * pods,
                              "fanout": args.fanout, "active": args.active, "ingest": not args.no_ingest,
                              "identity_compression": not args.no_compression, "source": args.source}

    def say(self, msg: str) -> None:
        print(f"[N={self.n}] {msg}", file=sys.stderr, flush=True)

    def write_cluster(self) -> float:
        self.rv += 1
        write_objects(self.dir, ClusterObjects(self.rv, self.cluster.objects()))
        return time.time()

    # ------------------------------------------------------------------ processes
    def start_controller(self) -> None:
        token = secrets.token_urlsafe(32)
        (self.dir / "controller.token").write_text(token + "\n")
        self.token = token
        pki = write_controller_pki(self.dir, ["127.0.0.1"])
        self.ca = str(pki.ca)
        self.grpc_port, self.web_port = free_port(), free_port()
        self.write_cluster()
        if self.args.source == "kubernetes":
            source = ["--source", "kubernetes", "--kubeconfig", self.start_apiserver()]
        else:
            source = ["--source", "sandbox", "--state-dir", str(self.dir)]
        log = open(self.dir / "controller.log", "w")  # noqa: SIM115 - the child's, for its life
        self.controller = subprocess.Popen(
            [sys.executable, "-m", "nodemesh.controlplane", *source,
             "--listen", "127.0.0.1", "--grpc-port", str(self.grpc_port), "--web-port", str(self.web_port),
             "--token-file", str(self.dir / "controller.token"), "--tls-cert", str(pki.cert),
             "--tls-key", str(pki.key),
             *(["--no-ingest", "--stat-backend", "prometheus", "--prometheus-url", f"http://127.0.0.1:{free_port()}"]
               if self.args.no_ingest else []),
             *(["--ingest-turn-ms", str(self.args.ingest_turn_ms)] if self.args.ingest_turn_ms is not None else [])],
            stdout=log, stderr=subprocess.STDOUT)
        self.procs.insert(0, self.controller)
        self.watch = ProcWatch(self.controller.pid)
        self.wait_ready("controller", self.controller, f"http://127.0.0.1:{self.web_port}/ready", 60)
        creds = grpc.ssl_channel_credentials(root_certificates=Path(self.ca).read_bytes())
        self.channel = grpc.secure_channel(f"127.0.0.1:{self.grpc_port}", creds, options=GRPC_CHANNEL_OPTIONS)
        self.stub = pb_grpc.ControllerStub(self.channel)
        self.md = (("authorization", f"Bearer {token}"),)

    def wait_ready(self, name: str, proc: subprocess.Popen, url: str, timeout_s: float) -> None:
        """Until `url` answers 200; the child's log (`<name>.log`) in the error if it exits first."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {(self.dir / f'{name}.log').read_text()[-2000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"{name} not ready in {timeout_s:.0f} s")

    def start_apiserver(self) -> str:
        """The sandbox's API server over this cluster's objects file, on loopback; returns the path
        of a kubeconfig for it."""
        port = free_port()
        log = open(self.dir / "apiserver.log", "w")  # noqa: SIM115 - the child's, for its life
        self.apiserver = subprocess.Popen(
            [sys.executable, "-m", "nodemesh.sandbox.apiserver", "--state-dir", str(self.dir),
             "--listen", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(self.apiserver)
        self.apiserver_watch = ProcWatch(self.apiserver.pid)
        self.wait_ready("apiserver", self.apiserver, f"http://127.0.0.1:{port}/readyz", 120)
        path = self.dir / "kubeconfig"
        path.write_text(kubeconfig(f"http://127.0.0.1:{port}", "scale-harness", "default"))
        return str(path)

    def start_agents(self) -> None:
        k = max(1, -(-self.n // AGENTS_PER_PROCESS))
        self.outs = []
        for w in range(k):
            mine = list(range(w, self.n, k))
            spec = {"addr": f"127.0.0.1:{self.grpc_port}", "tls_name": "127.0.0.1", "token": self.token,
                    "ca": self.ca, "nodes": self.n, "pods": self.p, "fanout": self.args.fanout,
                    "active": self.args.active, "interval": 1.0, "my_nodes": mine,
                    "parse_all": self.args.parse_all, "no_refs": self.args.no_refs,
                    "no_compression": self.args.no_compression, "ramp_s": self.args.ramp / max(1, len(mine)),
                    "go": str(self.dir / "agents.go")}
            spec_path, out = self.dir / f"agents-{w}.json", self.dir / f"agents-{w}.out.json"
            spec_path.write_text(json.dumps(spec))
            self.outs.append(out)
            log = open(self.dir / f"agents-{w}.log", "w")  # noqa: SIM115 - the child's, for its life
            self.procs.append(subprocess.Popen([sys.executable, str(HERE / "agents.py"), "--spec", str(spec_path),
                                                "--out", str(out)], stdout=subprocess.DEVNULL, stderr=log))
        self.agent_procs = [p for p in self.procs if p is not self.controller and p is not self.apiserver]
        self.agent_watches = [ProcWatch(p.pid) for p in self.agent_procs]
        # Each client process builds its agents' traffic first (seconds to a minute at N=1000 on
        # a busy machine); the connect clock starts when all of them are ready.
        t = time.time()
        while not all(Path(str(out) + ".ready").exists() for out in self.outs):
            if any(p.poll() is not None for p in self.agent_procs):
                raise RuntimeError("a simulated-agent process exited before it was ready")
            time.sleep(0.2)
        self.figures["agents_setup_s"] = time.time() - t
        self.figures["agents_setup_cpu_s"] = self.agents_cpu_s()
        (self.dir / "agents.go").touch()

    def agents_cpu_s(self) -> float:
        """CPU seconds of every simulated-agent process so far (exited ones: their last reading)."""
        total = 0.0
        for w in self.agent_watches:
            try:
                w.last = w.cpu_s()
            except OSError:
                pass
            total += getattr(w, "last", 0.0)
        return total

    def stop_agents(self) -> list[dict]:
        for p in self.agent_procs:
            p.send_signal(signal.SIGTERM)
        results = []
        for p, out in zip(self.agent_procs, self.outs):
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
            if out.exists():
                results.extend(json.loads(out.read_text()))
        return results

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    # ------------------------------------------------------------------ questions
    def check(self) -> pb.CheckResponse:
        return self.stub.Check(pb.CheckRequest(), metadata=self.md, timeout=30)

    def metric(self, name: str) -> float | None:
        """A controller metric from /metrics; None when the controller did not answer in 60 s
        (its loop blocked: a figure in itself, noted in `metric_timeouts`)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/metrics", timeout=60) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith((name + " ", name + "{")):
                        return float(line.rsplit(" ", 1)[1])
        except OSError:
            self.figures["metric_timeouts"] = self.figures.get("metric_timeouts", 0) + 1
        return None

    def gc2(self) -> tuple[float, float] | None:
        """The controller's full garbage collections so far: (count, seconds)."""
        n = self.metric('nodemesh_controller_gc_pause_seconds_count{generation="2"}')
        t = self.metric('nodemesh_controller_gc_pause_seconds_sum{generation="2"}')
        return (n, t) if n is not None and t is not None else None

    def histogram(self, name: str) -> tuple[list[tuple[float, float]], float, float] | None:
        """A controller histogram from /metrics: (cumulative (le, count) buckets, sum, count)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/metrics", timeout=60) as r:
                text = r.read().decode()
        except OSError:
            self.figures["metric_timeouts"] = self.figures.get("metric_timeouts", 0) + 1
            return None
        buckets, total, count = [], 0.0, 0.0
        for line in text.splitlines():
            if line.startswith(name + "_bucket{"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                buckets.append((float(le), float(line.rsplit(" ", 1)[1])))
            elif line.startswith(name + "_sum "):
                total = float(line.rsplit(" ", 1)[1])
            elif line.startswith(name + "_count "):
                count = float(line.rsplit(" ", 1)[1])
        return buckets, total, count

    @staticmethod
    def histogram_delta(a, b, q: float) -> tuple[float | None, float | None]:
        """Between two `histogram` reads: the q-quantile's bucket bound (ms; the bucket it falls
        in, as histogram_quantile would bound it) and the mean (ms)."""
        if a is None or b is None or b[2] <= a[2]:
            return None, None
        n = b[2] - a[2]
        mean = (b[1] - a[1]) / n * 1e3
        for (le, cb), (_, ca) in zip(b[0], a[0]):
            if cb - ca >= q * n:
                return le * 1e3, mean
        return None, mean

    def timed(self, call, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            call()
            out.append(time.perf_counter() - t)
        return out

    def stat_latencies(self) -> None:
        q = self.args.queries
        deploy = pb.StatRequest(selector=pb.Resource(type="deployment"), all_namespaces=True)
        pods = pb.StatRequest(selector=pb.Resource(type="pod", namespace="ns-0"))
        rows = {}

        def stat(req: pb.StatRequest, what: str) -> None:
            resp = self.stub.StatSummary(req, metadata=self.md, timeout=120)
            rows[what] = (len(resp.rows), sum(1 for r in resp.rows if r.has_traffic))
        # The floor any call meets (the loop's and gRPC's queueing): Check, which computes little.
        c = self.timed(self.check, q)
        self.figures["check_p50_ms"], self.figures["check_p99_ms"] = pct(c, .5) * 1e3, pct(c, .99) * 1e3
        name = "nodemesh_controller_stat_request_seconds"
        h0 = self.histogram(name)
        d = self.timed(lambda: stat(deploy, "deploy"), q)
        h1 = self.histogram(name)
        p = self.timed(lambda: stat(pods, "pods"), q)
        h2 = self.histogram(name)
        f = self.figures
        # The controller's own time per query (inside the handler), beside what the caller waited.
        f["stat_deploy_A_server_mean_ms"] = self.histogram_delta(h0, h1, .5)[1]
        f["stat_po_n_server_mean_ms"] = self.histogram_delta(h1, h2, .5)[1]
        f["stat_deploy_A_p50_ms"], f["stat_deploy_A_p99_ms"] = pct(d, .5) * 1e3, pct(d, .99) * 1e3
        f["stat_po_n_p50_ms"], f["stat_po_n_p99_ms"] = pct(p, .5) * 1e3, pct(p, .99) * 1e3
        f["stat_deploy_rows"], f["stat_deploy_rows_with_traffic"] = rows["deploy"]
        f["stat_po_rows"], f["stat_po_rows_with_traffic"] = rows["pods"]

    def tap_latency(self) -> None:
        out = []
        for i in range(self.args.taps):
            ns, dep = self.cluster.deployment_of(i)
            req = pb.TapRequest(filter=pb.TapFilter(target=pb.Resource(type="deployment", namespace=ns, name=dep)))
            t = time.perf_counter()
            self.tap_starts.append(time.time())
            call = self.stub.Tap(req, metadata=self.md, timeout=30)
            try:
                next(iter(call))
                out.append(time.perf_counter() - t)
            except grpc.RpcError as exc:
                self.say(f"tap failed: {exc.code().name} {exc.details()}")
            finally:
                call.cancel()
            time.sleep(0.3)
        self.figures["tap_open_p50_ms"] = pct(out, .5) * 1e3 if out else None
        self.figures["tap_open_max_ms"] = max(out) * 1e3 if out else None

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        f = self.figures
        try:
            self.start_controller()
            f["rss_mb_ready"], _ = self.watch.mem_mb()   # the cluster listed, no agent yet
            self.start_agents()   # returns when every client process is ready to connect
            t0 = time.time()
            cpu0 = self.watch.cpu_s()
            f["loadavg_start"] = os.getloadavg()[0]
            # 1. every agent connected and holding its identity (Check: connected + reporting)
            deadline = time.time() + self.args.connect_timeout
            up = 0
            while time.time() < deadline and any(a.poll() is None for a in self.agent_procs):
                try:
                    ch = self.check()
                except grpc.RpcError:  # the controller's loop is blocked: keep waiting
                    continue
                up = sum(1 for n in ch.nodes if n.agent_connected and 0 <= n.last_report_age_ms < 5000)
                if up >= self.n:
                    break
                if int(time.time() - t0) % 10 == 0:
                    self.say(f"connecting: {up}/{self.n} agents reporting after {time.time() - t0:.0f} s")
                time.sleep(1)
            f["connect_s"] = time.time() - t0
            f["agents_reporting"] = up
            f["connect_cpu_s"] = self.watch.cpu_s() - cpu0
            f["agents_connect_cpu_s"] = self.agents_cpu_s() - f["agents_setup_cpu_s"]
            f["loadavg_connect"] = os.getloadavg()[0]
            f["rss_mb_connected"], _ = self.watch.mem_mb()
            self.say(f"{up}/{self.n} agents reporting after {f['connect_s']:.1f} s (CPU s: controller "
                     f"{f['connect_cpu_s']:.0f}, agents {f['agents_connect_cpu_s']:.0f}; load {f['loadavg_connect']:.1f})")
            time.sleep(self.args.warmup)
            # 2. steady state
            c0, w0, a0 = self.watch.cpu_s(), time.time(), self.agents_cpu_s()
            r0 = self.metric("nodemesh_controller_reports_received_total")
            lag0 = self.histogram("nodemesh_controller_loop_lag_seconds")
            gc0 = self.gc2()
            time.sleep(self.args.duration)
            lag1 = self.histogram("nodemesh_controller_loop_lag_seconds")
            # How late the controller's loop ran a 100 ms timer (bucket bounds, ms)
            f["loop_lag_p50_ms"] = self.histogram_delta(lag0, lag1, .5)[0]
            f["loop_lag_p99_ms"], f["loop_lag_mean_ms"] = self.histogram_delta(lag0, lag1, .99)
            c1, w1, a1 = self.watch.cpu_s(), time.time(), self.agents_cpu_s()
            r1 = self.metric("nodemesh_controller_reports_received_total")
            f["controller_cores"] = (c1 - c0) / (w1 - w0)
            f["agents_cores"] = (a1 - a0) / (w1 - w0)
            if r0 is not None and r1 is not None:
                f["reports_per_s"] = (r1 - r0) / (w1 - w0)
                # CPU per report: what the controller spent, whatever share of the machine it got.
                f["cpu_ms_per_report"] = (c1 - c0) / max(1.0, r1 - r0) * 1e3
            f["rss_mb"], _ = self.watch.mem_mb()
            f["series_tracked"] = self.metric("nodemesh_controller_series_tracked")
            self.say(f"steady: {f['controller_cores']:.2f} cores, {f['rss_mb']:.0f} MB, "
                     f"{f.get('reports_per_s') or 0:.0f} reports/s")
            # 3. stat, 4. tap
            try:
                self.stat_latencies()
            except grpc.RpcError as exc:
                self.say(f"stat failed: {exc.code().name}")
                f["stat_error"] = f"{exc.code().name}: {(exc.details() or '')[:200]}"
            self.tap_latency()
            gc1 = self.gc2()
            if gc0 is not None and gc1 is not None:
                # Full collections (the whole process stops) from the steady state to the taps' end.
                f["gc2_pauses"], f["gc2_pause_s"] = gc1[0] - gc0[0], gc1[1] - gc0[1]
            # 5. identity fan-out: one pod, then 500 pods
            t_one = self.roll([0], generation=1)
            time.sleep(self.args.fanout_wait)
            t_roll = self.roll(list(range(1, 1 + min(500, self.n * self.p - 1))), generation=2)
            time.sleep(self.args.fanout_wait * 2)
            f["rss_mb_end"], f["rss_hwm_mb"] = self.watch.mem_mb()
            if self.apiserver_watch is not None:   # the API server's work, for the fan-out figures
                f["apiserver_cpu_s"] = self.apiserver_watch.cpu_s()
            f["loadavg_end"] = os.getloadavg()[0]
            f["reports_received_total"] = self.metric("nodemesh_controller_reports_received_total")
            f["identity_snapshots_total"] = self.metric("nodemesh_controller_identity_snapshots_total")
            f["identity_deltas_total"] = self.metric("nodemesh_controller_identity_deltas_total")
            results = self.stop_agents()
            time.sleep(0.5)
            f["reports_received_total"] = self.metric("nodemesh_controller_reports_received_total")
            self.summarize(results, t_one, t_roll)
        finally:
            self.cleanup()
        return f

    def apiserver_changes(self) -> list[float]:
        """When the sandbox API server's watch events for each change of the objects file went out."""
        path = self.dir / "apiserver.log"
        if self.args.source != "kubernetes" or not path.exists():
            return []
        return sorted(float(line.rsplit("at=", 1)[1]) for line in path.read_text().splitlines()
                      if "event=objects_changed" in line)

    def roll(self, pods: list[int], generation: int) -> float:
        self.cluster.roll(pods, generation)
        return self.write_cluster()

    def summarize(self, results: list[dict], t_one: float, t_roll: float) -> None:
        f = self.figures
        f["agents"] = len(results)
        f["agents_connected"] = sum(1 for r in results if r["connected_at"])
        f["agent_errors"] = sum(len(r["errors"]) for r in results)
        log = (self.dir / "controller.log").read_text()
        f["controller_rejected_reports"] = log.count("event=report_series_rejected")
        f["controller_errors"] = log.count("level=ERROR")
        f["reports_sent"] = sum(r["reports_sent"] for r in results)
        f["reports_acked"] = sum(r["acked"] for r in results)
        f["intervals_skipped_backlog"] = sum(r.get("skipped", 0) for r in results)
        lat = [x for r in results for x in r["latencies"]]
        f["ingest_p50_ms"] = pct(lat, .5) * 1e3 if lat else None
        f["ingest_p99_ms"] = pct(lat, .99) * 1e3 if lat else None
        snaps = [m for r in results for m in r["identity"] if m[1] == "snapshot"]
        f["snapshot_bytes"] = max((m[2] for m in snaps), default=0)
        f["snapshot_wire_bytes"] = max((m[5] for m in snaps), default=0)   # compressed, when it was
        f["snapshot_encodings"] = sorted({m[6] or "plain" for m in snaps})
        f["snapshot_pods"] = max((m[3] for m in snaps), default=-1)
        # Streams that ended before the harness stopped them (the agent opened them again).
        ends = [(t, status) for r in results for t, status in r.get("stream_ends", [])]
        f["stream_ends"] = len(ends)
        f["stream_end_statuses"] = {s: sum(1 for _, x in ends if x == s) for s in sorted({x for _, x in ends})}
        f["agents_reconnected"] = sum(1 for r in results if r.get("streams", 1) > 1)
        # Tap open, split: the call made -> the first agent holding its TapOpen (the controller's
        # part: authorization, the target's nodes, the send), then -> the caller's first event.
        opens = sorted(x for r in results for x in r.get("tap_opens", []))
        at_agent = [next((o - t for o in opens if o >= t), None) for t in self.tap_starts]
        at_agent = [x for x in at_agent if x is not None]
        f["tap_open_at_agent_p50_ms"] = pct(at_agent, .5) * 1e3 if at_agent else None
        changes = self.apiserver_changes()
        for name, t in (("fanout_one", t_one), ("fanout_500", t_roll)):
            per = []
            sizes = []
            for r in results:
                after = [m for m in r["identity"] if m[0] >= t]
                if after:
                    per.append(after[0][0] - t)
                    sizes.append(after[0][2])
            f[f"{name}_agents"] = len(per)
            f[f"{name}_p50_ms"] = pct(per, .5) * 1e3 if per else None
            f[f"{name}_max_ms"] = max(per) * 1e3 if per else None
            f[f"{name}_msg_bytes"] = max(sizes, default=0)
            # The same from when the API server's watch events went out (the file re-read, which a
            # real API server does not do, left out): the controller's and the streams' part.
            seen = [c for c in changes if c >= t]
            if seen and per:
                f[f"{name}_api_ms"] = (seen[0] - t) * 1e3
                f[f"{name}_from_event_max_ms"] = (t + max(per) - seen[0]) * 1e3


COLUMNS = [
    ("nodes", "N", "{:.0f}"), ("pods", "pods", "{:.0f}"), ("agents_reporting", "agents", "{:.0f}"),
    ("controller_cores", "cores", "{:.2f}"), ("reports_per_s", "reports/s", "{:.0f}"),
    ("cpu_ms_per_report", "CPU ms/report", "{:.2f}"), ("rss_mb_end", "RSS MB", "{:.0f}"),
    ("series_tracked", "series", "{:.0f}"),
    ("ingest_p50_ms", "ingest p50", "{:.0f}"), ("ingest_p99_ms", "ingest p99", "{:.0f}"),
    ("fanout_one_max_ms", "1-pod fanout", "{:.0f}"), ("fanout_500_max_ms", "500-pod fanout", "{:.0f}"),
    ("fanout_one_from_event_max_ms", "1-pod from event", "{:.0f}"),
    ("fanout_500_from_event_max_ms", "500-pod from event", "{:.0f}"),
    ("stat_deploy_A_p50_ms", "deploy -A p50", "{:.0f}"), ("stat_deploy_A_p99_ms", "deploy -A p99", "{:.0f}"),
    ("stat_po_n_p50_ms", "po -n p50", "{:.0f}"), ("stat_po_n_p99_ms", "po -n p99", "{:.0f}"),
    ("stat_deploy_A_server_mean_ms", "deploy -A in ctl", "{:.0f}"), ("check_p50_ms", "Check p50", "{:.0f}"),
    ("tap_open_p50_ms", "tap open p50", "{:.0f}"),
    ("loop_lag_mean_ms", "loop lag mean", "{:.0f}"), ("loop_lag_p99_ms", "lag p99 <=", "{:.0f}"),
    ("gc2_pauses", "full GCs", "{:.0f}"), ("gc2_pause_s", "GC s", "{:.1f}"),
    ("connect_cpu_s", "connect CPU s ctl", "{:.0f}"), ("agents_connect_cpu_s", "agents", "{:.0f}"),
    ("agents_cores", "agent cores", "{:.2f}"), ("snapshot_wire_bytes", "snapshot MB", "{:.2f}", 1e-6),
    ("stream_ends", "streams ended", "{:.0f}"),
    ("loadavg_connect", "load", "{:.1f}"),
]


def table(rows: list[dict]) -> str:
    head = [c[1] for c in COLUMNS]
    body = [[(c[2].format(r[c[0]] * (c[3] if len(c) > 3 else 1)) if isinstance(r.get(c[0]), (int, float)) else "-")
             for c in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines) + "\n(ms; cores = controller CPU seconds per second in steady state; fan-out = " \
        "objects file written -> every agent holds the new version (from event: from the sandbox API server's watch " \
        "events going out, its file re-read left out); connect CPU s = CPU seconds of the " \
        "controller / of every simulated-agent process from the agents starting to connect (their setup done) to the end of the connect phase; snapshot MB = as sent (compressed when it was); " \
        "deploy -A in ctl = the controller's mean time inside the StatSummary handler; Check p50 = a call that " \
        "computes little (the floor of queueing); loop lag = how late the " \
        "controller's loop ran a 100 ms timer in steady state, mean and the p99's histogram bucket bound; full GCs / " \
        "GC s = the controller's full garbage collections and their pause from the steady state to the taps' end)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", default="10,100,500,1000", help="comma-separated N values")
    p.add_argument("--pods", type=int, default=50, help="pods per node")
    p.add_argument("--fanout", type=int, default=3, help="deployments each pod calls")
    p.add_argument("--active", type=float, default=0.2,
                   help="probability a caller->callee pair sees requests in a given second")
    p.add_argument("--duration", type=float, default=15, help="steady-state seconds measured")
    p.add_argument("--warmup", type=float, default=5)
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--taps", type=int, default=3)
    p.add_argument("--ramp", type=float, default=5.0, help="seconds over which agents connect")
    p.add_argument("--connect-timeout", type=float, default=300)
    p.add_argument("--fanout-wait", type=float, default=4)
    p.add_argument("--parse-all", action="store_true", help="agents parse every identity message")
    p.add_argument("--no-refs", action="store_true", help="agents send labels with every series")
    p.add_argument("--source", choices=("kubernetes", "sandbox"), default="kubernetes",
                   help="how the controller learns the cluster (see above; default: kubernetes)")
    p.add_argument("--no-ingest", action="store_true",
                   help="controller with --no-ingest (acks reports, stores nothing; stat is refused)")
    p.add_argument("--ingest-turn-ms", type=float, default=None,
                   help="the controller's --ingest-turn-ms (default: the controller's default; 0: inline)")
    p.add_argument("--no-compression", action="store_true",
                   help="agents do not offer compressed identity in their hello (as agents before it)")
    p.add_argument("--json", default="", help="write the figures here")
    args = p.parse_args()
    rows = []
    for n in [int(x) for x in args.nodes.split(",")]:
        rows.append(Run(n, args.pods, args).run())
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print(table(rows))
    print("\ncommand:", " ".join(sys.argv))


if __name__ == "__main__":
    main()
