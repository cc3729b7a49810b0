"""Issue 16 item 3: `stat`, `edges` and `routes` answered from Prometheus (`--backend prometheus`) give
the numbers the in-memory controller gives, for the same traffic, in the same run.

The real Debian `prometheus` server runs in node1's network namespace (beside the controller, which
asks it at 127.0.0.1) and scrapes both agents' `:4191/metrics` every 500 ms with the sandbox's
credential. Two clients send the stat harness's known mix (one server replica per node, every 5th
request a designed 500, a fixed mix of sleeps) for 20 s; then each question is asked of both
backends over a window that holds the whole run. Tolerances (the issue's): success within 0.5
percentage points, RPS within 2 %, each latency quantile in the same Linkerd bucket.

The controller is installed with `statBackend=prometheus`, so the dashboard (which asks the
controller's default backend) answers from Prometheus too: its rows agree, and its warning shows
when Prometheus misses an agent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from nodemesh.api.model import CONTROLLER_WEB_PORT
from nodemesh.manifests.sandbox_install import CONTROLLER_PROCESS, TOKEN_FILE, install_sandbox
from nodemesh.sandbox.testing import running_sandbox
from stat_harness import NS, Mesh, broken_records, bucket_of, traffic_manifest, wait_until

pytestmark = pytest.mark.root

PROM_PORT = 19090
PROCESS = "prometheus"
RATE = 20.0
RUN_S = 20.0
SPAN_S = 45.0     # ask when the series are this old: Prometheus extrapolates by up to a scrape / span
WINDOW = "1m"


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    assert shutil.which("prometheus"), "Debian's prometheus package is installed by scripts/bootstrap.sh --test"
    with running_sandbox(nodes=2, manifests=[traffic_manifest()], timeout=60) as sb:
        controller = install_sandbox(sb.name, timeout=60, progress=lambda msg: None,
                                     sets=(f"prometheusUrl=http://127.0.0.1:{PROM_PORT}", "statBackend=prometheus"))
        state = Path(sb.state_dir)
        token = (state / TOKEN_FILE).read_text().split()[0]
        cred = state / "prometheus.token"
        cred.write_text(token)
        cred.chmod(0o600)
        nodes = sb.nodes()
        config = {
            "global": {"scrape_interval": "500ms", "scrape_timeout": "450ms"},
            "scrape_configs": [{
                "job_name": "nodemesh-agent",
                "authorization": {"type": "Bearer", "credentials_file": str(cred)},
                "static_configs": [{"targets": [f"{n.ip}:4191" for n in nodes]}],
            }],
        }
        (state / "prometheus.yml").write_text(yaml.safe_dump(config))
        sb.start_node_process(nodes[0].name, PROCESS, [
            "prometheus", f"--config.file={state / 'prometheus.yml'}",
            f"--storage.tsdb.path={state / 'prometheus-data'}",
            f"--web.listen-address=0.0.0.0:{PROM_PORT}", "--log.level=warn",
        ])
        m = Mesh(sb, controller, (state / TOKEN_FILE).read_text().strip())
        prom = f"http://{nodes[0].ip}:{PROM_PORT}"
        wait_until(lambda: _targets_up(prom) == len(nodes), 60, "prometheus scraping both agents")
        try:
            yield m
        finally:
            sb.stop_node_process(nodes[0].name, PROCESS)


def _targets_up(prom: str) -> int:
    with urllib.request.urlopen(f"{prom}/api/v1/targets", timeout=2) as resp:
        body = json.load(resp)
    return sum(1 for t in body["data"]["activeTargets"] if t["health"] == "up")


def _dashboard(mesh: Mesh, path: str, **params: str) -> dict:
    """The controller's dashboard JSON API, as a script calls it (bearer token)."""
    host = mesh.controller.rsplit(":", 1)[0]
    url = f"http://{host}:{CONTROLLER_WEB_PORT}{path}?{urllib.parse.urlencode(params)}"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {mesh.token.split()[0]}"})
    with urllib.request.urlopen(req, timeout=20) as resp:
        return json.load(resp)


