"""What any user-space proxy costs per request at a fixed rate on this machine (issue 18's floor).

    sudo python3 tests/bench/proxy_floor.py [--rate 1000] [--seconds 8] [--conns 20] [--rounds 3] [--json OUT]
    sudo python3 tests/bench/proxy_floor.py --load sat|bulk ...   # saturation / bulk ratios to direct
    sudo python3 tests/bench/proxy_floor.py --load grpc --rate 300 --conns 16 \
        --proxies nodemesh,nodemesh-tcp,python-l4                    # gRPC unary at a fixed rate

Issue 18 asks for <= 0.05 agent CPU-s per 1000 HTTP/1.1 requests at a fixed 1000 rps; the agent
costs ~0.18 on this VM, and the profile says most of it is the two wake-ups per request (one for
the request, one for the response), not the Python path. This bench asks what the same two
wake-ups cost a proxy written in C, and one with no logic at all, on the same packets: the
agent tests' three namespaces (client -> proxy namespace, which REDIRECTs every TCP connection to
port 4140 as a node does -> server, nginx serving a 17-byte page), and in the proxy namespace,
one at a time, interleaved over rounds (order reversed every other round):

  direct          no proxy: the connection is routed through (what the others add to)
  nodemesh        the agent, one worker (`python3 -m nodemesh.agent --workers 1`): HTTP/1.1
                  detected, parsed, counted per request
  nodemesh-tcp    the same agent told port 80 is opaque (`--opaque-ports 80`): its relay, capture
                  and per-connection accounting without HTTP parsing or per-request telemetry
                  (not in the default list: --proxies nodemesh,nodemesh-tcp,...)
  nodemesh@DIR    the agent imported from DIR (a folder holding `nodemesh/`): A/B of two trees
  nginx-l7        nginx, one worker, `proxy_pass` to the server with upstream keep-alive: a C HTTP
                  proxy that parses every request and response
  nginx-l4        nginx `stream` proxy (if its module is installed): C, bytes only
  python-l4       a zero-logic asyncio relay on uvloop (two Protocols copying bytes): the floor of
                  a Python event loop with no parsing, no counting

The client is the bench's open-loop generator (tests/bench/openloop.py) on --conns keep-alive
connections. Per run: the proxy's CPU seconds per 1000 requests (its processes' scheduler time,
/proc/PID/schedstat), kernel share, voluntary context switches per request (the wake-ups), and
p50/p99 added to the direct run of the same round. Numbers, not pass/fail; a warning when the
generator itself fell behind (a busy machine batches requests and makes every proxy look cheap).

`--load grpc`: the same rows for gRPC unary instead of HTTP/1.1: the full bench's peers
(tests/bench/grpcpeer.py, grpcio on both ends) with the server on port 9090 of the server
namespace and the client as one channel (one HTTP/2 connection) at --rate with --conns RPCs in
flight at most. The agent classifies it as HTTP/2 (`nodemesh`), or relays it opaque
(`nodemesh-tcp`, port 9090 opaque); `python-l4` relays to port 9090. grpcio writes requests,
responses, trailers, WINDOW_UPDATEs and PINGs separately: each is a wake-up for every proxy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "integration" / "agent"))

import procstat
from agent_traffic_net import (
    AGENT_CLIENT_SIDE,
    SERVER_IP,
    Topology,
    start_nginx,
    topology,
    wait_port,
)

PORT = 4140
GRPC_PORT = 9090  # --load grpc: tests/bench/grpcpeer.py serves here in the server namespace
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")

LOAD = r"""
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
import uvloop
from openloop import fixed_rate
host, rate, seconds, conns = sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
REQ = b"GET / HTTP/1.1\r\nHost: web\r\nUser-Agent: floor\r\nAccept: */*\r\n\r\n"
def keepalive():
    state = {}
    async def send():
        try:
            if "w" not in state:
                state["r"], state["w"] = await asyncio.wait_for(asyncio.open_connection(host, 80), 5)
            state["w"].write(REQ)
            head = await asyncio.wait_for(state["r"].readuntil(b"\r\n\r\n"), 5)
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await asyncio.wait_for(state["r"].readexactly(length), 5)
            return head.startswith(b"HTTP/1.1 200")
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, IndexError, ValueError):
            state.pop("w", None)
            return False
    return send
async def main():
    print(json.dumps(await fixed_rate([keepalive() for _ in range(conns)], rate, seconds, 2.0)))
