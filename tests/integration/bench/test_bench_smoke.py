"""The benchmark command still runs end to end and produces every figure (not their values).

Runs `tests/bench/run.py --quick` on tiny durations (25-35 s, by machine load): a 2-node sandbox,
every scenario direct and meshed, the agents started and counted. Asserts only that each figure is present and
positive (added latencies are differences and may be negative: they must be finite numbers), so
the bench cannot silently rot; the numbers themselves are for people, not for CI.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from nodemesh.sandbox.cluster import Sandbox
from nodemesh.sandbox.testing import unique_name

pytestmark = pytest.mark.root
RUN = Path(__file__).resolve().parents[2] / "bench" / "run.py"

LATENCY_SCENARIOS = ("http_fixed_cross", "http_fixed_same", "http_sat_cross", "http_sat_same", "grpc_sat",
                     "grpc_fixed")
THROUGHPUT_SCENARIOS = ("http_sat_cross", "http_sat_same", "grpc_sat")


def _run_bench(out: Path, name: str) -> subprocess.CompletedProcess[str]:
    # One meshed mode: the default three restart the redirectors (and compile eBPF) per scenario,
    # ~3x the time; the side-by-side table is exercised by the real runs (docs/bench.md).
    argv = [sys.executable, str(RUN), "--quick", "--duration", "0.5", "--bulk-mb", "32", "--name", name,
            "--json", str(out), "--modes", "iptables"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # run.py turns it into its normal teardown
        stdout, stderr = proc.communicate(timeout=60)
        raise AssertionError(f"bench did not finish in 120 s:\n{stderr[-3000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def test_bench_quick_produces_every_figure(tmp_path: Path) -> None:
    name = unique_name()
    out = tmp_path / "bench.json"
    try:
        res = _run_bench(out, name)
    finally:
        Sandbox(name).down()  # a no-op when the bench tore it down itself, as it should
    assert res.returncode == 0, res.stderr[-3000:]
    assert "meshed vs direct" in res.stdout and "agent RSS MB" in res.stdout, res.stdout

    f = json.loads(out.read_text())["figures"]
    positive = [f"bulk_{k}" for k in ("direct_mb_s", "meshed_mb_s", "ratio")]
    positive += ["agent_rss_idle_mb", "agent_rss_loaded_mb", "agent_pss_idle_mb", "agent_pss_loaded_mb",
                 "agent_requests_seen"]
    for s in LATENCY_SCENARIOS:
        positive += [f"{s}_{mode}_{q}_ms" for mode in ("direct", "meshed") for q in ("p50", "p99")]
    for s in THROUGHPUT_SCENARIOS:
        positive += [f"{s}_direct_rps", f"{s}_meshed_rps", f"{s}_ratio", f"{s}_agent_cpu_s_per_1000",
                     f"{s}_direct_busy_cores"]
    missing = [k for k in positive if k not in f]
    assert not missing, f"figures missing: {missing}"
    not_positive = {k: f[k] for k in positive if not (isinstance(f[k], int | float) and f[k] > 0)}
    assert not not_positive, f"figures not positive: {not_positive}"
    for s in LATENCY_SCENARIOS:
        for q in ("p50", "p99"):
            v = f[f"{s}_added_{q}_ms"]
            assert isinstance(v, int | float) and math.isfinite(v), (s, q, v)
    # nothing of the sandbox is left behind
    assert not Path(f"/run/netns/nm-{name}-underlay").exists()
