"""Issue 12, the /ready-vs-/metrics part of the cardinality row: a big /metrics must not slow /ready.

Before: 20,000 distinct Host headers made a 365 MB /metrics that took 20.5 s to render on the agent
parent's event loop; /ready took 1.5-2 s meanwhile, and the redirector (500 ms probe timeout, 2 s
grace) took the node's capture out 17 times in 60 s. Here 1,500 distinct Host headers grow the
agents' /metrics (whatever caps the telemetry side applies, the point is a scrape that takes a
while); two scrapers fetch it back to back while /ready is probed every 20 ms: no probe comes near
the redirector's probe timeout (0.5 s), and no redirector fails open. (The worst probes are the loop's own
telemetry work on that many series, slowed further by the render thread's share of the interpreter:
printed next to the same probes without scrapes.)
"""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest
from faults_harness import Faults
from nodemesh.api.model import ADMIN_PORT
from nodemesh.manifests.sandbox_install import redirector_process
from nodemesh.sandbox.testing import agent_admin_request

pytestmark = pytest.mark.root

HOSTS = 1500
SCRAPE_S = 8.0
SCRAPERS = 2        # scraping back to back (Prometheus scrapes every 15-60 s)


def _get(url: str | urllib.request.Request, timeout: float) -> tuple[int, float]:
    t0 = time.monotonic()
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        size = len(resp.read())
    return size, time.monotonic() - t0


def _scrape(url: urllib.request.Request, stop: float, out: list[tuple[int, float]]) -> None:
    while time.monotonic() < stop:
        out.append(_get(url, 60))


def test_faults_ready_stays_quick_while_metrics_is_scraped(faults: Faults) -> None:
    srv = faults.server("nginx")
    for route, client, _ in faults.routes("nginx"):
        out = faults.peer(client, "many-hosts", srv.ip, 8080, HOSTS // 2, 8)
        assert out == {"ok": HOSTS // 2, "failed": {}}, (route, out)
    logs = {n: faults.sb.node_process_log(n, redirector_process(n)) for n in faults.nodes}
    removed_before = {n: logs[n].read_text().count("event=capture_removed") for n in faults.nodes}
    for node in faults.nodes:
        base = f"http://{faults.nodes[node].ip}:{ADMIN_PORT}"
        quiet = []
        stop = time.monotonic() + 4
        while time.monotonic() < stop:
            quiet.append(_get(base + "/ready", 5)[1])
            time.sleep(0.02)
        quiet.sort()
        stop = time.monotonic() + SCRAPE_S
        scrapes: list[tuple[int, float]] = []

        threads = [threading.Thread(target=_scrape, args=(agent_admin_request(faults.sb.state_dir, base + "/metrics"), stop, scrapes)) for _ in range(SCRAPERS)]
        for t in threads:
            t.start()
        probes = []
        while any(t.is_alive() for t in threads):
            probes.append(_get(base + "/ready", 5)[1])
            time.sleep(0.02)
        for t in threads:
            t.join()
        probes.sort()
        print(f"scrape cni={faults.cni} {node}: /metrics {len(scrapes)} scrapes, "
              f"{max(s for s, _ in scrapes) / 1e6:.1f} MB, slowest {max(d for _, d in scrapes):.2f} s | "
              f"/ready {len(probes)} probes p50 {probes[len(probes) // 2] * 1000:.0f} ms "
              f"max {probes[-1] * 1000:.0f} ms; without scrapes p50 {quiet[len(quiet) // 2] * 1000:.0f} ms "
              f"max {quiet[-1] * 1000:.0f} ms")
        # The redirector gives a probe 0.5 s (and fails open after 2 s of failed ones).
        assert scrapes and probes[-1] < 0.5, probes[-5:]
    removed = {n: logs[n].read_text().count("event=capture_removed") - removed_before[n] for n in faults.nodes}
    assert removed == {n: 0 for n in faults.nodes}, removed