uvloop.install()
asyncio.run(main())
"""

RELAY = r"""
import asyncio, sys
import uvloop
UP = (sys.argv[1], int(sys.argv[3]) if len(sys.argv) > 3 else 80)
class Side(asyncio.Protocol):
    def __init__(self, peer=None):
        self.peer, self.t, self.pending = peer, None, []
    def connection_made(self, t):
        self.t = t
        t.get_extra_info("socket").setsockopt(6, 1, 1)
        if self.peer is None:
            asyncio.ensure_future(self.dial())
        else:
            self.peer.peer = self
            for d in self.peer.pending:
                t.write(d)
            self.peer.pending = []
    async def dial(self):
        try:
            await asyncio.get_running_loop().create_connection(lambda: Side(self), *UP)
        except OSError:
            self.t.close()
    def data_received(self, d):
        if self.peer is None or self.peer.t is None:
            self.pending.append(d)
        else:
            self.peer.t.write(d)
    def connection_lost(self, exc):
        if self.peer is not None and self.peer.t is not None:
            self.peer.t.close()
async def main():
    server = await asyncio.get_running_loop().create_server(Side, "0.0.0.0", int(sys.argv[2]), backlog=1024)
    await server.serve_forever()
uvloop.install()
asyncio.run(main())
"""

# One worker process, in the foreground, its files in {dir}: both nginx proxies.
NGINX_PROCESS = """
user root;
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
"""

NGINX_L7 = NGINX_PROCESS + """http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    upstream server {{ server {server}:80; keepalive 64; keepalive_requests 1000000; }}
    server {{
        listen 0.0.0.0:{port};
        location / {{
            proxy_pass http://server;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
        }}
    }}
}}
"""

NGINX_L4 = "load_module {module};" + NGINX_PROCESS + """stream {{
    server {{ listen 0.0.0.0:{port}; proxy_pass {server}:80; }}
}}
"""


def schedstat_ns(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def switches(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
            except OSError:
                pass
    return total


def set_redirect(t: Topology, on: bool) -> None:
    rule = ["-t", "nat", "PREROUTING", "-i", f"{t.prefix}a0", "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(PORT)]
    present = t.run(t.agent, "iptables", "-t", "nat", "-C", *rule[2:], check=False).returncode == 0
    if on and not present:
        t.run(t.agent, "iptables", "-t", "nat", "-A", *rule[2:])
    elif not on and present:
        t.run(t.agent, "iptables", "-t", "nat", "-D", *rule[2:])


def start_proxy(kind: str, t: Topology, tmp: Path, upstream_port: int = 80) -> list[int]:
    """Start `kind` in the proxy namespace; the pids whose CPU is the proxy's."""
    base, _, tree = kind.partition("@")
    if base in ("nodemesh", "nodemesh-tcp"):
        # As the agent tests start it (agent_traffic_net.start_agent) but without --event-log,
        # which writes a JSON line per request event: a debugging aid a node does not run.
        # `nodemesh@DIR`: the agent from another tree (DIR/nodemesh), for A/B of a change.
        log = tmp / f"agent-{time.monotonic_ns()}.log"
        env = {**os.environ, "PYTHONPATH": tree} if tree else None
        with open(log, "wb") as err:
            proc = t.exec(t.agent, sys.executable, "-m", "nodemesh.agent", "--node", "n1", "--node-ip",
                          AGENT_CLIENT_SIDE, "--pod-cidr", "10.201.1.0/24", "--workers", "1",
                          "--log-level", "info", *(["--opaque-ports", str(upstream_port)] if base == "nodemesh-tcp" else []),
                          stdout=subprocess.DEVNULL, stderr=err, env=env)
        deadline = time.monotonic() + 30
        while "event=agent_ready" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"agent did not become ready:\n{log.read_text(errors='replace')}")
            time.sleep(0.1)
        return [proc.pid]  # `ip netns exec` execs: the agent's parent; tree_pids adds its worker
    if kind in ("nginx-l7", "nginx-l4"):
        d = tmp / kind
        d.mkdir(exist_ok=True)
        conf = (NGINX_L7 if kind == "nginx-l7" else NGINX_L4).format(dir=d, server=SERVER_IP, port=PORT,
                                                                      module=STREAM_MODULE)
        (d / "nginx.conf").write_text(conf)
        proc = t.exec(t.agent, "nginx", "-c", str(d / "nginx.conf"), stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    else:
        proc = t.exec(t.agent, sys.executable, "-c", RELAY, SERVER_IP, str(PORT), str(upstream_port),
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(t, t.agent, "127.0.0.1", PORT)
    return [proc.pid]


def run_load(t: Topology, args: argparse.Namespace, pids: list[int]) -> dict[str, Any]:
    tree = [p for root in pids for p in procstat.tree_pids(root)]
    cpu0, k0 = procstat.cpu_split(tree) if tree else (0.0, 0.0)
    ns0, sw0 = schedstat_ns(tree), switches(tree)
    if args.load == "fixed":
        res = t.run(t.client, sys.executable, "-c", LOAD, str(HERE), SERVER_IP, str(args.rate), str(args.seconds),
                    str(args.conns), timeout=args.seconds + 120, check=False)
    elif args.load == "grpc":
        res = t.run(t.client, sys.executable, str(HERE / "grpcpeer.py"), "load", "--target",
                    f"{SERVER_IP}:{GRPC_PORT}", "--rate", str(args.rate), "--duration", str(args.seconds),
                    "--concurrency", str(args.conns), timeout=args.seconds + 120, check=False)
    else:  # wrk, closed loop: as many requests as the path takes (sat), or the 3 MB file (bulk)
        path, conns = ("/", "50") if args.load == "sat" else ("/big.bin", "2")
        res = t.run(t.client, "wrk", "-t1", "-c", conns, "-d", f"{args.seconds:g}s", f"http://{SERVER_IP}{path}",
                    timeout=args.seconds + 120, check=False)
    ns1, sw1 = schedstat_ns(tree), switches(tree)
    cpu1, k1 = procstat.cpu_split(tree) if tree else (0.0, 0.0)
    if res.returncode != 0:
        raise SystemExit(f"load failed: {res.stderr[-2000:]}")
    out: dict[str, Any] = (json.loads(res.stdout.strip().splitlines()[-1]) if args.load in ("fixed", "grpc")
                           else _wrk(res.stdout, args.seconds))
    total = max(int(out["total_requests"]), 1)
    cpu = (ns1 - ns0) / 1e9
    out["proxy_cpu_s_per_1k_req"] = round(cpu / total * 1000, 4)
    out["proxy_cores"] = round(cpu / args.seconds, 3)
    ticks = (cpu1 - cpu0) + (k1 - k0)
    out["kernel_share"] = round((k1 - k0) / ticks, 2) if ticks > 0 else None
    out["wakeups_per_req"] = round((sw1 - sw0) / total, 2)
    out["processes"] = len(tree)
    return out


def _wrk(text: str, seconds: float) -> dict[str, Any]:
    """wrk's summary as the fixed-rate rows' fields (+ MB/s)."""
    out: dict[str, Any] = {"late": 0, "p50_ms": 0.0, "p99_ms": 0.0}
    for line in text.splitlines():
        words = line.split()
        if "requests in" in line:
            out["total_requests"] = int(words[0])
        elif line.startswith("Requests/sec:"):
            out["rps"] = float(words[1])
        elif line.startswith("Transfer/sec:"):
            value, unit = float(words[1][:-2]), words[1][-2:]
            out["mb_s"] = round(value * {"KB": 1 / 1024, "MB": 1.0, "GB": 1024.0}.get(unit, 1 / 1024 / 1024), 1)
        elif line.strip().startswith("Latency") and len(words) >= 2:
            v = words[1]
            out["p50_ms"] = float(v[:-2]) if v.endswith("ms") else float(v[:-2]) / 1000 if v.endswith("us") \
                else float(v[:-1]) * 1000  # wrk's mean, not p50: closed loop has no fixed schedule
    out.setdefault("total_requests", 0)
    out["requests"] = out["total_requests"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--conns", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--proxies", default="nodemesh,nginx-l7,nginx-l4,python-l4")
    ap.add_argument("--load", choices=("fixed", "sat", "bulk", "grpc"), default="fixed",
                    help="fixed: --rate over --conns keep-alive connections (default); sat: wrk -c50 "
                         "closed loop, requests/s; bulk: wrk -c2 on a 3 MB file, MB/s; grpc: gRPC "
                         "unary at --rate, --conns in flight on one channel (grpcpeer.py)")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("root needed (network namespaces)")
    proxies = [p for p in args.proxies.split(",") if p]
    if "nginx-l4" in proxies and not STREAM_MODULE.exists():
        print(f"# nginx-l4 skipped: {STREAM_MODULE} is not installed (apt: libnginx-mod-stream)", file=sys.stderr)
        proxies.remove("nginx-l4")
    tmp = Path(tempfile.mkdtemp(prefix="nm-floor-"))
    rows: list[dict[str, Any]] = []
    print(f"# load average at start: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    try:
        with topology() as t:
            start_nginx(t, tmp)
            upstream_port = 80
            if args.load == "grpc":
                t.exec(t.server, sys.executable, str(HERE / "grpcpeer.py"), "serve", "--port", str(GRPC_PORT),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wait_port(t, t.server, SERVER_IP, GRPC_PORT)
                upstream_port = GRPC_PORT
            set_redirect(t, False)
            run_load(t, args, [])  # warm-up: the first run's tail is the machine's, not a proxy's
            for rnd in range(args.rounds):
                set_redirect(t, False)
                direct = run_load(t, args, [])
                direct.update(proxy="direct", round=rnd)
                rows.append(direct)
                print(json.dumps(direct), flush=True)
                order = proxies if rnd % 2 == 0 else list(reversed(proxies))
                for kind in order:
                    set_redirect(t, True)
                    before = len(t.procs)
                    pids = start_proxy(kind, t, tmp, upstream_port)
                    time.sleep(1.0)
                    row = run_load(t, args, pids)
                    row.update(proxy=kind, round=rnd,
                               added_p50_ms=round(row["p50_ms"] - direct["p50_ms"], 3),
                               added_p99_ms=round(row["p99_ms"] - direct["p99_ms"], 3))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    for proc in t.procs[before:]:
                        proc.terminate()
                    for proc in t.procs[before:]:
                        try:
                            proc.wait(timeout=10)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                            proc.wait()
                    del t.procs[before:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"# load average at end: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    late = max(r["late"] / max(r["total_requests"], 1) for r in rows) if rows else 0.0
    if late > 0.01:
        # The generator itself fell behind (a busy machine): requests went out in bursts, a
        # wake-up then served several, and CPU per request reads low. Such runs measure nothing.
        print(f"# WARNING: up to {late:.0%} of requests were sent late: the machine is too busy for this bench",
              file=sys.stderr)
    if args.load in ("sat", "bulk"):
        field = "rps" if args.load == "sat" else "mb_s"
        unit = "CPU ms/1000 req" if args.load == "sat" else "CPU ms/MB"
        print(f"\n{'proxy':<20} {field + ' (each round)':<34} {'of direct (each round)':<26} {'proxy cores':<18} {unit}")
        directs = {r["round"]: r[field] for r in rows if r["proxy"] == "direct"}
        for kind in ["direct", *proxies]:
            mine = [r for r in rows if r["proxy"] == kind]
            vals = " ".join(f"{r.get(field, 0):.0f}" for r in mine)
            ratio = " ".join(f"{r.get(field, 0) / max(directs.get(r['round'], 1), 1e-9):.2f}" for r in mine)
            cores = " ".join(f"{r['proxy_cores']:.2f}" for r in mine)
            per = " ".join(f"{r['proxy_cores'] * 1000 / max(r.get(field, 0), 1e-9) * (1000 if args.load == 'sat' else 1):.2f}"
                           for r in mine)
            print(f"{kind:<20} {vals:<34} {ratio:<26} {cores:<18} {per}")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return
    print(f"\n{'proxy':<10} {'CPU-s/1000 req (each round)':<30} {'wakeups/req':>11} {'kernel':>7} "
          f"{'added p50 ms':>13} {'added p99 ms':>13}")
    for kind in ["direct", *proxies]:
        mine = [r for r in rows if r["proxy"] == kind]
        if not mine:
            continue
        cpu = " ".join(f"{r['proxy_cpu_s_per_1k_req']:.3f}" for r in mine)
        wake = sorted(r["wakeups_per_req"] for r in mine)[len(mine) // 2]
        kern = sorted((r["kernel_share"] or 0) for r in mine)[len(mine) // 2]
        p50 = sorted(r.get("added_p50_ms", 0.0) for r in mine)[len(mine) // 2]
        p99 = sorted(r.get("added_p99_ms", 0.0) for r in mine)[len(mine) // 2]
        print(f"{kind:<10} {cpu:<30} {wake:>11} {kern:>7} {p50:>13} {p99:>13}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
