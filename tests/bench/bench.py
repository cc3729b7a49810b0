"""The bench itself: a 2-node sandbox, servers and clients as pods, every scenario run DIRECT
(no capture) and then MESHED (agent + redirector on both nodes), figures and a ratio table.

run.py is the command line; this module holds the scenarios so the smoke test and the command
share one code path.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import procstat

HERE = Path(__file__).resolve().parent
PY = sys.executable
NS = "bench"
NGINX_PORT, GRPC_PORT, BULK_PORT = 8080, 9090, 5001
ADMIN_PORT = 4191


@dataclass
class BenchConfig:
    duration: float = 8.0  # seconds measured per scenario and mode
    warmup: float = 1.0  # seconds before measuring (open-loop / grpc runs); wrk has none
    http_rate: float = 1000.0
    http_connections: int = 8  # keep-alive connections of the fixed-rate generator
    wrk_connections: int = 50
    wrk_threads: int = 2
    grpc_rate: float = 300.0  # the "moderate" fixed rate for gRPC unary
    grpc_concurrency: int = 32  # in-flight RPCs at saturation
    bulk_mb: int = 1024
    agent_workers: int | None = None  # None: the agent's default (one per usable CPU)
    # Meshed columns, each a capture (+ acceleration) of the redirector: "iptables", "ebpf",
    # "ebpf+sockmap", "iptables+sockmap". The first is the "meshed" column of the main table.
    modes: tuple[str, ...] = ("iptables",)
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True), repr=False)

    @classmethod
    def make(cls, quick: bool = False, duration: float | None = None, bulk_mb: int | None = None,
             agent_workers: int | None = None, modes: tuple[str, ...] = ("iptables",)) -> BenchConfig:
        cfg = cls(duration=2.5, warmup=0.5, bulk_mb=256) if quick else cls()
        if duration is not None:
            cfg.duration = duration
            cfg.warmup = min(cfg.warmup, max(0.25, duration / 4))
        if bulk_mb is not None:
            cfg.bulk_mb = bulk_mb
        cfg.agent_workers = agent_workers
        for mode in modes:
            capture, _, accel = mode.partition("+")
            if capture not in ("iptables", "ebpf") or accel not in ("", "sockmap"):
                raise ValueError(f"unknown mode {mode!r} (iptables, ebpf, ebpf+sockmap, iptables+sockmap)")
        cfg.modes = tuple(modes)
        return cfg

    @property
    def uses_bpf(self) -> bool:
        return any(m != "iptables" for m in self.modes)


def node_env() -> dict[str, str]:
    """The environment of the agents and redirectors the bench starts: the sandbox's kubelet starts
    node processes with a clean one, so without PYTHONPATH they would import whichever nodemesh the
    interpreter finds (the installed checkout), not the code the bench was run with."""
    return {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}


# ---------------------------------------------------------------------------------------------- pods
NGINX_CONF = """
user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    default_type text/plain;
    server {{
        listen {port};
        location / {{ return 200 "hello from nginx\\n"; }}
    }}
}}
"""


def _deployment(name: str, command: list[str], port: int | None, replicas: int = 1) -> str:
    from nodemesh.sandbox.testing import deployment  # lazily, as the rest of the sandbox (pyroute2)

    return "---" + deployment(name, NS, command, ports=[port] if port else [], replicas=replicas)


def manifests(workdir: Path) -> str:
    """nginx, a gRPC server and a bulk receiver (one pod each) and a client on each node. The
    sandbox schedules least-loaded first, so the two client replicas land on different nodes."""
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=workdir, port=NGINX_PORT))
    return (f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n"
            + _deployment("nginx", ["nginx", "-c", str(conf), "-p", str(workdir)], NGINX_PORT)
            + _deployment("grpc", [PY, str(HERE / "grpcpeer.py"), "serve", "--port", str(GRPC_PORT)], GRPC_PORT)
            + _deployment("bulk", [PY, str(HERE / "bulk.py"), "recv", "--port", str(BULK_PORT)], BULK_PORT)
            + _deployment("client", ["sleep", "infinity"], None, replicas=2))


@dataclass
class Placement:
    server_ip: dict[str, str]  # app -> pod IP
    server_pod: dict[str, str]  # app -> pod name
    server_node: dict[str, str]  # app -> node
    client_on: dict[str, str]  # node -> client pod name

    def cross(self, app: str) -> str:
        """A client pod on the other node than the app's server."""
        return next(pod for node, pod in self.client_on.items() if node != self.server_node[app])

    def same(self, app: str) -> str:
        return self.client_on[self.server_node[app]]


