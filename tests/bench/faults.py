"""nodemesh fault bench: issue 12's data-path rows, DIRECT (no capture) vs MESHED, in one run (root).

    python3 tests/bench/faults.py [--json OUT] [--name NAME] [--workers N]

A 2-node sandbox (bridge CNI) with an echo server, nginx and a client pod on each node; the agents
run throughout and capture is switched on and off around each scenario (bench.Bench does both, as
in run.py). Every row is measured both ways back to back and printed side by side: failures, how
long it took, and what the nodes' kernels counted. Never pass/fail: tests/integration/faults asserts.
The peers are tests/integration/faults/faults_peers.py. docs/bench.md explains every row.

Run it once with PYTHONPATH at the code to judge and once at the code before (the agents and the
redirectors are started with the caller's PYTHONPATH) for a before/after table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "support")]  # bench.py; the test inputs (tests/support)
import bench

PEERS = str(HERE.parent / "integration" / "faults" / "faults_peers.py")
PY = sys.executable
NS = bench.NS
ECHO_PORT, NGINX_PORT, NGINX_H2_PORT = 9000, 8080, 8081
NGINX_CONF = """
user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log crit;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 100000;
    default_type text/plain;
    server {{
        listen 8080 backlog=8192;
        listen 8081 http2 backlog=8192;
        location = /ok {{ return 200 "ok\\n"; }}
        location / {{ return 200 "root\\n"; }}
    }}
}}
"""


def manifests(workdir: Path) -> str:
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=workdir))
    return (f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n"
            + bench._deployment("client", ["sleep", "infinity"], None, replicas=2)
            + bench._deployment("echo", [PY, PEERS, "echo-server", str(ECHO_PORT)], ECHO_PORT)
            + bench._deployment("nginx", ["nginx", "-c", str(conf), "-p", str(workdir)], NGINX_PORT))


def netstat(sb: Any, node: str) -> dict[str, int]:
    out = sb.node_exec(node, ["cat", "/proc/net/netstat"], capture_output=True, text=True, timeout=10).stdout
    lines = out.splitlines()
    for head, values in zip(lines[::2], lines[1::2]):
        if head.startswith("TcpExt:"):
            return {k: int(v) for k, v in zip(head.split()[1:], values.split()[1:])}
    return {}


class FaultBench:
    def __init__(self, sb: Any, b: bench.Bench) -> None:
        self.sb = sb
        self.b = b
        self.place = b.place
        self.nodes = [n.name for n in sb.nodes()]
        self.node_ip = {n.name: n.ip for n in sb.nodes()}

    def peer(self, pod: str, *args: object, timeout: float = 600) -> dict[str, Any]:
        return self.b._json_in_pod(pod, [PY, PEERS, *map(str, args)], timeout)

    def kernel(self, run: Callable[[], dict[str, Any]], *counters: str) -> dict[str, Any]:
        """Run, and add how much the nodes' TcpExt counters moved meanwhile."""
        before = {n: netstat(self.sb, n) for n in self.nodes}
        out = run()
        time.sleep(1.5)  # a stalled SYN is retried after 1 s
        after = {n: netstat(self.sb, n) for n in self.nodes}
        for c in counters:
            out[c] = sum(after[n].get(c, 0) - before[n].get(c, 0) for n in self.nodes)
        return out

    # ---- rows: each returns a dict of figures for the mode it runs in
    def storm(self, route: str, mode: str) -> dict[str, Any]:
        client = self.place.same("echo") if route == "same" else self.place.cross("echo")
        return self.kernel(lambda: self.peer(client, "connects", self.place.server_ip["echo"], ECHO_PORT, 8000, 50,
                                             20, mode), "TCPSYNChallenge", "TCPSynRetrans")

    def burst(self, route: str) -> dict[str, Any]:
        client = self.place.same("echo") if route == "same" else self.place.cross("echo")
        return self.kernel(lambda: self.peer(client, "burst", self.place.server_ip["echo"], ECHO_PORT, 2000, 30),
                           "ListenOverflows")

    def idle(self, meshed: bool) -> dict[str, Any]:
        client = self.place.same("echo")
        hold = Path(f"/tmp/nodemesh-faultbench-{os.getpid()}-{int(time.time() * 1000)}")
        pss = self.b.agent_pss
        before = pss()
        proc = __import__("subprocess").Popen(
            ["ip", "netns", "exec", self.sb.pod_netns(NS, client), PY, PEERS, "idle", self.place.server_ip["echo"],
             str(ECHO_PORT), "10150", "200", str(hold), "30"], stdout=-1, stderr=-1, text=True)
        opened = Path(str(hold) + ".open")
        deadline = time.monotonic() + 300
        while not opened.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)
        held = pss()
        hold.write_text("go")
        out = json.loads(proc.communicate(timeout=300)[0].strip().splitlines()[-1])
        for p in (hold, opened):
            p.unlink(missing_ok=True)
        time.sleep(4)
        after = pss()
        if meshed:
            out["agent_pss_mb"] = {"before": before, "held": held, "after": after}
        return out

    def slowloris(self) -> dict[str, Any]:
        attacker, victim = self.place.same("nginx"), self.place.cross("nginx")
        ip = self.place.server_ip["nginx"]
        alone = self.peer(victim, "http-load", ip, NGINX_PORT, "/ok", 8, 5)
        proc = __import__("subprocess").Popen(
            ["ip", "netns", "exec", self.sb.pod_netns(NS, attacker), PY, PEERS, "slowloris", ip, str(NGINX_PORT),
             "2000", "30"], stdout=-1, stderr=-1, text=True)
        time.sleep(3)
        during = self.peer(victim, "http-load", ip, NGINX_PORT, "/ok", 8, 5)
        slow = json.loads(proc.communicate(timeout=120)[0].strip().splitlines()[-1])
        return {"slow_ends": slow["ends"], "slow_ended_max_s": slow["ended_max_s"], "other_pod_rps_alone": alone["rps"],
                "other_pod_rps_during": during["rps"], "other_pod_failed": {**alone["failed"], **during["failed"]}}

    def transparency(self, direct: dict[str, tuple[str, str]] | None) -> dict[str, Any]:
        """Raw payloads to nginx from the client on nginx's node; meshed answers are compared with
        the direct ones of the same run (Date headers aside)."""
        from transparency_inputs import HTTP1, HTTP2, normalize  # the same 17 inputs as the test

        client = self.place.same("nginx")
        answers: dict[str, tuple[str, str]] = {}
        for case, payload in {**HTTP1, **HTTP2}.items():
            port = NGINX_PORT if case in HTTP1 else NGINX_H2_PORT
            res = self.sb.exec(NS, client, [PY, PEERS, "raw", self.place.server_ip["nginx"], str(port), "-", "2"],
                               input=payload.hex(), capture_output=True, text=True, timeout=60)
            out = json.loads(res.stdout.strip().splitlines()[-1])
            answers[case] = (normalize(bytes.fromhex(out["got"])).hex(), out["end"])
        result: dict[str, Any] = {"answers": answers}
        if direct is not None:
            differ = [c for c in answers if answers[c] != direct[c]]
            result.update({"cases": len(answers), "same_as_nginx": len(answers) - len(differ), "differ": differ})
        return result

    def scrape(self) -> dict[str, Any]:
        """/ready probed every 20 ms, first alone, then while two scrapers fetch /metrics back to back
        (the node that carries most series). 1,500 distinct Host headers first, to grow /metrics."""
        ip = self.place.server_ip["nginx"]
        for client in self.place.client_on.values():
            self.peer(client, "many-hosts", ip, NGINX_PORT, 750, 8)
        node = self.place.server_node["nginx"]
        base = f"http://{self.node_ip[node]}:{bench.ADMIN_PORT}"

        def get(path: str) -> tuple[int, float]:
            t0 = time.monotonic()
            with urllib.request.urlopen(base + path, timeout=60) as resp:
                n = len(resp.read())
            return n, time.monotonic() - t0

        def probe(seconds: float, busy: Callable[[], bool]) -> list[float]:
            out, stop = [], time.monotonic() + seconds
            while time.monotonic() < stop or busy():
                out.append(get("/ready")[1])
                time.sleep(0.02)
                if not busy() and time.monotonic() >= stop:
                    break
            return sorted(out)

        quiet = probe(4, lambda: False)
        stop = time.monotonic() + 8
        scrapes: list[tuple[int, float]] = []

        def scraper() -> None:
            while time.monotonic() < stop:
                scrapes.append(get("/metrics"))

        threads = [threading.Thread(target=scraper) for _ in range(2)]
        for t in threads:
            t.start()
        loud = probe(0, lambda: any(t.is_alive() for t in threads))
        for t in threads:
            t.join()
        pct = lambda xs, q: round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 1)
        return {"metrics_mb": round(max(s for s, _ in scrapes) / 1e6, 1), "metrics_slowest_s": round(max(d for _, d in scrapes), 2),
                "ready_ms_alone_p50_max": (pct(quiet, 0.5), pct(quiet, 1)),
                "ready_ms_scraped_p50_max": (pct(loud, 0.5), pct(loud, 1))}

    def run(self, log: Callable[[str], None]) -> dict[str, Any]:
        r: dict[str, Any] = {"direct": {}, "meshed": {}}
        log("faults: starting the agents ...")
        self.b.start_agents()
        rows: list[tuple[str, Callable[[bool], dict[str, Any]]]] = [
            ("storm_same_echo", lambda m: self.storm("same", "echo")),
            ("storm_cross_echo", lambda m: self.storm("cross", "echo")),
            ("storm_cross_close", lambda m: self.storm("cross", "close")),
            ("burst_same", lambda m: self.burst("same")),
            ("burst_cross", lambda m: self.burst("cross")),
            ("idle_10k_same", self.idle),
            ("slowloris", lambda m: self.slowloris()),
        ]
        captured = False
        for name, row in rows:
            for mode in (("meshed", "direct") if captured else ("direct", "meshed")):
                if (mode == "meshed") != captured:
                    captured = mode == "meshed"
                    self.b.capture(captured)
                log(f"faults: {name}: {mode} ...")
                r[mode][name] = row(captured)
        if captured:
            self.b.capture(False)
        log("faults: transparency: direct ...")
        r["direct"]["transparency"] = self.transparency(None)
        self.b.capture(True)
        log("faults: transparency: meshed ...")
        r["meshed"]["transparency"] = self.transparency(r["direct"]["transparency"]["answers"])
        log("faults: scrape: meshed ...")
        r["meshed"]["scrape"] = self.scrape()
        self.b.capture(False)
        return r


