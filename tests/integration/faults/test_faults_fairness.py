"""Issue 12 item 4, per-pod CPU fairness: one pod's connect flood or request flood cannot take the
agent's time from another pod.

The aggressor is the client on nginx's node (its traffic: outbound on that node's agent); the victim
is the client on the other node (its traffic: outbound on its own agent, then inbound on the same
agent as the aggressor's). The victim sends a steady 200 requests a second over 4 keep-alive
connections (open loop: latency counts from when a request was due), alone and while the aggressor
floods:

- connect flood: wrk with 100 connections and `Connection: close` — a new connection for every
  request, thousands a second;
- request flood: wrk with 200 keep-alive connections sending GETs back to back, as fast as the
  agent answers.

Each is run meshed and then with capture off (direct, the same pods a moment later), so the printed
figures compare the mesh with the network it stands in for. Asserted, meshed: the victim's
requests all but succeed with the aggressor (>= 99 %), and its p99 stays within a generous bound of
its own no-aggressor p99 measured in the same run (timing on a shared 2-core machine: printed, bounded
loosely). The aggressor is slowed (agent/fairness.py: its connections paused, its new ones held
while it is over its budget), never refused by fairness; past capacity or its fair share of
connections admission still sheds with 503 (counted on `tcp_close_total{error="shed: ..."}`).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from faults_harness import Faults
from nodemesh.manifests.sandbox_install import agent_process

pytestmark = pytest.mark.root

NGINX_PORT = 8080
VICTIM_RATE, VICTIM_CONNS, VICTIM_S = 200, 4, 6.0
FLOODS = {  # peer kind and its arguments after host, port (the duration is appended)
    "connect": ("wrk", "/ok", 100, "close"),
    "request": ("wrk", "/ok", 200, "keep-alive"),
}
# Over the victim's own no-aggressor p99. Generous: on this shared 2-core machine the victim's requests
# wait mostly for a CPU (wrk, nginx and four agent workers want both); before the fairness budgets
# its p99 under the request flood was 5.1 s (p50 3 s: it fell behind its own rate), after 0.2-1 s.
P99_BOUND_MS = 1500.0


def _round(faults: Faults, flood: str) -> dict[str, Any]:
    srv = faults.server("nginx")
    aggressor = faults.client_near(srv, True)
    victim = faults.client_near(srv, False)
    kind, path, width, close = FLOODS[flood]
    alone = faults.peer(victim, "victim", srv.ip, NGINX_PORT, "/ok", VICTIM_RATE, VICTIM_CONNS, VICTIM_S)
    proc = faults.peer_background(aggressor, kind, srv.ip, NGINX_PORT, path, width, int(VICTIM_S) + 3, close)
    try:
        time.sleep(1.5)  # the flood at full strength first
        during = faults.peer(victim, "victim", srv.ip, NGINX_PORT, "/ok", VICTIM_RATE, VICTIM_CONNS, VICTIM_S)
    finally:
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    return {"alone": alone, "during": during, "aggressor": json.loads(stdout.strip().splitlines()[-1])}


def _line(label: str, r: dict[str, Any]) -> str:
    a, d, g = r["alone"], r["during"], r["aggressor"]
    agg = {k: g[k] for k in ("requests", "rps", "non_2xx", "socket_errors") if k in g}
    return (f"{label}: victim alone p50={a['p50_ms']} p99={a['p99_ms']} ms success={a['success']} | "
            f"with aggressor p50={d['p50_ms']} p99={d['p99_ms']} max={d['max_ms']} ms success={d['success']} "
            f"failed={d['failed']} | aggressor {agg}")


@pytest.mark.parametrize("flood", sorted(FLOODS))
def test_faults_fairness_victim_keeps_its_latency(faults: Faults, flood: str) -> None:
    srv = faults.server("nginx")
    faults.wait_agents_idle()
    shed_before = faults.metric_sum(srv.node, "tcp_close_total", error="shed: fair_share")
    log = faults.sb.node_process_log(srv.node, agent_process(srv.node))
    log_at = log.stat().st_size
    meshed = _round(faults, flood)
    with open(log, "rb") as f:
        f.seek(log_at)
        events = [line.decode(errors="replace").strip() for line in f if b"event=fairness" in line]
    shed = faults.metric_sum(srv.node, "tcp_close_total", error="shed: fair_share") - shed_before
    with faults.unmeshed():
        direct = _round(faults, flood)
    print(f"fairness cni={faults.cni} {flood} flood, meshed (shed {shed:.0f}): " + _line("", meshed))
    print(f"fairness cni={faults.cni} {flood} flood, direct: " + _line("", direct))
    print(f"fairness cni={faults.cni} {flood} flood, agent log on {srv.node}: {len(events)} fairness events, "
          f"first {events[:4]}")
    for r in (meshed["alone"], direct["alone"]):
        assert r["success"] == 1.0, r
    d, base = meshed["during"], meshed["alone"]["p99_ms"]
    assert d["success"] >= 0.99, meshed
    assert d["p99_ms"] <= base + P99_BOUND_MS, (meshed, direct)
