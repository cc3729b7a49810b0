"""Issue 12, the "controller down 60 s" row: the controller is killed (-9) under steady load and
stays down 60 s; the data plane never notices, and the new controller's `stat` over a window
holding the whole run counts exactly what the clients recorded — before the kill, during the
downtime and after (the agents replay their report history, agent/history.py). Before the history:
0 errors, but `stat` over 156 s counted 5,295 of 14,104 requests.

Tolerance: none. Closed-loop keep-alive clients to nginx record every 200 they read; a request in
flight when a client's time is up is finished and recorded; the window (2 min) holds the whole run
(asserted), and nothing else called nginx in it (the test first waits until nginx's 2 min window
is empty, so earlier tests of the package are out of it).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from faults_harness import NS, Faults, faults_cluster
from nodemesh.manifests.sandbox_install import CONTROLLER_PROCESS
from nodemesh.sandbox.proctools import alive

pytestmark = pytest.mark.root


@pytest.fixture(scope="module", params=["bridge", "routed"])
def faults(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faults]:
    """A cluster of its own (not the package's shared one): run right after the connect storms
    (32,000 connects leaving their TIME_WAIT and conntrack entries), the cross-node caller's count came
    out a few hundred short in 2 of 3 full runs (the server's side exact), never alone. Not proven why;
    perhaps the connect timeouts after floods (docs/agent.md, Known gaps). Counting
    across a controller restart is what this row checks, on nodes that start clean."""
    with faults_cluster(request.param, tmp_path_factory.mktemp(f"faults-controller-{request.param}")) as f:
        yield f

NGINX_PORT = 8080
BEFORE_S, DOWN_S, AFTER_S = 12.0, 60.0, 25.0
WINDOW = 120
CONNECTIONS = 2  # per client: steady, not saturating (other fault tests measure saturation)


def stat(faults: Faults, *args: str) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k not in ("NODEMESH_CONTROLLER", "NODEMESH_TOKEN")}
    env["NODEMESH_SANDBOX"] = faults.sb.name
    res = subprocess.run([sys.executable, "-m", "nodemesh", "stat", *args, "-n", NS, "-t", f"{WINDOW}s", "-o", "json"],
                         env=env, capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, f"stat {args}: {res.stderr}"
    return json.loads(res.stdout)


def counted(rows: list[dict[str, Any]], name: str) -> int:
    row = next((r for r in rows if r["name"] == name), None)
    return 0 if row is None or row["rps"] is None else round(row["rps"] * WINDOW)


def wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_faults_controller_down_60s_loses_no_counts(faults: Faults) -> None:
    nginx = faults.server("nginx")
    clients = {("same-node" if c.node == nginx.node else "cross-node"): c for c in faults.pods["client"]}
    assert set(clients) == {"same-node", "cross-node"}, clients
    wait(lambda: counted(stat(faults, "deploy/nginx"), "nginx") == 0, WINDOW + 30,
         "earlier traffic to nginx out of the window")

    run_s = BEFORE_S + DOWN_S + AFTER_S
    loads = {route: faults.peer_background(c, "http-load", nginx.ip, NGINX_PORT, "/ok", CONNECTIONS, run_s)
             for route, c in clients.items()}
    run_start = time.time()
    spec = None
    try:
        time.sleep(BEFORE_S)
        pid = faults.sb.node_process_pid(CONTROLLER_PROCESS)
        assert pid is not None
        spec = faults.sb.status()["node_processes"][CONTROLLER_PROCESS]
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        with faults.sb.state.infra_txn() as infra:  # before the sandbox's 1 s restart back-off ends
            infra.get("node_processes", {}).pop(CONTROLLER_PROCESS, None)
        wait(lambda: not alive(pid), 10, "the controller gone")
        while time.time() < t_kill + DOWN_S:
            assert faults.sb.node_process_pid(CONTROLLER_PROCESS) is None, "the controller came back early"
            time.sleep(1)
        faults.sb.start_node_process(spec["node"], CONTROLLER_PROCESS, spec["argv"], env=spec["env"])
        spec = None
        t_back = time.time()
    finally:
        if spec is not None:  # the test failed with the controller down: bring it back for the others
            faults.sb.start_node_process(spec["node"], CONTROLLER_PROCESS, spec["argv"], env=spec["env"])
        results = {}
        for route, proc in loads.items():
            out, err = proc.communicate(timeout=run_s + 60)
            assert proc.returncode == 0, f"{route}: {err}"
            results[route] = json.loads(out.strip().splitlines()[-1])
    run_end = time.time()
    ok = {route: r["ok"] for route, r in results.items()}
    assert all(r["failed"] == {} for r in results.values()), results  # the data plane never noticed
    total = sum(ok.values())

    wait(lambda: counted(stat(faults, "deploy/nginx"), "nginx") >= total, 60, "the whole run counted")
    started = time.time()
    server_rows = stat(faults, "deploy/nginx")
    caller_rows = stat(faults, "po", "--to", "deploy/nginx")
    assert math.floor(time.time()) - WINDOW <= math.floor(run_start), "the window must hold the whole run"
    got = counted(server_rows, "nginx")
    by_client = {route: counted(caller_rows, c.name) for route, c in clients.items()}
    print(f"controller down cni={faults.cni}: down {t_back - t_kill:.1f}s; stat counted {got} of {total} "
          f"client-recorded responses over {run_end - run_start:.0f}s (clients {ok}, stat per client "
          f"{by_client}); query {time.time() - started:.1f}s")
    assert got == total, (got, total)
    assert by_client == ok, (by_client, ok)
