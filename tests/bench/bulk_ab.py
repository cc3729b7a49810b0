"""Bulk TCP only, A/B of agent flags, interleaved on one sandbox (issue 18's bulk steps).

    sudo python3 tests/bench/bulk_ab.py --rounds 3 --mb 512 [--variants "splice=;copy=--no-splice"]

One 2-node sandbox (bridge CNI, as run.py) with the bench's bulk receiver; per round and variant
(the variants' order alternates round by round): the agents restarted with the variant's extra
flags, then bulk direct (no capture) and bulk meshed (iptables capture) back to back, each with
run.py's CPU accounting. Prints one line per run and, per variant, the ranges of MB/s meshed,
meshed/direct and agent CPU-s per GB (user+sys of both agents, and sys alone).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench


def _restart_agents(b: bench.Bench, flags: list[str]) -> None:
    b.switch("")
    for n in b.nodes:
        b.sb.stop_node_process(n.name, b._agent_name(n.name), timeout=30.0)
    b.agent_roots.clear()
    b.agent_args = flags
    b.start_agents()
    time.sleep(1.0)


def _perf(b: bench.Bench, out: Path) -> subprocess.Popen[bytes]:
    """perf record (call graphs) of every agent process while the meshed run goes."""
    import procstat

    pids = [p for root in b.agent_roots.values() for p in procstat.tree_pids(root)]
    return subprocess.Popen(["perf", "record", "-F", "999", "-g", "-o", str(out), "-p", ",".join(map(str, pids))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(rounds: int, mb: int, variants: list[tuple[str, list[str]]],
        perf_dir: Path | None = None) -> list[dict[str, Any]]:
    from nodemesh.sandbox.testing import running_sandbox

    cfg = bench.BenchConfig.make(quick=True, bulk_mb=mb)
    rows: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="nodemesh-bulkab-"))
    try:
        with running_sandbox(nodes=2, cni="bridge", manifests=[bench.manifests(workdir)], timeout=60) as sb:
            b = bench.Bench(sb, cfg)
            b.start_agents()
            for r in range(rounds):
                for name, flags in (variants if r % 2 == 0 else variants[::-1]):
                    _restart_agents(b, flags)
                    b.switch("")
                    direct = b._accounted(b.bulk, "bulk", meshed=False)
                    b.switch("iptables")
                    prof = _perf(b, perf_dir / f"{name}-{r}.data") if perf_dir is not None else None
                    meshed = b._accounted(b.bulk, "bulk", meshed=True)
                    if prof is not None:
                        prof.send_signal(2)
                        prof.wait(30)
                    gb = meshed["bytes"] / 1e9
                    row = {"round": r, "variant": name, "direct_mb_s": direct["mb_per_s"],
                           "meshed_mb_s": meshed["mb_per_s"],
                           "ratio": round(meshed["mb_per_s"] / direct["mb_per_s"], 3),
                           "agent_cpu_s_per_gb": round(meshed["cpu"]["agent_cpu_s"] / gb, 3),
                           "agent_sys_s_per_gb": round(meshed["cpu"]["agent_sys_cpu_s"] / gb, 3),
                           "agent_cores": round(meshed["cpu"]["agent_cpu_s"] / meshed["cpu"]["wall_s"], 2),
                           "others_busy_cores": meshed["cpu"]["others_busy_cores"]}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            b.switch("")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def summary(rows: list[dict[str, Any]]) -> str:
    out = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]

        def rng(key: str, mine: list[dict[str, Any]] = mine) -> str:
            vals = sorted(r[key] for r in mine)
            return f"{vals[0]}–{vals[-1]}" if len(vals) > 1 else f"{vals[0]}"
        out.append(f"{name}: direct {rng('direct_mb_s')} MB/s, meshed {rng('meshed_mb_s')} MB/s, "
                   f"ratio {rng('ratio')}, agent CPU-s/GB {rng('agent_cpu_s_per_gb')} "
                   f"(sys {rng('agent_sys_s_per_gb')}), agent cores {rng('agent_cores')}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--perf", metavar="DIR", help="perf record the agents during each meshed run into DIR")
    ap.add_argument("--variants", default="splice=;copy=--no-splice",
                    help="name=agent flags, ';'-separated (flags space-separated)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("error: run as root (network namespaces)", file=sys.stderr)
        return 1
    variants = [(v.split("=", 1)[0], v.split("=", 1)[1].split()) for v in args.variants.split(";") if v]
    perf_dir = Path(args.perf) if args.perf else None
    if perf_dir is not None:
        perf_dir.mkdir(parents=True, exist_ok=True)
    rows = run(args.rounds, args.mb, variants, perf_dir)
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