def render(r: dict[str, Any]) -> str:
    d, m = r["direct"], r["meshed"]
    out = [f"{'row':<34}{'direct':>30}{'meshed':>38}", "-" * 102]

    def row(label: str, a: object, b: object) -> None:
        out.append(f"{label:<34}{a!s:>30}{b!s:>38}")

    for name in ("storm_same_echo", "storm_cross_echo", "storm_cross_close"):
        for k in ("failed", "seconds", "exchanges_over_1s", "TCPSYNChallenge", "TCPSynRetrans"):
            row(f"{name} {k}", d[name].get(k), m[name].get(k))
    for name in ("burst_same", "burst_cross"):
        for k in ("failed", "seconds", "ListenOverflows"):
            row(f"{name} {k}", d[name].get(k), m[name].get(k))
    for k in ("open", "failed", "after_idle_failed", "open_seconds"):
        row(f"idle_10k_same {k}", d["idle_10k_same"].get(k), m["idle_10k_same"].get(k))
    pss = m["idle_10k_same"].get("agent_pss_mb", {})
    if pss:
        row("idle_10k_same agent PSS MB", "-", " / ".join(str(sum(pss[k].values())) for k in ("before", "held", "after")))
    for k in ("slow_ends", "slow_ended_max_s", "other_pod_rps_alone", "other_pod_rps_during", "other_pod_failed"):
        row(f"slowloris {k}", d["slowloris"].get(k), m["slowloris"].get(k))
    t = m["transparency"]
    row("transparency answers as nginx's", "-", f"{t['same_as_nginx']} of {t['cases']}")
    if t["differ"]:
        out.append(f"  differ: {', '.join(t['differ'])}")
    s = m["scrape"]
    row("/ready ms p50,max (alone)", "-", s["ready_ms_alone_p50_max"])
    row("/ready ms p50,max (scraped)", "-", f"{s['ready_ms_scraped_p50_max']} ({s['metrics_mb']} MB, "
        f"{s['metrics_slowest_s']} s)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from nodemesh.sandbox.testing import running_sandbox

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--name")
    ap.add_argument("--workers", type=int)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("error: the fault bench builds network namespaces: run it as root", file=sys.stderr)
        return 1
    cfg = bench.BenchConfig.make(agent_workers=args.workers)
    workdir = Path(__import__("tempfile").mkdtemp(prefix="nodemesh-faultbench-"))
    t0 = time.monotonic()
    try:
        cfg.log("faults: bringing up a 2-node sandbox (bridge CNI) ...")
        with running_sandbox(nodes=2, cni="bridge", manifests=[manifests(workdir)], timeout=90,
                             name=args.name) as sb:
            results = FaultBench(sb, bench.Bench(sb, cfg)).run(cfg.log)
    finally:
        __import__("shutil").rmtree(workdir, ignore_errors=True)
    import nodemesh

    results["agent_code"] = str(Path(nodemesh.__file__).resolve().parent)
    print(f"agent code: {results['agent_code']}")
    print(render(results))
    print(f"(whole run {time.monotonic() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
