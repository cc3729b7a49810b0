"""How late does the agent's kernel heartbeat get on a loaded node? (redirector/heartbeat.py)

    sudo python3 tests/bench/heartbeat_gap.py [--seconds 30] [--rate 200] [--cni bridge] [--hogs 2]

The mesh as pods (tests/integration/realnode's harness), then for `--seconds`: on every node a client
opening `--rate` new connections a second through the Service (open loop), plus a loop scraping the
agent's /metrics as fast as it answers, and `--hogs` busy loops. Printed: each agent's longest gap between two beats
(`event=heartbeat_gap` lines: each new longest gap over 100 ms is logged) against the 700 ms of
silence that fails a node open. Never pass/fail: the margin is read, not asserted.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))  # tests/support, as pytest has it

from nodemesh.redirector.heartbeat import SILENCE_S
from realnode_harness import PY, realnode_mesh, wait_for

SCRAPE = ("import time, urllib.request\n"
          "end = time.time() + float(__import__('sys').argv[1])\n"
          "while time.time() < end:\n"
          "    try: urllib.request.urlopen('http://127.0.0.1:4191/metrics', timeout=5).read()\n"
          "    except Exception: time.sleep(0.05)\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--cni", default="bridge")
    p.add_argument("--hogs", type=int, default=0, help="busy-loop processes beside the load (CPU starvation)")
    a = p.parse_args()
    with realnode_mesh(nodes=2, cni=a.cni) as mesh:
        assert wait_for(mesh.healthy, 60.0) is not None, "mesh not healthy"
        tmp = tempfile.TemporaryDirectory(prefix="heartbeat-gap-")
        out = Path(tmp.name)
        procs = [mesh.start_load(mesh.client(n), "http://server.rn/", out / f"{n}.jsonl", rate=a.rate,
                                 duration=a.seconds, timeout=3.0) for n in mesh.nodes]
        procs += [subprocess.Popen(["ip", "netns", "exec", mesh.sb.node(n).netns, PY, "-c", SCRAPE, str(a.seconds)])
                  for n in mesh.nodes]
        hogs = [subprocess.Popen([PY, "-c", f"import time\nend = time.time() + {a.seconds}\nwhile time.time() < end: pass"])
                for _ in range(a.hogs)]
        for proc in procs + hogs:
            proc.wait(timeout=a.seconds + 60)
        for n in mesh.nodes:
            records = mesh.records(out / f"{n}.jsonl")
            ok = sum(1 for r in records if r["ok"])
            log = mesh.agent_log(n)
            gaps = [float(m) for m in re.findall(r"event=heartbeat_gap max_ms=(\d+)", log)]
            assert "event=heartbeat list=" in log, f"{n}: the agent never beat the capture rules' list"
            backend = mesh.sb.node(n).iptables
            chain = mesh.sb.node_exec(n, [f"iptables-{backend}", "-t", "mangle", "-nvxL", "NODEMESH_INPUT"],
                                      capture_output=True, text=True).stdout
            dropped = sum(int(line.split()[0]) for line in chain.splitlines() if " DROP " in line)
            overflows = mesh.sb.node_exec(n, ["nstat", "-az", "TcpExtListenOverflows"], capture_output=True,
                                          text=True).stdout.split()
            print(f"{n}: {len(records)} requests ({ok} ok, {len(records) / a.seconds:.0f}/s); longest heartbeat "
                  f"gap {max(gaps, default=0):.0f} ms (over 100 ms logged: {gaps}); fails open after "
                  f"{SILENCE_S * 1000:.0f} ms of silence; SYNs dropped for want of a listener: {dropped}; "
                  f"node listen overflows: {overflows[-2] if len(overflows) > 2 else '?'}")


if __name__ == "__main__":
    main()