def placement(pods: list[dict[str, Any]]) -> Placement:
    ips, names, nodes, clients = {}, {}, {}, {}
    for p in pods:
        app, node = p["metadata"]["labels"]["app"], p["spec"]["nodeName"]
        if app == "client":
            clients[node] = p["metadata"]["name"]
        else:
            ips[app], names[app], nodes[app] = p["status"]["podIP"], p["metadata"]["name"], node
    if len(clients) != 2:
        raise RuntimeError(f"expected a client pod on each of 2 nodes, got {clients}")
    return Placement(ips, names, nodes, clients)


# ---------------------------------------------------------------------------------------------- wrk
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"bad wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, float | int]:
    """wrk --latency output -> requests, rps, p50/p90/p99 ms, errors."""
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if not m:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    seconds = float(m.group(2)) * _UNITS[m.group(3)] / 1000
    res: dict[str, float | int] = {"requests": int(m.group(1)), "seconds": round(seconds, 3),
                                   "rps": round(int(m.group(1)) / seconds, 1), "total_requests": int(m.group(1))}
    for q in ("50", "90", "99"):
        lm = re.search(rf"^\s*{q}%\s+(\S+)", out, re.MULTILINE)
        res[f"p{q}_ms"] = round(_ms(lm.group(1)), 4) if lm else 0.0
    errors = 0
    if em := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(em.group(1))
    if sm := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in sm.groups())
    res["errors"] = errors
    return res


