"""The scale harness (tests/scale/run.py) at N=5, so it cannot rot: its figures must describe
what happened — every agent connected and reporting, every report acknowledged and counted by
the controller, the identity holding every pod, stat rows for every deployment with traffic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("source", ["kubernetes", "sandbox"])
def test_scale_harness_small_run(tmp_path: Path, source: str) -> None:
    """`kubernetes`: the controller lists and watches the sandbox API server through the real
    client (the harness's default); `sandbox`: it reads the objects file itself."""
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scale" / "run.py"), "--nodes", "5", "--pods", "50",
         "--duration", "3", "--warmup", "1", "--queries", "3", "--taps", "1", "--fanout-wait", "2",
         "--ramp", "0.5", "--parse-all", "--source", source, "--json", str(out)],
        check=False, capture_output=True, text=True, timeout=240, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (f,) = json.loads(out.read_text())
    print(proc.stdout)
    assert f["source"] == source
    assert (f.get("apiserver_cpu_s", 0) > 0) == (source == "kubernetes")
    assert f["agents"] == f["agents_connected"] == f["agents_reporting"] == 5
    assert f["agent_errors"] == f["controller_rejected_reports"] == f["controller_errors"] == 0
    # Every report the agents sent was acknowledged, and the controller counted each once.
    assert f["reports_sent"] >= 5 * 4
    assert f["reports_acked"] == f["reports_sent"]
    assert f["reports_received_total"] == f["reports_sent"]
    assert f["snapshot_pods"] == 250                      # the identity holds the whole cluster
    assert f["identity_snapshots_total"] == 5             # one per agent, then deltas only
    # The agents offer zlib: the snapshot (~60 KB) came compressed, the small deltas plain.
    assert f["snapshot_encodings"] == ["zlib"] and 0 < f["snapshot_wire_bytes"] < f["snapshot_bytes"] / 3
    assert f["stream_ends"] == 0 and f["agents_reconnected"] == 0
    assert f["agents_connect_cpu_s"] >= 0 and f["agents_cores"] >= 0 and f["rss_mb_ready"] > 10
    assert f["fanout_one_agents"] == f["fanout_500_agents"] == 5
    assert f["stat_deploy_rows"] == 25 and f["stat_deploy_rows_with_traffic"] == 25
    assert f["stat_po_rows"] == 30
    assert 0 < f["controller_cores"] < 2.5 and f["rss_mb_end"] > 10
    assert f["ingest_p50_ms"] is not None and f["tap_open_p50_ms"] is not None
    # Where the time goes: the loop's lag was sampled (~10 timers a second), stat's time inside the
    # controller is part of what the caller waited, the tap reached an agent before its event
    # came back, and the fan-out from the API server's event is part of the fan-out from the write.
    assert f["loop_lag_mean_ms"] is not None and f["loop_lag_p99_ms"] is not None
    assert 0 < f["stat_deploy_A_server_mean_ms"] <= f["stat_deploy_A_p99_ms"]   # a mean is at most the slowest
    assert f["check_p50_ms"] > 0
    assert 0 < f["tap_open_at_agent_p50_ms"] <= f["tap_open_max_ms"]
    if source == "kubernetes":
        assert 0 < f["fanout_one_from_event_max_ms"] < f["fanout_one_max_ms"]
        assert 0 < f["fanout_500_from_event_max_ms"] < f["fanout_500_max_ms"]
    else:
        assert "fanout_one_from_event_max_ms" not in f
