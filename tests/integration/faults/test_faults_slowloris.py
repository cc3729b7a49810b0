"""Issue 12, the slowloris row: one pod holds 2,000 connections to nginx, each sending its request
head at one byte a second, while another pod runs keep-alive requests to the same nginx.

Before: detection gave up after 1 s and relayed the rest as opaque TCP, so every slow connection was
held by the agent (and nginx) for as long as the client liked (>= 45 s, no 408), and 4,000 of them
cost the other pod ~5 % of its throughput. Want: each slow connection answered 408 (at once past the
per-pod cap on slow connections, at the header timeout below it), shed ones counted in a metric,
the other pod's requests all succeed (its throughput printed next to its own without the attack).
"""

from __future__ import annotations

import json
import time

import pytest
from faults_harness import AGENT_WORKERS, Faults

pytestmark = pytest.mark.root

SLOW = 2000
MAX_SLOW_PER_POD = 256      # admission.DEFAULT_MAX_SLOW, per worker
HEADER_TIMEOUT_S = 10.0     # the agent's default
NGINX_PORT = 8080


@pytest.mark.parametrize("attacker_route", ["same-node", "cross-node"])
def test_faults_slowloris_answered_and_costs_only_its_pod(faults: Faults, attacker_route: str) -> None:
    srv = faults.server("nginx")
    attacker = faults.client_near(srv, attacker_route == "same-node")
    victim = faults.client_near(srv, attacker_route != "same-node")
    faults.wait_agents_idle()
    shed_before = faults.metric_sum(attacker.node, "tcp_close_total", direction="outbound", error="shed: slow")
    alone = faults.peer(victim, "http-load", srv.ip, NGINX_PORT, "/ok", 8, 6)
    proc = faults.peer_background(attacker, "slowloris", srv.ip, NGINX_PORT, SLOW, 40)
    try:
        time.sleep(3)  # all 2,000 open (1,000 a second) and past the detection timeout
        during = faults.peer(victim, "http-load", srv.ip, NGINX_PORT, "/ok", 8, 6)
    finally:
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    out = json.loads(stdout.strip().splitlines()[-1])
    shed = faults.metric_sum(attacker.node, "tcp_close_total", direction="outbound", error="shed: slow") - shed_before
    ratio = during["rps"] / alone["rps"] if alone["rps"] else 0.0
    print(f"slowloris cni={faults.cni} attacker {attacker_route}: ends={out['ends']} "
          f"ended_p50_s={out['ended_p50_s']} ended_max_s={out['ended_max_s']} shed_slow_metric={shed:.0f} | "
          f"other pod alone rps={alone['rps']} during rps={during['rps']} ratio={ratio:.2f} "
          f"failed alone={alone['failed']} during={during['failed']}")
    # Every connection that connected was answered 408. Connects that time out: 1-6 of 2,000 seen with
    # the kernel's 60 s conntrack close_wait on the sandbox nodes, and still 6 (routed, cross-node) in
    # a full run with kube-proxy's 3600 s, 0 when the faults package ran alone (docs/agent.md, Known
    # gaps). Held to 1 % and printed, not hidden.
    connect_failed = sum(v for k, v in out["ends"].items() if k.startswith("connect_"))
    answered = {k: v for k, v in out["ends"].items() if not k.startswith("connect_")}
    assert answered == {"HTTP/1.1 408 Request Timeout": SLOW - connect_failed}, out
    assert connect_failed <= SLOW // 100, out
    assert out["ended_max_s"] <= HEADER_TIMEOUT_S + 8, out   # detection (1 s) + header timeout + slack
    # Past the per-pod cap, slow connections are answered at the detection timeout and counted. The
    # cap's slots free again as the first slow ones reach their header timeout (~11 s): on a loaded
    # machine a client whose first byte comes that late takes a freed slot instead (seen: 10 of 2,000).
    assert shed >= 0.97 * (SLOW - AGENT_WORKERS * MAX_SLOW_PER_POD), shed
    assert alone["failed"] == {} and during["failed"] == {}, (alone, during)