# ---------------------------------------------------------------------------------------------- the bench
class Bench:
    def __init__(self, sb: Any, cfg: BenchConfig) -> None:  # sb: nodemesh.sandbox.cluster.Sandbox
        self.sb = sb
        self.cfg = cfg
        self.nodes = sb.nodes()
        self.place = placement(sb.pods(NS))
        self.agent_roots: dict[str, int] = {}  # node -> agent parent pid, while meshed
        self.agent_args: list[str] = []        # more agent flags (tests/bench/routes.py: --no-route-metrics)
        self.results: dict[str, Any] = {"direct": {}, "meshed": {}}
        self.results.update({mode_key(m): {} for m in cfg.modes[1:]})
        self.mode = ""                         # the meshed mode capturing now ("": direct)

    # ---- running things in pods
    def _json_in_pod(self, pod: str, argv: list[str], timeout: float) -> dict[str, Any]:
        res = self.sb.exec(NS, pod, argv, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"{argv[1:3]} in {pod} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    def _accounted(self, run: Callable[[], dict[str, Any]], server_app: str, meshed: bool) -> dict[str, Any]:
        """Run a scenario and record who used how much CPU meanwhile: the client (our waited-for
        children), the server pod, the agents (both nodes) and the whole machine, in CPU-seconds."""
        server_pids = procstat.netns_pids(self.sb.pod_netns(NS, self.place.server_pod[server_app]))
        agents = [p for root in self.agent_roots.values() for p in procstat.tree_pids(root)]
        per_node = {n: procstat.cpu_seconds(procstat.tree_pids(r)) for n, r in self.agent_roots.items()}
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        srv0, (ag_user0, ag_sys0) = procstat.cpu_seconds(server_pids), procstat.cpu_split(agents)
        busy0 = procstat.machine_busy()
        t0 = time.monotonic()
        out = run()
        wall = time.monotonic() - t0
        busy1 = procstat.machine_busy()
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        agents = [p for root in self.agent_roots.values() for p in procstat.tree_pids(root)]
        ag_user1, ag_sys1 = procstat.cpu_split(agents)
        out["cpu"] = {
            "wall_s": round(wall, 3),
            "machine_cores": procstat.machine_cores(),
            "machine_busy_cores": round((busy1 - busy0) / wall, 3),
            "client_cpu_s": round((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime), 3),
            "server_cpu_s": round(procstat.cpu_seconds(server_pids) - srv0, 3),
            "agent_cpu_s": round(max(0.0, ag_user1 + ag_sys1 - ag_user0 - ag_sys0), 3),
            # system time: the kernel's share (socket calls, and the veth/bridge/netfilter path they
            # drive), as opposed to the agent's own Python
            "agent_sys_cpu_s": round(ag_sys1 - ag_sys0, 3),
            "agent_cpu_s_by_node": {n: round(procstat.cpu_seconds(procstat.tree_pids(r)) - per_node[n], 3)
                                    for n, r in self.agent_roots.items()},
        }
        cpu = out["cpu"]
        cpu["others_busy_cores"] = round(max(0.0, cpu["machine_busy_cores"] - (
            cpu["client_cpu_s"] + cpu["server_cpu_s"] + cpu["agent_cpu_s"]) / wall), 3)
        if meshed and out.get("total_requests"):
            out["agent_cpu_s_per_1000"] = round(out["cpu"]["agent_cpu_s"] / out["total_requests"] * 1000, 5)
        return out

    # ---- scenarios
    def http_fixed(self, client: str) -> dict[str, Any]:
        c = self.cfg
        return self._json_in_pod(client, [
            PY, str(HERE / "httpload.py"), "--url", f"http://{self.place.server_ip['nginx']}:{NGINX_PORT}/",
            "--rate", str(c.http_rate), "--duration", str(c.duration), "--warmup", str(c.warmup),
            "--connections", str(c.http_connections)], timeout=c.duration + c.warmup + 60)

    def http_saturation(self, client: str) -> dict[str, Any]:
        c = self.cfg
        seconds = max(1, round(c.duration))
        res = self.sb.exec(NS, client, [
            "wrk", "-c", str(c.wrk_connections), "-t", str(c.wrk_threads), "-d", f"{seconds}s", "--latency",
            f"http://{self.place.server_ip['nginx']}:{NGINX_PORT}/"],
            capture_output=True, text=True, timeout=seconds + 60)
        if res.returncode != 0:
            raise RuntimeError(f"wrk failed ({res.returncode}): {res.stderr.strip()}")
        return parse_wrk(res.stdout)

    def grpc_load(self, rate: float) -> dict[str, Any]:
        c = self.cfg
        return self._json_in_pod(self.place.cross("grpc"), [
            PY, str(HERE / "grpcpeer.py"), "load", "--target", f"{self.place.server_ip['grpc']}:{GRPC_PORT}",
            "--rate", str(rate), "--duration", str(c.duration), "--warmup", str(c.warmup),
            "--concurrency", str(c.grpc_concurrency if rate <= 0 else 16)], timeout=c.duration + c.warmup + 60)

    def bulk(self) -> dict[str, Any]:
        return self._json_in_pod(self.place.cross("bulk"), [
            PY, str(HERE / "bulk.py"), "send", "--target", f"{self.place.server_ip['bulk']}:{BULK_PORT}",
            "--mb", str(self.cfg.bulk_mb)], timeout=600)

    def scenarios(self) -> list[tuple[str, str, Callable[[], dict[str, Any]]]]:
        """(name, server app, run) in the order they run."""
        c, p = self.cfg, self.place
        return [
            ("http_fixed_cross", "nginx", lambda: self.http_fixed(p.cross("nginx"))),
            ("http_fixed_same", "nginx", lambda: self.http_fixed(p.same("nginx"))),
            ("http_sat_cross", "nginx", lambda: self.http_saturation(p.cross("nginx"))),
            ("http_sat_same", "nginx", lambda: self.http_saturation(p.same("nginx"))),
            ("grpc_sat", "grpc", lambda: self.grpc_load(0)),
            ("grpc_fixed", "grpc", lambda: self.grpc_load(c.grpc_rate)),
            ("bulk", "bulk", self.bulk),
        ]

    # ---- the mesh
    def _agent_name(self, node: str) -> str:
        return f"bench-agent-{node}"

    def _admin_get(self, node: str, path: str) -> str:
        code = ("import sys, urllib.request\n"
                f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{ADMIN_PORT}{path}', timeout=2)"
                ".read().decode())")
        res = self.sb.node_exec(node, [PY, "-c", code], capture_output=True, text=True, timeout=10)
        if res.returncode != 0:
            raise RuntimeError(f"GET {path} on {node}: {res.stderr.strip()[-300:]}")
        return res.stdout

    def start_agents(self, timeout: float = 60.0) -> None:
        workers = ["--workers", str(self.cfg.agent_workers)] if self.cfg.agent_workers else []
        for n in self.nodes:
            argv = [PY, "-m", "nodemesh.agent", "--node", n.name, "--node-ip", n.ip, "--pod-cidr", n.pod_cidr,
                    "--identity-file", str(self.sb.state_dir), "--drain-grace", "2", *workers, *self.agent_args]
            env = node_env()
            if self.cfg.uses_bpf:
                # As `install --sandbox` runs it with eBPF modes: the pinned maps' directory, and a
                # cgroup below the node's (the sockmap programs' attach point), as a DaemonSet pod.
                from nodemesh.sandbox import cgroups

                env["NODEMESH_BPF_DIR"] = cgroups.node_bpf_dir(self.sb.name, n.name)
                cg = cgroups.prepare_pod(self.sb.name, n.name, "-agent")
                argv = cgroups.join_argv(cg, argv) if cg is not None else argv
            self.sb.start_node_process(n.name, self._agent_name(n.name), argv, env=env)
        self._wait(lambda: all(self._ready(n.name) for n in self.nodes), timeout, "agents /ready",
                   [self.sb.node_process_log(n.name, self._agent_name(n.name)) for n in self.nodes])
        for n in self.nodes:
            pid = self.sb.node_process_pid(self._agent_name(n.name))
            if pid is None:
                raise RuntimeError(f"agent on {n.name} is not running")
            self.agent_roots[n.name] = pid

    def capture(self, on: bool, timeout: float = 60.0, mode: str = "iptables") -> None:
        """Start the redirectors (they install capture once the agent is ready) or stop them (SIGTERM:
        they remove every rule and eBPF program), and wait until the nat hook is there / gone on
        both nodes (eBPF capture keeps the inbound nat hook), and an eBPF mode really runs."""
        from nodemesh.redirector.plan import hook_present
        from nodemesh.sandbox import cgroups

        capture, _, accel = mode.partition("+")

        def mode_args(node: str) -> list[str]:
            if mode == "iptables":
                return []
            return ["--capture", capture, *(["--accelerate", accel] if accel else []),
                    "--bpf-dir", cgroups.node_bpf_dir(self.sb.name, node),
                    "--cgroup-root", str(cgroups.node_cgroup(self.sb.name, node))]

        def mode_running(node: str) -> bool:
            log = self.sb.node_process_log(node, f"bench-redirector-{node}")
            text = log.read_text(errors="replace") if log.exists() else ""
            ok = capture != "ebpf" or "event=capture_mode mode=ebpf" in text
            if accel:
                ok = ok and "event=accelerate mode=sockmap" in text
            if "fallback_from=ebpf" in text or "event=accelerate mode=none" in text:
                raise RuntimeError(f"{mode} refused on {node}:\n{text[-1500:]}")
            return ok

        def hooked(node: str) -> bool:
            return hook_present(self.sb.node_exec(node, ["iptables-save", "-t", "nat"], capture_output=True,
                                                  text=True, timeout=10).stdout)

        for n in self.nodes:
            if on:
                log = self.sb.node_process_log(n.name, f"bench-redirector-{n.name}")
                if log.exists():   # mode_running reads this start's lines only
                    log.write_text("")
                self.sb.start_node_process(n.name, f"bench-redirector-{n.name}", [
                    PY, "-m", "nodemesh.redirector", "run", "--node-ip", n.ip, "--pod-cidr", n.pod_cidr,
                    "--agent-admin", f"http://127.0.0.1:{ADMIN_PORT}", *mode_args(n.name)], env=node_env())
            else:
                self.sb.stop_node_process(n.name, f"bench-redirector-{n.name}", timeout=30.0)
        self._wait(lambda: all(hooked(n.name) == on and (not on or mode_running(n.name)) for n in self.nodes),
                   timeout,
                   f"capture {'installed' if on else 'removed'}",
                   [self.sb.node_process_log(n.name, f"bench-redirector-{n.name}") for n in self.nodes])

    def switch(self, mode: str) -> None:
        """Capture as `mode` ("": none, direct) from whatever captures now."""
        if mode == self.mode:
            return
        if self.mode:
            self.capture(False, mode=self.mode)
        if mode:
            self.capture(True, mode=mode)
        self.mode = mode

    def _ready(self, node: str) -> bool:
        try:
            return self._admin_get(node, "/ready").startswith("ready")
        except (RuntimeError, OSError):
            return False

    @staticmethod
    def _wait(pred: Callable[[], bool], timeout: float, what: str, logs: list[Path]) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.2)
        tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-1500:]}" for p in logs if p.exists())
        raise RuntimeError(f"{what}: not reached within {timeout:.0f}s\n{tails}")

    def agent_rss(self) -> dict[str, float]:
        return {n: round(procstat.rss_mb(procstat.tree_pids(r)), 1) for n, r in self.agent_roots.items()}

    def agent_pss(self) -> dict[str, float]:
        return {n: round(procstat.pss_mb(procstat.tree_pids(r)), 1) for n, r in self.agent_roots.items()}

    def agent_requests_seen(self) -> int:
        """Sum of request_total over both agents (outbound + inbound series): proof the traffic
        went through the mesh."""
        total = 0.0
        for n in self.nodes:
            for line in self._admin_get(n.name, "/metrics").splitlines():
                if line.startswith("request_total{"):
                    total += float(line.rsplit(" ", 1)[1])
        return int(total)

    # ---- everything
    def run(self) -> dict[str, Any]:
        """Agents first (idle RSS before any traffic), then each scenario DIRECT (no capture) and
        MESHED (capture on) back to back: pairing them in time keeps the comparison fair when other
        work on the machine comes and goes during the run."""
        c, r = self.cfg, self.results
        r["config"] = {k: v for k, v in asdict(c).items() if k != "log"}
        r["placement"] = asdict(self.place)
        r["loadavg_start"] = Path("/proc/loadavg").read_text().split()[:3]
        c.log("bench: starting the agents (one per node, no capture yet) ...")
        self.start_agents()
        time.sleep(1.0)  # let the workers settle before calling it idle
        r["agent_pids"] = {n: procstat.tree_pids(root) for n, root in self.agent_roots.items()}
        r["agent_rss_idle_mb"] = self.agent_rss()
        r["agent_rss_idle_by_process_mb"] = {n: {str(p): round(procstat.rss_mb([p]), 1) for p in pids}
                                             for n, pids in r["agent_pids"].items()}
        r["agent_pss_idle_mb"] = self.agent_pss()
        r["agent_pss_idle_by_process_mb"] = {n: {str(p): round(procstat.pss_mb([p]), 1) for p in pids}
                                             for n, pids in r["agent_pids"].items()}
        with procstat.RssSampler(list(self.agent_roots.values())) as sampler:
            order = ["", *c.modes]   # "": direct
            for i, (name, app, run) in enumerate(self.scenarios()):
                # Snake through the modes (direct, iptables, ebpf | ebpf, iptables, direct | ...): one
                # switch fewer per scenario, and a slow drift of the machine's load does not always
                # favour one mode.
                for mode in (order if i % 2 == 0 else order[::-1]):
                    self.switch(mode)
                    key = "direct" if not mode else ("meshed" if mode == c.modes[0] else mode_key(mode))
                    c.log(f"bench: {name}: {mode or 'direct'} ...")
                    r[key][name] = self._accounted(run, app, meshed=bool(mode))
        r["agent_rss_loaded_mb"] = {n: round(sampler.max_by_root[root], 1) for n, root in self.agent_roots.items()}
        r["agent_pss_loaded_mb"] = {n: round(sampler.max_pss_by_root[root], 1)
                                    for n, root in self.agent_roots.items()}
        r["agent_requests_seen"] = self.agent_requests_seen()
        r["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        r["figures"] = figures(r)
        r["figures_by_mode"] = {mode: mode_figures(r["direct"], r["meshed" if i == 0 else mode_key(mode)])
                                for i, mode in enumerate(c.modes)}
        return r


# ---------------------------------------------------------------------------------------------- figures
def mode_key(mode: str) -> str:
    """Where a meshed mode other than the first keeps its results ("meshed" holds the first)."""
    return f"meshed:{mode}"


def mode_figures(d: dict[str, Any], m: dict[str, Any]) -> dict[str, float]:
    """One meshed mode against direct: what the side-by-side mode table shows."""
    f: dict[str, float] = {}
    for s in ("http_fixed_cross", "http_fixed_same"):
        for q in ("p50", "p99"):
            f[f"{s}_added_{q}_ms"] = round(m[s][f"{q}_ms"] - d[s][f"{q}_ms"], 4)
    for s in ("http_sat_cross", "http_sat_same", "grpc_sat"):
        f[f"{s}_ratio"] = round(m[s]["rps"] / d[s]["rps"], 3) if d[s]["rps"] else 0.0
    for s in ("http_sat_cross", "http_sat_same", "http_fixed_same"):
        cpu = m[s]["cpu"]
        f[f"{s}_agent_cpu_s_per_1000"] = m[s].get("agent_cpu_s_per_1000", 0.0)
        f[f"{s}_agent_kernel_share"] = round(cpu["agent_sys_cpu_s"] / cpu["agent_cpu_s"], 3) if cpu["agent_cpu_s"] else 0.0
    f["bulk_mb_s"] = m["bulk"]["mb_per_s"]
    f["bulk_ratio"] = round(m["bulk"]["mb_per_s"] / d["bulk"]["mb_per_s"], 3) if d["bulk"]["mb_per_s"] else 0.0
    f["errors"] = sum(int(m[s].get("errors") or 0) for s in m)
    return f


def render_modes(r: dict[str, Any]) -> list[str]:
    """The meshed modes side by side (issue 14): one column per capture mode, same run."""
    modes = r["config"]["modes"]
    cols = {mode: r["figures_by_mode"][mode] for mode in modes}
    rate = int(r["config"]["http_rate"])
    rows = [(f"added p50 ms, HTTP/1.1 {rate} rps cross", "http_fixed_cross_added_p50_ms", "{:+.3f}"),
            (f"added p99 ms, HTTP/1.1 {rate} rps cross", "http_fixed_cross_added_p99_ms", "{:+.3f}"),
            (f"added p50 ms, HTTP/1.1 {rate} rps same node", "http_fixed_same_added_p50_ms", "{:+.3f}"),
            (f"added p99 ms, HTTP/1.1 {rate} rps same node", "http_fixed_same_added_p99_ms", "{:+.3f}"),
            ("saturation ratio, HTTP/1.1 cross", "http_sat_cross_ratio", "{:.2f}"),
            ("saturation ratio, HTTP/1.1 same node", "http_sat_same_ratio", "{:.2f}"),
            ("saturation ratio, gRPC unary", "grpc_sat_ratio", "{:.2f}"),
            ("agent CPU-s/1000 req, HTTP sat same node", "http_sat_same_agent_cpu_s_per_1000", "{:.4f}"),
            ("  kernel share", "http_sat_same_agent_kernel_share", "{:.0%}"),
            ("agent CPU-s/1000 req, HTTP sat cross", "http_sat_cross_agent_cpu_s_per_1000", "{:.4f}"),
            ("  kernel share", "http_sat_cross_agent_kernel_share", "{:.0%}"),
            (f"agent CPU-s/1000 req, HTTP {rate} rps same", "http_fixed_same_agent_cpu_s_per_1000", "{:.4f}"),
            ("  kernel share", "http_fixed_same_agent_kernel_share", "{:.0%}"),
            ("bulk TCP cross-node MB/s", "bulk_mb_s", "{:.0f}"),
            ("  vs direct", "bulk_ratio", "{:.2f}"),
            ("failed requests (all scenarios)", "errors", "{:d}")]
    w0 = max(len(label) for label, _k, _f in rows)
    widths = [max(12, len(mode)) for mode in modes]
    out = ["capture modes side by side (each against the same direct runs):",
           "  " + "".ljust(w0) + "  " + "  ".join(mode.rjust(w) for mode, w in zip(modes, widths, strict=True))]
    for label, key, fmt in rows:
        cells = [fmt.format(int(cols[mode][key]) if fmt == "{:d}" else cols[mode][key]).rjust(w)
                 for mode, w in zip(modes, widths, strict=True)]
        out.append("  " + label.ljust(w0) + "  " + "  ".join(cells))
    return out


def figures(r: dict[str, Any]) -> dict[str, float]:
    """The headline numbers, flat (what the table, the JSON and the smoke test read)."""
    d, m = r["direct"], r["meshed"]
    f: dict[str, float] = {}
    for s in ("http_fixed_cross", "http_fixed_same", "grpc_fixed", "grpc_sat", "http_sat_cross", "http_sat_same"):
        for q in ("p50", "p99"):
            f[f"{s}_direct_{q}_ms"] = d[s][f"{q}_ms"]
            f[f"{s}_meshed_{q}_ms"] = m[s][f"{q}_ms"]
            f[f"{s}_added_{q}_ms"] = round(m[s][f"{q}_ms"] - d[s][f"{q}_ms"], 4)
    for s in ("http_sat_cross", "http_sat_same", "grpc_sat"):
        f[f"{s}_direct_rps"] = d[s]["rps"]
        f[f"{s}_meshed_rps"] = m[s]["rps"]
        f[f"{s}_ratio"] = round(m[s]["rps"] / d[s]["rps"], 3) if d[s]["rps"] else 0.0
        f[f"{s}_agent_cpu_s_per_1000"] = m[s].get("agent_cpu_s_per_1000", 0.0)
        f[f"{s}_direct_busy_cores"] = d[s]["cpu"]["machine_busy_cores"]
    for s in ("http_fixed_cross", "http_fixed_same", "grpc_fixed"):
        f[f"{s}_agent_cpu_s_per_1000"] = m[s].get("agent_cpu_s_per_1000", 0.0)
    f["bulk_direct_mb_s"] = d["bulk"]["mb_per_s"]
    f["bulk_meshed_mb_s"] = m["bulk"]["mb_per_s"]
    f["bulk_ratio"] = round(m["bulk"]["mb_per_s"] / d["bulk"]["mb_per_s"], 3) if d["bulk"]["mb_per_s"] else 0.0
    f["agent_rss_idle_mb"] = max(r["agent_rss_idle_mb"].values())
    f["agent_rss_loaded_mb"] = max(r["agent_rss_loaded_mb"].values())
    f["agent_pss_idle_mb"] = max(r["agent_pss_idle_mb"].values())
    f["agent_pss_loaded_mb"] = max(r["agent_pss_loaded_mb"].values())
    f["agent_requests_seen"] = r["agent_requests_seen"]
    return f


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def render(r: dict[str, Any]) -> str:
    """The side-by-side table (plain text, aligned)."""
    d, m, f, c = r["direct"], r["meshed"], r["figures"], r["config"]
    rows: list[tuple[str, str, str, str, str]] = []

    def lat(label: str, s: str) -> None:
        for q in ("p50", "p99"):
            rows.append((label if q == "p50" else "", f"{q} ms", _fmt(d[s][f"{q}_ms"]), _fmt(m[s][f"{q}_ms"]),
                         f"added {f[f'{s}_added_{q}_ms']:+.3f} ms"))

    def thr(label: str, s: str, unit: str = "req/s") -> None:
        rows.append((label, unit, _fmt(d[s]["rps"], 0), _fmt(m[s]["rps"], 0), f"ratio {f[f'{s}_ratio']:.2f}"))

    rate = int(c["http_rate"])
    lat(f"HTTP/1.1 {rate} rps, cross-node", "http_fixed_cross")
    lat(f"HTTP/1.1 {rate} rps, same node", "http_fixed_same")
    thr("HTTP/1.1 saturation (wrk), cross", "http_sat_cross")
    lat("", "http_sat_cross")
    thr("HTTP/1.1 saturation (wrk), same", "http_sat_same")
    lat("", "http_sat_same")
    thr(f"gRPC unary saturation (c={c['grpc_concurrency']})", "grpc_sat")
    lat("", "grpc_sat")
    lat(f"gRPC unary {int(c['grpc_rate'])} rps", "grpc_fixed")
    rows.append(("bulk TCP cross-node", "MB/s", _fmt(d["bulk"]["mb_per_s"], 0), _fmt(m["bulk"]["mb_per_s"], 0),
                 f"ratio {f['bulk_ratio']:.2f}"))
    widths = [max(len(row[i]) for row in rows + [("", "", "direct", "meshed", "")]) for i in range(5)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(("scenario", "", "direct", "meshed", "meshed vs direct"),
                                                    widths, strict=True))]
    lines.append("-" * len(lines[0]))
    for row in rows:
        lines.append("  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]),
                                row[3].rjust(widths[3]), row[4]]))
    lines.append("")
    lines.append("agent CPU-seconds per 1000 requests (both nodes' agents, parent + workers; saturation runs are"
                 " the headline, fixed-rate runs pay more wake-ups per request):")
    rate, grate = int(c["http_rate"]), int(c["grpc_rate"])
    for s, label in (("http_sat_cross", "HTTP/1.1 saturation, cross-node (2 agents)"),
                     ("http_sat_same", "HTTP/1.1 saturation, same node (1 agent)"),
                     ("grpc_sat", "gRPC unary saturation, cross-node (2 agents)"),
                     ("http_fixed_cross", f"HTTP/1.1 at {rate} rps, cross-node (2 agents)"),
                     ("http_fixed_same", f"HTTP/1.1 at {rate} rps, same node (1 agent)"),
                     ("grpc_fixed", f"gRPC unary at {grate} rps, cross-node (2 agents)")):
        cpu = m[s]["cpu"]
        kernel = cpu["agent_sys_cpu_s"] / cpu["agent_cpu_s"] if cpu["agent_cpu_s"] else 0.0
        lines.append(f"  {label:48s} {f[f'{s}_agent_cpu_s_per_1000']:.4f}  ({kernel:.0%} of it kernel time)")
    lines.append("agent RSS MB (parent + workers, per node agent): idle "
                 + ", ".join(f"{n} {v:.1f}" for n, v in r["agent_rss_idle_mb"].items())
                 + "; under load (max) " + ", ".join(f"{n} {v:.1f}" for n, v in r["agent_rss_loaded_mb"].items()))
    lines.append("  idle RSS per process (parent first): " + "; ".join(
        f"{n} " + " + ".join(f"{v:.1f}" for v in procs.values())
        for n, procs in r["agent_rss_idle_by_process_mb"].items()))
    lines.append("agent PSS MB (real memory: shared pages split between the processes mapping them): idle "
                 + ", ".join(f"{n} {v:.1f}" for n, v in r["agent_pss_idle_mb"].items())
                 + "; under load (max) " + ", ".join(f"{n} {v:.1f}" for n, v in r["agent_pss_loaded_mb"].items()))
    lines.append("  idle PSS per process (parent first): " + "; ".join(
        f"{n} " + " + ".join(f"{v:.1f}" for v in procs.values())
        for n, procs in r["agent_pss_idle_by_process_mb"].items()))
    lines.append(f"requests the agents counted (request_total, both directions): {r['agent_requests_seen']}")
    lines.append("")
    lines.append(f"CPU used during each run, in cores of {d['http_sat_cross']['cpu']['machine_cores']} (client, "
                 "server and agents share them; 'others' is everything else on the machine):")
    lines.append(f"  {'':16s} {'':6s} {'machine':>7s} {'client':>7s} {'server':>7s} {'agents':>7s} {'others':>7s}")
    for s in ("http_fixed_cross", "http_fixed_same", "http_sat_cross", "http_sat_same", "grpc_sat", "grpc_fixed",
              "bulk"):
        for mode, res in (("direct", d), ("meshed", m)):
            cpu = res[s]["cpu"]
            w = cpu["wall_s"] or 1.0
            lines.append(f"  {s:16s} {mode:6s} {cpu['machine_busy_cores']:7.2f} {cpu['client_cpu_s'] / w:7.2f} "
                         f"{cpu['server_cpu_s'] / w:7.2f} {cpu['agent_cpu_s'] / w:7.2f} "
                         f"{cpu['others_busy_cores']:7.2f}")
    if len(c.get("modes", ())) > 1:
        lines.append("")
        lines.extend(render_modes(r))
    lines.append(f"load average at start {' '.join(r['loadavg_start'])}, at end {' '.join(r['loadavg_end'])}")
    warn = _warnings(r)
    if warn:
        lines.append("")
        lines.extend(f"note: {w}" for w in warn)
    return "\n".join(lines)


