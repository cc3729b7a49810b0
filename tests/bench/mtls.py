"""mTLS on vs off vs no mesh, in one run (issue 13): cross-node HTTP/1.1 at a fixed rate.

A 2-node sandbox: `web` (an HTTP/1.1 server, asyncio + httptools-free: the stdlib's
ThreadingHTTPServer is too slow at 1000 rps on this machine, so a tiny asyncio server) on node2,
the load generator in a pod on node1. Four phases on the same cluster: direct (no mesh
installed), mesh without mTLS, mesh with `--mtls` (connections multiplexed as streams on one
carrier per pod pair, agent/mux.py: the default), and mesh with `--mtls --no-tunnel-mux` (a TLS
session per connection). Each phase runs two loads:

  keepalive  RATE req/s over CONNS keep-alive connections (open loop, tests/bench/openloop.py):
             the data path's cost (one tunnel per connection, opened once)
  newconn    NEW_RATE req/s, a new connection per request: the tunnel's setup cost (mux: a
             stream's OPEN frame on the pod pair's carrier; per-connection: a TLS 1.3 handshake,
             a full one for the pod pair's first and a resumed one after: agent/tunnel.py)

Reported: p50/p99 (ms), errors, and the agents' CPU seconds (both nodes, parent + workers) per
1000 requests. Run as root:  python3 tests/bench/mtls.py [--rate 1000] [--seconds 10]
[--phases direct,mesh,mesh+mtls,mesh+mtls-perconn] [--repeat N: the mTLS phases N times, interleaved]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from procstat import cpu_seconds, tree_pids

NS = "mb"
PHASES = ("direct", "mesh", "mesh+mtls", "mesh+mtls-perconn")
PY = sys.executable

SERVER = r"""
import asyncio, sys
BODY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t; self.buf = b""
    def data_received(self, d):
        self.buf += d
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0: return
            self.buf = self.buf[i + 4:]
            self.t.write(BODY)
async def main():
    s = await asyncio.get_running_loop().create_server(P, "0.0.0.0", int(sys.argv[1]), backlog=1024)
    await s.serve_forever()
asyncio.run(main())
"""

LOAD = r"""
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
from openloop import fixed_rate
host, port, rate, seconds, conns, new = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]), sys.argv[7] == "1"
REQ = b"GET /x HTTP/1.1\r\nHost: web\r\n\r\n"
async def read_one(r):
    head = await r.readuntil(b"\r\n\r\n")
    await r.readexactly(2)
    return head.startswith(b"HTTP/1.1 200")
def keepalive():
    state = {}
    async def send():
        try:
            if "w" not in state:
                state["r"], state["w"] = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
            state["w"].write(REQ)
            return await asyncio.wait_for(read_one(state["r"]), 5)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            state.pop("w", None)
            return False
    return send
async def fresh():
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        w.write(REQ)
        ok = await asyncio.wait_for(read_one(r), 5)
        w.close()
        return ok
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        return False
async def main():
    reqs = [fresh for _ in range(conns)] if new else [keepalive() for _ in range(conns)]
    print(json.dumps(await fixed_rate(reqs, rate, seconds, 2.0)))
asyncio.run(main())
"""


def manifest() -> str:
    from nodemesh.sandbox.testing import deployment

    def deploy(name: str, node: str, argv: list[str]) -> str:
        return deployment(name, NS, argv, node=node)
    return "---".join([f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n",
                       deploy("web", "node2", [PY, "-c", SERVER, "8080"]),
                       deploy("load", "node1", ["sleep", "infinity"])])


def agent_pids(sb) -> list[int]:  # type: ignore[no-untyped-def]
    from nodemesh.manifests.sandbox_install import agent_process

    pids: list[int] = []
    for node in ("node1", "node2"):
        pid = sb.node_process_pid(agent_process(node))
        if pid:
            pids += tree_pids(pid)
    return pids


def run_load(sb, web_ip: str, rate: float, seconds: float, conns: int, new: bool) -> dict:  # type: ignore[no-untyped-def]
    (load,) = [p for p in sb.pods(NS) if p["metadata"]["labels"]["app"] == "load"]
    netns = sb.pod_netns(NS, load["metadata"]["name"])
    pids = agent_pids(sb)
    cpu0 = cpu_seconds(pids) if pids else 0.0
    res = subprocess.run(["ip", "netns", "exec", netns, PY, "-c", LOAD, str(HERE), web_ip, "8080", str(rate),
                          str(seconds), str(conns), "1" if new else "0"],
                         capture_output=True, text=True, timeout=seconds + 120, check=False)
    cpu = (cpu_seconds(pids) - cpu0) if pids else 0.0
    if res.returncode != 0:
        raise SystemExit(f"load failed: {res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    total = max(out["total_requests"], 1)
    out["agent_cpu_s"] = round(cpu, 3)
    out["agent_cpu_s_per_1k_req"] = round(cpu / total * 1000, 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--new-rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--conns", type=int, default=20)
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    ap.add_argument("--repeat", type=int, default=1, help="run the mTLS phases this many times, alternating")
    args = ap.parse_args()
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - set(PHASES)
    if unknown:
        ap.error(f"unknown phases: {sorted(unknown)}")
    order = [p for p in phases if not p.startswith("mesh+mtls")] + \
        [p for _ in range(args.repeat) for p in phases if p.startswith("mesh+mtls")]
    from nodemesh.manifests.sandbox_install import install_sandbox, uninstall_sandbox
    from nodemesh.sandbox.testing import running_sandbox

    results: dict[str, dict] = {}
    with running_sandbox(nodes=2, cni="bridge", manifests=[manifest()], timeout=90) as sb:
        (web,) = [p for p in sb.pods(NS) if p["metadata"]["labels"]["app"] == "web"]
        web_ip = web["status"]["podIP"]
        for i, phase in enumerate(order):
            if phase != "direct":
                install_sandbox(sb.name, timeout=90, progress=lambda m: None, mtls=phase.startswith("mesh+mtls"),
                                tunnel_mux=phase != "mesh+mtls-perconn")
                time.sleep(3)  # certificates issued, capture in place
            run = phase if order.count(phase) == 1 else f"{phase} #{order[:i + 1].count(phase)}"
            try:
                results[f"{run} keepalive"] = run_load(sb, web_ip, args.rate, args.seconds, args.conns, False)
                results[f"{run} newconn"] = run_load(sb, web_ip, args.new_rate, args.seconds, args.conns, True)
            finally:
                if phase != "direct":
                    with contextlib.suppress(Exception):
                        uninstall_sandbox(sb.name, progress=lambda m: None)
    cols = ("rps", "errors", "p50_ms", "p99_ms", "agent_cpu_s_per_1k_req")
    print(f"{'run':36}" + "".join(f"{c:>24}" for c in cols))
    for name, r in results.items():
        print(f"{name:36}" + "".join(f"{r[c]:>24}" for c in cols))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
