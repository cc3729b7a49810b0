"""Identity benchmark: how fast every agent learns new pods, and what the lookup costs per request.

    sudo python3 tests/bench/identity.py [--sizes 10,50,200] [--rounds 1] [--json OUT] [--cni bridge]

Propagation: a 2-node sandbox with nodemesh installed as `nodemesh install --sandbox` does it
(controller, agent and redirector per node). For each N, one Deployment of N pods is applied at
once; the bench watches the recorded objects (what the sandbox's API server holds) and every agent's
`/identity` (the uids it holds per pod IP), both polled every 10 ms, and reports per pod

    propagation = (last agent to hold the pod's uid) - (the pod first recorded Running with its IP)

as p50/p99/max over the pods (negative when the agents knew the pod before it ran: the controller
pushes a pod once it has an IP). Also printed: from the pod's first appearance with an IP.

Lookup cost (in-process, no network): the worker telemetry's per-connection open+close and
per-request costs with an index of 5,000 pods, and the cost of re-resolving live connections when
an identity delta arrives. The saturation ratio itself is tests/bench/run.py's `http_sat_*`.

Numbers, not pass/fail; the sandbox is always torn down.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
import timeit
import urllib.request
from pathlib import Path
from typing import Any

from nodemesh.api.workloads import pod_ips, pod_uid
from nodemesh.manifests.sandbox_install import install_sandbox
from nodemesh.sandbox.testing import agent_admin_request, deployment, running_sandbox

NS = "idbench"


def manifest(n: int, name: str) -> str:
    """n pods of `sleep infinity`, in Deployments of at most 100 (the sandbox's replica limit),
    all in one apply; every pod labelled burst=<name>."""
    docs = [f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n"]
    for k in range(math.ceil(n / 100)):
        replicas = min(100, n - 100 * k)
        docs.append(deployment(f"{name}-{k}", NS, ["sleep", "infinity"], replicas=replicas,
                               labels={"burst": name}, container="c"))
    return "---".join(docs)


class Watcher(threading.Thread):
    """Polls objects.json and every agent's /identity, stamping first sightings (time.time())."""

    def __init__(self, state_dir: Path, agents: list[str], interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.objects = state_dir / "objects.json"
        self.agents = agents
        self.interval = interval
        self.stop = threading.Event()
        self.with_ip: dict[str, float] = {}       # uid -> first seen with an IP
        self.running: dict[str, float] = {}       # uid -> first seen Running with an IP
        self.held: dict[str, dict[str, float]] = {a: {} for a in agents}  # agent -> uid -> first held
        self._mtime = 0

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.time()
            try:
                mtime = self.objects.stat().st_mtime_ns
                if mtime != self._mtime:
                    self._mtime = mtime
                    for p in json.loads(self.objects.read_text())["items"]:
                        if p.get("kind") != "Pod" or p["metadata"].get("namespace") != NS or not pod_ips(p):
                            continue
                        uid = pod_uid(p)
                        self.with_ip.setdefault(uid, now)
                        if p["status"].get("phase") == "Running":
                            self.running.setdefault(uid, now)
            except (OSError, ValueError):
                pass
            for agent in self.agents:
                try:
                    # Off the node, /identity needs a credential: the sandbox's token (agent/admin.py).
                    req = agent_admin_request(self.objects.parent, f"http://{agent}/identity")
                    with urllib.request.urlopen(req, timeout=1) as r:
                        held = json.loads(r.read())["pods"]
                except (OSError, ValueError):
                    continue
                seen = self.held[agent]
                stamp = time.time()
                for uid in held.values():
                    seen.setdefault(uid, stamp)
            time.sleep(self.interval)


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]

    return {"p50": q(0.5), "p99": q(0.99), "max": ordered[-1], "n": len(ordered)}


def propagation(sizes: list[int], rounds: int, cni: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with running_sandbox(nodes=2, cni=cni) as sb:
        install_sandbox(sb.name, timeout=90, progress=lambda msg: None)
        agents = [f"{n.ip}:4191" for n in sb.nodes()]
        watcher = Watcher(Path(sb.state_dir), agents)
        watcher.start()
        try:
            for n in sizes:
                from_running: list[float] = []
                from_ip: list[float] = []
                for r in range(rounds):
                    name = f"burst{n}r{r}"
                    text = manifest(n, name)
                    started = time.time()
                    sb.apply(text=text)
                    applied = time.time()
                    uids: list[str] = []
                    deadline = time.time() + 60 + n
                    while time.time() < deadline:
                        uids = [pod_uid(p) for p in sb.pods(NS) if p["metadata"]["labels"].get("burst") == name]
                        if len(uids) == n and all(u in watcher.running and all(u in watcher.held[a] for a in agents)
                                                  for u in uids):
                            break
                        time.sleep(0.1)
                    else:
                        raise RuntimeError(f"N={n}: not every agent learned every pod within the deadline")
                    for u in uids:
                        last = max(watcher.held[a][u] for a in agents)
                        from_running.append(last - watcher.running[u])
                        from_ip.append(last - watcher.with_ip[u])
                    sb.delete(text="---".join(text.split("---")[1:]))
                    print(f"  N={n} round {r + 1}: apply took {applied - started:.1f}s", file=sys.stderr)
                out[str(n)] = {"from_running_ms": {k: v * 1000 if k != "n" else v
                                                   for k, v in quantiles(from_running).items()},
                               "from_ip_ms": {k: v * 1000 if k != "n" else v for k, v in quantiles(from_ip).items()}}
        finally:
            watcher.stop.set()
            watcher.join(2)
    return out


# ---------------------------------------------------------------------------- lookup cost
def lookup_cost(pods: int = 5000, n: int = 20000) -> dict[str, float]:
    from nodemesh.agent.config import AgentConfig
    from nodemesh.agent.observe import ConnectionEnd, ConnectionMeta, RequestEnd, RequestHead
    from nodemesh.agent.telemetry import WorkerTelemetry
    from nodemesh.api.gen import nodemesh_pb2 as pb

    def ip(i: int) -> str:
        return f"10.{100 + i // 60000}.{i // 250 % 240}.{i % 250 + 2}"

    snap = pb.IdentitySnapshot(epoch=1, version=1, captured_namespaces=["ns"])
    for i in range(pods):
        snap.pods.append(pb.Pod(ip=ip(i), ips=[ip(i)], namespace="ns", name=f"p{i}", uid=f"u{i}", node=f"n{i % 2}",
                                start_time_ms=1, owner=pb.Resource(namespace="ns", type="deployment", name=f"d{i % 50}")))
    tel = WorkerTelemetry(AgentConfig(node="n0", workers=1))
    tel.apply_identity(snap)
    head = RequestHead("GET", "http", "svc", "/", started=1.0)
    end = RequestEnd(ended=2.0)
    meta = ConnectionMeta(1, "outbound", (ip(1), 40000), (ip(3), 80), (ip(3), 80), "http1", started=time.monotonic())
    conn = tel.connection_open(meta)

    def one_request() -> None:
        r = tel.request_start(conn, head)
        tel.response_start(r, 200, [], 1.5)
        tel.request_end(r, end)

    def open_close() -> None:
        c = tel.connection_open(meta)
        tel.connection_close(c, ConnectionEnd(1, 1, 2.0))

    best = {
        "request_us": min(timeit.repeat(one_request, number=n, repeat=7)) / n * 1e6,
        "open_close_us": min(timeit.repeat(open_close, number=n // 4, repeat=7)) / (n // 4) * 1e6,
    }
    # Re-resolution: 10,000 live connections, a delta that touches one address.
    live = [tel.connection_open(ConnectionMeta(i, "outbound", (ip(i % pods), 40000), (ip(7), 80), (ip(7), 80),
                                               "http1", started=time.monotonic())) for i in range(10_000)]
    delta = pb.IdentityDelta(epoch=1, base_version=1, version=2)
    delta.pods.append(pb.Pod(ip=ip(pods + 1), ips=[ip(pods + 1)], namespace="ns", name="new", uid="new", node="n0",
                             owner=pb.Resource(namespace="ns", type="deployment", name="new")))
    t0 = time.perf_counter()
    tel.apply_identity(delta)
    best["delta_with_10k_live_conns_ms"] = (time.perf_counter() - t0) * 1000
    del live
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,50,200")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cni", default="bridge", choices=["bridge", "routed"])
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--skip-propagation", action="store_true")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 and not args.skip_propagation:
        print("error: the propagation bench builds network namespaces: run it as root", file=sys.stderr)
        return 1
    results: dict[str, Any] = {"lookup": lookup_cost()}
    if not args.skip_propagation:
        results["propagation"] = propagation([int(x) for x in args.sizes.split(",")], args.rounds, args.cni)
    print("identity lookup (in-process, 5,000 pods indexed, best of 7):")
    lk = results["lookup"]
    print(f"  per request (start+response+end): {lk['request_us']:.2f} us; per connection open+close: "
          f"{lk['open_close_us']:.2f} us; a delta with 10,000 live connections: {lk['delta_with_10k_live_conns_ms']:.1f} ms")
    for n, r in results.get("propagation", {}).items():
        fr, fi = r["from_running_ms"], r["from_ip_ms"]
        print(f"identity propagation N={n:>4}: from Running p50 {fr['p50']:7.0f} ms  p99 {fr['p99']:7.0f} ms  "
              f"max {fr['max']:7.0f} ms | from IP recorded p50 {fi['p50']:7.0f} ms  p99 {fi['p99']:7.0f} ms  "
              f"(n={fr['n']})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