def _warnings(r: dict[str, Any]) -> list[str]:
    out = []
    c = r["config"]
    for mode in ("direct", "meshed"):
        for s, rate in (("http_fixed_cross", c["http_rate"]), ("http_fixed_same", c["http_rate"]),
                        ("grpc_fixed", c["grpc_rate"])):
            res = r[mode][s]
            if res["rps"] < 0.95 * rate:
                out.append(f"{mode} {s}: achieved {res['rps']:.0f} of {rate:.0f} rps (machine too busy?)")
            if res["late"] > 0.01 * max(1, res["requests"]):
                out.append(f"{mode} {s}: {res['late']} requests waited for a busy connection (charged)")
        for s in ("http_fixed_cross", "http_fixed_same", "http_sat_cross", "http_sat_same", "grpc_sat", "grpc_fixed"):
            if r[mode][s].get("errors"):
                out.append(f"{mode} {s}: {r[mode][s]['errors']} failed requests")
    if not r.get("agent_requests_seen"):
        out.append("the agents counted no requests: the meshed runs did not go through the mesh")
    return out


def run_bench(cfg: BenchConfig, name: str | None = None) -> dict[str, Any]:
    """Bring up a sandbox, run everything, tear it down (also on Ctrl-C or failure)."""
    from nodemesh.sandbox.testing import running_sandbox

    workdir = Path(tempfile.mkdtemp(prefix="nodemesh-bench-"))
    try:
        cfg.log("bench: bringing up a 2-node sandbox (bridge CNI) ...")
        with running_sandbox(nodes=2, cni="bridge", manifests=[manifests(workdir)], timeout=60,
                             name=name) as sb:
            return Bench(sb, cfg).run()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


__all__ = ["Bench", "BenchConfig", "figures", "parse_wrk", "render", "run_bench"]
