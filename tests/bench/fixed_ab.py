"""Interleaved A/B of agent trees (or worker counts) on the bench's scenarios, per process.

    sudo python3 tests/bench/fixed_ab.py --trees /tmp/pp-main,/work/wt/pp-me --rounds 2 \\
        --scen idle,http_fixed_same,http_fixed_cross [--duration 6] [--json OUT]

One 2-node sandbox (bench.py's pods); each DIRECT scenario once, then per round and per tree
(order reversed every other round, so a drift of the machine's load favours neither): the agents
are started with that tree as PYTHONPATH (`TREE:WORKERS` also sets --workers), capture on, each
scenario run meshed, capture off, agents stopped. Per run it prints one JSON line: agent CPU-s per
1000 requests (as run.py), kernel share, added p50, and per agent process the CPU ms (from
/proc/PID/schedstat: the scheduler's own ns, not ticks) and the voluntary / involuntary context
switches — the wake-ups and preemptions that issue 18's fixed-rate cost is made of. `idle` is no
traffic at all for --duration seconds: what the agents cost doing nothing. `--hook CMD` runs a
shell command during the first meshed run of round 0 ({pids}: the agent processes, parents
first), e.g. `strace -c` or `py-spy record` on a worker. Numbers, not pass/fail.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench
import procstat


def _schedstat_ms(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            out[pid] = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e6
        except (OSError, ValueError, IndexError):
            out[pid] = 0.0
    return out


def _switches(pids: list[int]) -> dict[int, tuple[int, int]]:
    """(voluntary, involuntary) context switches of each process's main thread (the event loop)."""
    out = {}
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            out[pid] = (0, 0)
            continue
        vol = invol = 0
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                vol = int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                invol = int(line.split()[1])
        out[pid] = (vol, invol)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", required=True, help="comma-separated PYTHONPATH dirs, each TREE or TREE:WORKERS")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--scen", default="idle,http_fixed_same,http_fixed_cross",
                    help="idle, http_fixed_same, http_fixed_cross, http_sat_same, http_sat_cross")
    ap.add_argument("--hook", default="", help="shell command run during the first meshed run ({pids})")
    ap.add_argument("--json", metavar="OUT", help="also write every row as a JSON list")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("error: the bench builds network namespaces: run it as root", file=sys.stderr)
        return 1
    from nodemesh.sandbox.testing import running_sandbox

    cfg = bench.BenchConfig.make(duration=args.duration)
    cfg.warmup = 1.0
    names = [n for n in args.scen.split(",") if n]
    rows: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="nodemesh-fixed-ab-"))
    try:
        with running_sandbox(nodes=2, cni="bridge", manifests=[bench.manifests(workdir)], timeout=60) as sb:
            b = bench.Bench(sb, cfg)
            p = b.place
            scenarios: dict[str, Callable[[], dict[str, Any]]] = {
                "http_fixed_same": lambda: b.http_fixed(p.same("nginx")),
                "http_fixed_cross": lambda: b.http_fixed(p.cross("nginx")),
                "http_sat_same": lambda: b.http_saturation(p.same("nginx")),
                "http_sat_cross": lambda: b.http_saturation(p.cross("nginx")),
                "idle": lambda: (time.sleep(args.duration), {})[1],
            }
            direct = {n: ({} if n == "idle" else b._accounted(scenarios[n], "nginx", meshed=False)) for n in names}
            trees = [t for t in args.trees.split(",") if t]
            for rnd in range(args.rounds):
                for tree in (trees if rnd % 2 == 0 else trees[::-1]):
                    path, _, workers = tree.partition(":")
                    os.environ["PYTHONPATH"] = path
                    b.cfg.agent_workers = int(workers) if workers else None
                    b.start_agents()
                    time.sleep(1.0)
                    b.switch("iptables")
                    for i, name in enumerate(names):
                        pids = [x for root in b.agent_roots.values() for x in procstat.tree_pids(root)]
                        hook = None
                        if args.hook and rnd == 0 and i == 0:
                            hook = subprocess.Popen(["bash", "-c", args.hook.format(pids=",".join(map(str, pids)))])
                        sw0, ms0 = _switches(pids), _schedstat_ms(pids)
                        out = b._accounted(scenarios[name], "nginx", meshed=True)
                        ms1, sw1 = _schedstat_ms(pids), _switches(pids)
                        if hook is not None:
                            hook.wait()
                        cpu, d = out["cpu"], direct[name]
                        row = {
                            "tree": tree, "round": rnd, "scenario": name,
                            "agent_cpu_s_per_1000": out.get("agent_cpu_s_per_1000"),
                            "agent_cpu_s": cpu["agent_cpu_s"],
                            "kernel_share": round(cpu["agent_sys_cpu_s"] / max(cpu["agent_cpu_s"], 1e-9), 2),
                            "requests": out.get("total_requests"), "rps": out.get("rps"),
                            "direct_rps": d.get("rps"), "errors": out.get("errors"),
                            "added_p50_ms": round(out["p50_ms"] - d["p50_ms"], 3) if "p50_ms" in d else None,
                            "machine_busy_cores": cpu["machine_busy_cores"],
                            "roots": b.agent_roots.copy(),
                            "process_cpu_ms": {x: round(ms1[x] - ms0[x], 1) for x in pids},
                            "switches_vol_invol": {x: (sw1[x][0] - sw0[x][0], sw1[x][1] - sw0[x][1]) for x in pids},
                        }
                        print(json.dumps(row), flush=True)
                        rows.append(row)
                    b.switch("")
                    for node in b.nodes:
                        sb.stop_node_process(node.name, b._agent_name(node.name), timeout=20)
                    b.agent_roots.clear()
    except KeyboardInterrupt:
        print("fixed_ab: interrupted; sandbox removed", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