def _same(what: str, memory: dict, prom: dict, problems: list[str], lines: list[str]) -> None:
    lines.append(f"{what}: success {memory['success']}/{prom['success']} rps {memory['rps']}/{prom['rps']} "
                 f"p50 {memory['latency_ms_p50']}/{prom['latency_ms_p50']} "
                 f"p99 {memory['latency_ms_p99']}/{prom['latency_ms_p99']} (memory/prometheus)")
    if memory["success"] is None or prom["success"] is None or abs(memory["success"] - prom["success"]) > 0.005:
        problems.append(f"{what}: success {memory['success']} vs {prom['success']}")
    if not memory["rps"] or prom["rps"] is None or abs(prom["rps"] - memory["rps"]) > 0.02 * memory["rps"]:
        problems.append(f"{what}: rps {memory['rps']} vs {prom['rps']}")
    for key in ("latency_ms_p50", "latency_ms_p95", "latency_ms_p99"):
        if memory[key] is None or prom[key] is None or bucket_of(memory[key]) != bucket_of(prom[key]):
            problems.append(f"{what}: {key} {memory[key]} (bucket {bucket_of(memory[key] or 0)}) vs "
                            f"{prom[key]} (bucket {bucket_of(prom[key] or 0)})")


def test_stat_prometheus_backend_agrees_with_memory(mesh: Mesh, tmp_path: Path) -> None:
    started = time.time()
    records = [r for recs in mesh.run_clients(tmp_path, RUN_S, "prom", RATE).values() for r in recs]
    assert records and not broken_records(records), mesh.explain_broken(records)
    total = len(records)
    wait_until(lambda: mesh.responses_seen("server", 60) >= total, 20, f"{total} responses counted")
    # The series were born when the run began; ask once they have a long history of scrapes.
    time.sleep(max(0.0, started + SPAN_S - time.time()))

    queries = {
        "stat deploy/server": (["stat", "deploy/server"], "server", "deployment"),
        "stat deploy --from client1": (["stat", "deploy", "--from", "deploy/client1"], "server", "deployment"),
        "stat deploy --to server (client2)": (["stat", "deploy", "--to", "deploy/server"], "client2", "deployment"),
        "stat svc (server)": (["stat", "svc"], "server", "service"),
        "stat ns": (["stat", "ns", NS, "-n", NS], NS, "namespace"),
    }
    problems: list[str] = []
    lines: list[str] = []
    for what, (args, name, kind) in queries.items():
        answers = {}
        for backend in ("memory", "prometheus"):
            out = mesh.cli(*args, "-n", NS, "-t", WINDOW, "-o", "json", "--backend", backend)
            assert out.returncode == 0, f"{what} --backend {backend}: {out.stderr}"
            assert "warning" not in out.stderr, out.stderr
            rows = [r for r in json.loads(out.stdout) if r["name"] == name and r["kind"] == kind]
            assert len(rows) == 1, f"{what} --backend {backend}: {out.stdout}"
            answers[backend] = rows[0]
        _same(what, answers["memory"], answers["prometheus"], problems, lines)
        if what == "stat deploy/server":
            server_row = answers

    # The dashboard asks the controller's default backend (prometheus here): the same rows.
    api = _dashboard(mesh, "/api/stat", type="deploy", namespace=NS, window=WINDOW)
    assert not api["warning"], api
    (row,) = [r for r in api["rows"] if r["name"] == "server"]
    memory_server = server_row["memory"]
    _same("dashboard /api/stat deploy/server", memory_server, row, problems, lines)
    page = _dashboard(mesh, "/api/workload", namespace=NS, type="deploy", name="server", window=WINDOW)
    _same("dashboard /api/workload deploy/server", memory_server, page["stat"], problems, lines)
    assert {c["peer"]["name"] for c in page["callers"]} == {"client1", "client2"}, page["callers"]
    # Its sparklines come from Prometheus too (range queries, one snapshot per step): the steps
    # add up to the requests the run sent, at the run's success rate.
    step = 10
    spark = _dashboard(mesh, "/api/workload", namespace=NS, type="deploy", name="server", window=WINDOW,
                       step=str(step))["series"]
    moved = [p for p in spark["points"] if p["rps"]]
    counted = sum(p["rps"] * step for p in moved)
    ok = sum(p["rps"] * step * p["success"] for p in moved)
    lines.append(f"dashboard sparklines (prometheus, {step}s steps): {len(moved)} steps with traffic, "
                 f"{counted:.0f} requests of {total}, success {ok / counted if counted else None}")
    # increase() extrapolates each step at both its edges (here +2.6 % over 3 steps of 10 s,
    # scrapes every 500 ms): a per-step tolerance wider than the one-window stat's 2 %.
    if not moved or abs(counted - total) > 0.08 * total:
        problems.append(f"sparklines: {counted:.0f} requests counted over the steps, {total} sent ({spark})")
    elif abs(ok / counted - memory_server["success"]) > 0.01:
        problems.append(f"sparklines: success {ok / counted} vs {memory_server['success']}")
    check = mesh.cli("check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert (f"\u2713 stat backend prometheus (http://127.0.0.1:{PROM_PORT}): holds metrics of 2 of the 2 ready "
            f"agents") in check.stdout, check.stdout

    for args, key in ((["edges", "deploy"], lambda e: (e["src"], e["dst"])),
                      (["routes", "deploy/server"], lambda r: r["route"])):
        got = {}
        for backend in ("memory", "prometheus"):
            out = mesh.cli(*args, "-n", NS, "-t", WINDOW, "-o", "json", "--backend", backend)
            assert out.returncode == 0, f"{' '.join(args)} --backend {backend}: {out.stderr}"
            got[backend] = json.loads(out.stdout)
        lines.append(f"{' '.join(args)}: memory {got['memory']} / prometheus {got['prometheus']}")
        if args[0] == "edges":
            assert sorted(map(str, map(key, got["memory"]))) == sorted(map(str, map(key, got["prometheus"]))), lines[-1]
        else:
            memory = {key(r): r for r in got["memory"]}
            prom = {key(r): r for r in got["prometheus"]}
            assert memory.keys() == prom.keys(), lines[-1]
            for route, row in memory.items():
                if row.get("rps"):
                    _same(f"routes deploy/server {route}", row, prom[route], problems, lines)
    print("\n".join(lines))
    assert not problems, "\n".join(problems)


def test_stat_prometheus_controller_without_ingest_answers_from_prometheus_alone(mesh: Mesh) -> None:
    """`--no-ingest` (ingest=false): the controller keeps no metrics — the agents' reports are
    acknowledged (their history stays short) and dropped — and still answers stat and the
    dashboard, from Prometheus; `--backend memory` is one clear line."""
    sb = mesh.sb
    node = sb.nodes()[0].name
    sets = (f"prometheusUrl=http://127.0.0.1:{PROM_PORT}", "statBackend=prometheus")
    sb.stop_node_process(node, CONTROLLER_PROCESS)
    install_sandbox(sb.name, timeout=60, progress=lambda msg: None, sets=(*sets, "ingest=false"))
    try:
        prom = f"http://{sb.nodes()[0].ip}:{PROM_PORT}"
        out = mesh.cli("stat", "deploy/server", "-n", NS, "-t", "5m", "-o", "json")
        assert out.returncode == 0, out.stderr
        (row,) = json.loads(out.stdout)
        assert row["rps"] and row["success"] is not None, row            # the earlier traffic, from Prometheus
        memory = mesh.cli("stat", "deploy", "-n", NS, "--backend", "memory")
        assert memory.returncode != 0 and "this controller keeps no metrics (--no-ingest)" in memory.stderr, \
            (memory.stdout, memory.stderr)
        page = _dashboard(mesh, "/api/workload", namespace=NS, type="deploy", name="server", window="5m")
        assert page["stat"]["rps"] and any(p["rps"] for p in page["series"]["points"]), page["stat"]
        # The agents' reports arrive and are acknowledged (the seq: unit test), and nothing is kept.
        wait_until(lambda: _controller_metric(mesh, "nodemesh_controller_reports_received_total") >= 4, 20,
                   "reports arriving at the controller")
        assert _controller_metric(mesh, "nodemesh_controller_series_tracked") == 0
        assert _query(prom, "count(nodemesh_report_history_dropped_total > 0)") is None   # none lost unacked
    finally:
        sb.stop_node_process(node, CONTROLLER_PROCESS)
        install_sandbox(sb.name, timeout=60, progress=lambda msg: None, sets=sets)


def _controller_metric(mesh: Mesh, name: str) -> float:
    host = mesh.controller.rsplit(":", 1)[0]
    with urllib.request.urlopen(f"http://{host}:{CONTROLLER_WEB_PORT}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0].split("{")[0] == name)


def _query(prom: str, expr: str) -> float | None:
    with urllib.request.urlopen(f"{prom}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=5) as resp:
        result = json.load(resp)["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_stat_prometheus_backend_warns_when_it_misses_an_agent(mesh: Mesh) -> None:
    """Numbers from Prometheus are only as complete as its scrapes: with one agent no longer
    scraped, the rows still come, and stderr says what is missing."""
    state = Path(mesh.sb.state_dir)
    config = yaml.safe_load((state / "prometheus.yml").read_text())
    nodes = mesh.sb.nodes()
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"{nodes[0].ip}:4191"]}]
    (state / "prometheus.yml").write_text(yaml.safe_dump(config))
    pid = mesh.sb.node_process_pid(PROCESS)
    assert pid is not None
    os.kill(pid, signal.SIGHUP)  # reload: the dropped target's series are marked stale at once
    prom = f"http://{nodes[0].ip}:{PROM_PORT}"
    wait_until(lambda: _count_agents(prom) == 1, 30, "Prometheus holding one agent's metrics")
    for args in (["stat", "deploy"], ["edges", "deploy"], ["routes", "deploy/server"]):
        out = mesh.cli(*args, "-n", NS, "--backend", "prometheus")
        assert out.returncode == 0, out.stderr
        assert "warning: Prometheus holds current metrics of 1 of the 2 agents connected" in out.stderr, out.stderr
        memory = mesh.cli(*args, "-n", NS, "--backend", "memory")
        assert "warning" not in memory.stderr, memory.stderr
    # The dashboard answers from the controller's default backend (prometheus): it says so too.
    for path, params in (("/api/stat", {"type": "deploy", "namespace": NS}),
                         ("/api/workload", {"type": "deploy", "namespace": NS, "name": "server"})):
        body = _dashboard(mesh, path, **params)
        assert "Prometheus holds current metrics of 1 of the 2 agents connected" in body["warning"], body
    # And `nodemesh check` fails on it, naming what is missing.
    check = mesh.cli("check")
    assert check.returncode == 1, check.stdout
    assert f"\u00d7 stat backend prometheus (http://127.0.0.1:{PROM_PORT}): holds metrics of 1 of the 2 ready " \
           f"agents" in check.stdout, check.stdout


def _count_agents(prom: str) -> int:
    query = urllib.parse.urlencode({"query": "count(nodemesh_report_history_bytes)"})
    with urllib.request.urlopen(f"{prom}/api/v1/query?{query}", timeout=2) as resp:
        result = json.load(resp)["data"]["result"]
    return int(float(result[0]["value"][1])) if result else 0


def test_stat_prometheus_backend_errors_are_one_clear_line(mesh: Mesh) -> None:
    bad = mesh.cli("stat", "deploy", "-n", NS, "--backend", "nosuch")
    assert bad.returncode != 0 and "nosuch" in bad.stderr
    # Prometheus down: the answer is an error naming it, quickly, and the memory backend still answers.
    node = mesh.sb.nodes()[0].name
    mesh.sb.stop_node_process(node, PROCESS)
    t0 = time.monotonic()
    down = mesh.cli("stat", "deploy", "-n", NS, "--backend", "prometheus")
    took = time.monotonic() - t0
    assert down.returncode != 0, down.stdout
    assert "prometheus backend" in down.stderr and f"127.0.0.1:{PROM_PORT}" in down.stderr, down.stderr
    assert took < 15, took
    assert mesh.cli("stat", "deploy", "-n", NS, "--backend", "memory").returncode == 0
    check = mesh.cli("check")
    assert check.returncode == 1 and "\u00d7 stat backend prometheus" in check.stdout, check.stdout
    assert f"127.0.0.1:{PROM_PORT}" in check.stdout.split("\u00d7 stat backend prometheus", 1)[1], check.stdout
