"""nodemesh benchmark: direct vs meshed on a 2-node sandbox, in one run (root required).

    python3 tests/bench/run.py [--quick] [--duration S] [--json OUT] [--bulk-mb N] [--workers N] [--name NAME]
                               [--modes iptables,ebpf,ebpf+sockmap]

Prints a table of raw numbers and meshed/direct ratios (never pass/fail); docs/bench.md explains
every figure. The sandbox is always torn down, also on Ctrl-C, SIGTERM or failure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules (tests/ is not a package)

import bench

MAIN_PID = os.getpid()


def _sigterm(signum: int, frame: object) -> None:
    # Turn SIGTERM into the same unwinding as Ctrl-C, so the sandbox's teardown runs. Only in this
    # process: pyroute2 forks helpers that inherit the handler and are stopped with SIGTERM; in
    # them, unwinding would run the teardown from a child (and tear the sandbox down under us).
    if os.getpid() != MAIN_PID:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="nodemesh benchmark: direct vs meshed on a 2-node sandbox")
    ap.add_argument("--quick", action="store_true", help="short runs (about a minute in all)")
    ap.add_argument("--duration", type=float, help="seconds measured per scenario and mode (default 8; quick 2.5)")
    ap.add_argument("--bulk-mb", type=int, help="MiB sent by the bulk TCP scenario (default 1024; quick 256)")
    ap.add_argument("--workers", type=int, help="agent worker processes per node (default: the agent's own)")
    ap.add_argument("--name", help="sandbox name (default: a unique one); it is always removed at the end")
    ap.add_argument("--modes", default="iptables,ebpf,ebpf+sockmap",
                    help="meshed columns, comma-separated: iptables, ebpf, ebpf+sockmap, iptables+sockmap "
                         "(default: the first three, side by side; the first is the main table's 'meshed')")
    ap.add_argument("--json", metavar="OUT", help="also write every raw result and the figures as JSON")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("error: the bench builds network namespaces: run it as root", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _sigterm)
    cfg = bench.BenchConfig.make(quick=args.quick, duration=args.duration, bulk_mb=args.bulk_mb,
                                 agent_workers=args.workers, modes=tuple(m for m in args.modes.split(",") if m))
    t0 = time.monotonic()
    try:
        results = bench.run_bench(cfg, name=args.name)
    except KeyboardInterrupt:
        print("bench: interrupted; sandbox removed", file=sys.stderr)
        return 130
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    print(bench.render(results))
    print(f"(whole run {results['elapsed_s']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
