"""Route metrics on vs off (issue 15), in one run: saturation ratio and agent CPU per 1000 requests.

    python3 tests/bench/routes.py [--quick] [--json OUT]

On one 2-node sandbox (bench.py's apps and scenarios), phase ON runs each scenario DIRECT then
MESHED with the agents' defaults (route metrics on); the agents are restarted with
`--no-route-metrics`; phase OFF runs each scenario MESHED then DIRECT. Each phase's ratio is
against its own direct run, so a drift of the machine's load between the phases does not show up as
a difference between them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench

SCENARIOS = ("http_fixed_cross", "http_sat_cross", "http_sat_same", "grpc_fixed", "grpc_sat")


class RoutesBench(bench.Bench):
    captured = False

    def set_capture(self, on: bool) -> None:
        if on != self.captured:
            self.capture(on)
            self.captured = on

    def phase(self, meshed_first: bool) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {"direct": {}, "meshed": {}}
        for name, app, run in self.scenarios():
            if name not in SCENARIOS:
                continue
            for mode in (("meshed", "direct") if meshed_first else ("direct", "meshed")):
                self.set_capture(mode == "meshed")
                self.cfg.log(f"bench: {name}: {mode} (agent flags: {' '.join(self.agent_args) or 'defaults'}) ...")
                out[mode][name] = self._accounted(run, app, meshed=mode == "meshed")
        self.set_capture(False)
        return out

    def restart_agents(self, args: list[str]) -> None:
        for n in self.nodes:
            self.sb.stop_node_process(n.name, self._agent_name(n.name), timeout=30.0)
        self.agent_roots.clear()
        self.agent_args = args
        self.start_agents()

    def run_phases(self) -> dict[str, Any]:
        self.start_agents()
        on = self.phase(meshed_first=False)
        self.restart_agents(["--no-route-metrics"])
        off = self.phase(meshed_first=True)
        return {"on": on, "off": off}


def summary(r: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    rows: dict[str, dict[str, float | None]] = {}
    for s in SCENARIOS:
        row: dict[str, float | None] = {}
        for phase in ("on", "off"):
            d, m = r[phase]["direct"][s], r[phase]["meshed"][s]
            row[f"{phase}_ratio"] = round(m["rps"] / d["rps"], 3) if d.get("rps") else None
            row[f"{phase}_agent_cpu_s_per_1000"] = m.get("agent_cpu_s_per_1000")
        rows[s] = row
    return rows


def render(rows: dict[str, dict[str, float | None]]) -> str:
    head = f"{'scenario':<18} {'ratio on':>9} {'ratio off':>9} {'cpu/1000 on':>12} {'cpu/1000 off':>13}"
    lines = [head, "-" * len(head)]
    fmt = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"
    for s, row in rows.items():
        lines.append(f"{s:<18} {fmt(row['on_ratio']):>9} {fmt(row['off_ratio']):>9} "
                     f"{fmt(row['on_agent_cpu_s_per_1000'], 4):>12} {fmt(row['off_agent_cpu_s_per_1000'], 4):>13}")
    lines.append("ratio: meshed rps / direct rps in the same phase (fixed-rate scenarios hold their rate: ~1.0);"
                 " cpu/1000: agent CPU-seconds per 1000 requests, both nodes")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="nodemesh route metrics on vs off, one run")
    ap.add_argument("--quick", action="store_true", help="short runs")
    ap.add_argument("--json", metavar="OUT", help="also write the raw results as JSON")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("error: the bench builds network namespaces: run it as root", file=sys.stderr)
        return 1
    from nodemesh.sandbox.testing import running_sandbox

    cfg = bench.BenchConfig.make(quick=args.quick)
    workdir = Path(tempfile.mkdtemp(prefix="nodemesh-bench-routes-"))
    t0 = time.monotonic()
    try:
        with running_sandbox(nodes=2, cni="bridge", manifests=[bench.manifests(workdir)], timeout=60) as sb:
            raw = RoutesBench(sb, cfg).run_phases()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = summary(raw)
    print(render(rows))
    print(f"(whole run {time.monotonic() - t0:.0f} s; loadavg {' '.join(Path('/proc/loadavg').read_text().split()[:3])})")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": rows, "raw": raw}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
