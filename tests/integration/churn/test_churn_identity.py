"""Issue 10, must-show 1: the numbers stay true while the cluster changes.

On a 2-node sandbox of each CNI style, with the mesh installed FIRST (controller, agents and
redirectors, as `nodemesh install --sandbox`), one timeline runs four scenarios in four new
namespaces at once, while clients keep steady load on long-lived connections (HTTP/1.1 keep-alive
and a gRPC channel), each client a pod started by the kubelet after the mesh (its first
connections race the mesh's knowledge of it):

  t=0    apps: HTTP server (2 replicas) + gRPC server + client                 (ns ch-apps)
         rollout: the same                                                     (ns ch-roll)
         scale: HTTP server (1) + client                                       (ns ch-scale)
         reuse: HTTP server + client `old` on a fixed pod IP, 10 s of load     (ns ch-reuse)
  t=6    scale: 1 -> 5 replicas
  t=8    rollout: both servers' templates change (rolling update: surge, then graceful termination)
  t=12   reuse: `old`'s pod terminated as Kubernetes does; a client `new` of another Deployment gets
         the same IP, starts sending at once, and its status (with the IP) is written 0.65 s after it starts
  t=17   scale: 5 -> 1 (graceful)
  t=20   node2's agent restarted the way a DaemonSet update does (new agent up, old one drains)
  t=30   clients stop; every record is in

Then, per client/server pair, `stat` (inbound, --from, --to, svc) and `edges` must equal the clients'
own records: success within ±0.5 pp, RPS within ±2 %, latency quantiles in the true bucket. And no
request of a meshed pod is attributed to `unknown` (the agents' own series), none of `new`'s to `old`.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from churn_harness import (
    Compare,
    Record,
    agent_metrics,
    client,
    docs,
    find_row,
    grpc_server,
    http_server,
    namespace,
    pod_ips,
    records_of,
    service,
    window_holds,
)
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.cli.client import controller_channel
from nodemesh.manifests.sandbox_install import TOKEN_FILE, agent_process, install_sandbox
from nodemesh.manifests.sandboxfiles import sandbox_ca
from nodemesh.sandbox import lifecycle, objects
from nodemesh.sandbox.testing import running_sandbox
from stat_harness import Mesh

pytestmark = pytest.mark.root

WINDOW_S = 180  # holds the whole timeline (the namespaces are new: nothing else is in it)
RUN_S = 30.0
OLD_RUN_S = 10.0
NEW_RUN_S = 14.0
HTTP_CONNS = 4  # churn_client.py's default keep-alive connections
APPS, ROLL, SCALE, REUSE = "ch-apps", "ch-roll", "ch-scale", "ch-reuse"
NAMESPACES = (APPS, ROLL, SCALE, REUSE)


@dataclass
class Run:
    mesh: Mesh
    cni: str
    records: dict[str, list[Record]] = field(default_factory=dict)   # client deployment key -> records
    events: dict[str, float] = field(default_factory=dict)           # what happened when (epoch s)
    reused_ip: str = ""
    old_agent_id: str = ""
    new_agent_ids: set[str] = field(default_factory=set)
    cluster_ips: dict[str, str] = field(default_factory=dict)


def _svc_ips(mesh: Mesh) -> dict[str, str]:
    base = mesh.sb.plan.service_cidr.network_address
    names = [f"{ns}/{s}" for ns in NAMESPACES for s in ("server", "grpc")]
    return {name: str(base + 200 + i) for i, name in enumerate(names)}


def _agent_id(mesh: Mesh, node: str, process: str) -> str:
    """The agent_id an agent process reported to the controller (its log's telemetry_started)."""
    log = mesh.sb.node_process_log(node, process)
    for line in (log.read_text(errors="replace") if log.exists() else "").splitlines():
        if "event=telemetry_started" in line:
            return dict(part.split("=", 1) for part in line.split() if "=" in part).get("agent_id", "")
    return ""


def _restart_agent(mesh: Mesh, node: str) -> None:
    """What a DaemonSet rolling update does on one node: the new agent starts beside the old one
    (SO_REUSEPORT), is ready, then the old one gets SIGTERM and drains."""
    sb = mesh.sb
    old = agent_process(node)
    spec = sb.state.infra()["node_processes"][old]
    new = f"{old}-b"
    log = sb.node_process_log(node, new)
    sb.start_node_process(node, new, spec["argv"], env=spec.get("env"))
    deadline = time.monotonic() + 30
    while "event=agent_ready" not in (log.read_text(errors="replace") if log.exists() else ""):
        assert time.monotonic() < deadline, "the new agent did not become ready"
        time.sleep(0.05)
    sb.stop_node_process(node, old, timeout=40.0)


def _run_timeline(mesh: Mesh, tmp: Path, run: Run) -> None:
    sb = mesh.sb
    ips = run.cluster_ips = _svc_ips(mesh)
    out = {k: tmp / f"{k}.json" for k in ("apps", "roll", "scale", "old", "new")}
    node1 = sb.node("node1")
    run.reused_ip = str(sb.plan.pod_cidr(node1.index).network_address + 200)

    def both(ns: str, version: str = "1") -> str:
        return docs(http_server(ns, "server", 2, version), grpc_server(ns, "grpc", 1, version))

    servers = docs(
        *(namespace(ns) for ns in NAMESPACES),
        *(service(ns, "server", 80, ips[f"{ns}/server"]) for ns in NAMESPACES),
        *(service(ns, "grpc", 9090, ips[f"{ns}/grpc"]) for ns in (APPS, ROLL)),
        both(APPS), both(ROLL), http_server(SCALE, "server", 1), http_server(REUSE, "server", 1),
    )
    sb.apply(text=servers)
    sb.wait_ready(timeout=60)

    def load(ns: str, name: str, key: str, duration: float, grpc_too: bool, **kw: Any) -> str:
        return client(ns, name, out[key], duration, http=f"{ips[f'{ns}/server']}:80",
                      grpc=f"{ips[f'{ns}/grpc']}:9090" if grpc_too else "", host=f"server.{ns}", **kw)

    t0 = time.time()
    run.events["clients"] = t0
    sb.apply(text=docs(load(APPS, "client", "apps", RUN_S, True), load(ROLL, "client", "roll", RUN_S, True),
                       load(SCALE, "client", "scale", RUN_S, False),
                       load(REUSE, "old", "old", OLD_RUN_S, False,
                            annotations={objects.POD_IP_ANNOTATION: run.reused_ip})))

    def at(t: float) -> None:
        time.sleep(max(0.0, t0 + t - time.time()))

    at(6)
    sb.apply(text=http_server(SCALE, "server", 5))
    run.events["scale_up"] = time.time()
    at(8)
    run.events["rollout"] = time.time()
    lifecycle.rollout(sb, http_server(ROLL, "server", 2, "2"), ROLL, "server", pre_stop_s=1.0)
    lifecycle.rollout(sb, grpc_server(ROLL, "grpc", 1, "2"), ROLL, "grpc", pre_stop_s=1.0)
    at(12)
    (old,) = [p["metadata"]["name"] for p in sb.pods(REUSE) if p["metadata"]["name"].startswith("old-")]
    run.events["old_terminated"] = time.time()
    lifecycle.terminate_pods(sb, [(REUSE, old)], pre_stop_s=0.2, linger_s=0.5)
    run.events["new_created"] = time.time()
    sb.apply(text=load(REUSE, "new", "new", NEW_RUN_S, False,
                       annotations={objects.POD_IP_ANNOTATION: run.reused_ip,
                                    # the held requests' latency lands mid-bucket (500, 1000], and
                                    # the hold well inside the agent's 1 s wait
                                    objects.STATUS_DELAY_ANNOTATION: "0.65"}))
    at(17)
    run.events["scale_down"] = time.time()
    lifecycle.scale_down(sb, SCALE, "server", 1, http_server(SCALE, "server", 1), pre_stop_s=1.0)
    at(20)
    run.old_agent_id = _agent_id(mesh, "node2", agent_process("node2"))
    run.events["agent_restart"] = time.time()
    _restart_agent(mesh, "node2")
    run.events["agent_restarted"] = time.time()
    for key, path in out.items():
        run.records[key] = records_of(path, timeout=RUN_S + 60)
    run.new_agent_ids = {_agent_id(mesh, "node2", f"{agent_process('node2')}-b")}


@pytest.fixture(scope="module", params=["bridge", "routed"])
def churn(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    cni = request.param
    tmp = tmp_path_factory.mktemp(f"churn-{cni}")
    started = time.monotonic()
    with running_sandbox(nodes=2, cni=cni, timeout=60) as sb:
        controller = install_sandbox(sb.name, timeout=60, progress=lambda msg: None)
        token = (Path(sb.state_dir) / TOKEN_FILE).read_text().strip()
        run = Run(Mesh(sb, controller, token), cni)
        _run_timeline(run.mesh, tmp, run)
        t0 = run.events["clients"]
        print(f"\n[{cni}] timeline done in {time.monotonic() - started:.0f}s (sandbox + install + scenarios); "
              + " ".join(f"{k}=+{v - t0:.1f}s" for k, v in run.events.items()))
        yield run


# ---------------------------------------------------------------------------- helpers
def _counts(mesh: Mesh, ns: str, name: str) -> int:
    with controller_channel(mesh.controller, sandbox_ca(mesh.sb.state_dir)) as channel:
        resp = pb_grpc.ControllerStub(channel).StatSummary(
            pb.StatRequest(selector=pb.Resource(namespace=ns, type="deployment", name=name), window_seconds=WINDOW_S),
            timeout=5, metadata=(("authorization", f"Bearer {mesh.token}"),))
    return sum(r.success_count + r.failure_count for r in resp.rows)


def _wait_counted(mesh: Mesh, ns: str, name: str, n: int) -> None:
    deadline = time.monotonic() + 30
    while _counts(mesh, ns, name) < n:
        assert time.monotonic() < deadline, f"{ns}/{name}: {_counts(mesh, ns, name)} of {n} responses counted"
        time.sleep(0.25)


def _by(records: list[Record], kind: str) -> list[Record]:
    return [r for r in records if r["kind"] == kind]


def _check_pair(c: Compare, mesh: Mesh, ns: str, caller: str, records: list[Record],
                servers: dict[str, list[Record]], answers: dict[str, Any]) -> None:
    """Every view of caller -> each server: inbound, --from, --to, svc, edges."""
    for server, recs in servers.items():
        if not recs:
            continue
        c.row(f"[{ns}] stat deploy/{server} (inbound)", find_row(answers["inbound"].rows, server, "deployment"),
              answers["inbound_records"][server], answers["inbound_latency_records"][server])
        c.row(f"[{ns}] stat deploy --from deploy/{caller} -> {server}",
              find_row(answers[f"from-{caller}"].rows, server, "deployment"), recs)
        c.row(f"[{ns}] stat deploy --to deploy/{server} ({caller} row)",
              find_row(answers[f"to-{server}"].rows, caller, "deployment"), recs)
        c.row(f"[{ns}] stat svc/{server}", find_row(answers["svc"].rows, server), answers["inbound_records"][server])
        edges = [(e["src"], e["dst"]) for e in answers["edges"]]
        c.check(f"[{ns}] edges: {caller} -> {server}", (caller, server) in edges, f"missing from {edges}")


def _held_at_start(records: list[Record]) -> list[Record]:
    """A pod whose identity its agent waits for (the reuse scenario's `new`, status written late on
    purpose): the first request of each connection opened in its first second was held by its own
    node's agent. That time is the outbound agent's: in --from/--to/svc (compared with every
    record), invisible to the server side's agent, so left out of the inbound row's latency."""
    if not records:
        return []
    first = min(r["start"] for r in records)
    held = sorted((r for r in records if r["start"] < first + 1.0), key=lambda r: r["start"])[:HTTP_CONNS]
    return [r for r in records if r not in held]


def _check_namespace(run: Run, ns: str, callers: dict[str, list[Record]],
                     held: tuple[str, ...] = ()) -> Compare:
    mesh = run.mesh
    servers = ("server", "grpc")
    inbound_records = {s: [r for recs in callers.values() for r in _by(recs, "http" if s == "server" else "grpc")]
                       for s in servers}
    inbound_latency = {s: [r for caller, recs in callers.items()
                           for r in (_held_at_start(_by(recs, "http" if s == "server" else "grpc"))
                                     if caller in held else _by(recs, "http" if s == "server" else "grpc"))]
                       for s in servers}
    for s, recs in inbound_records.items():
        if recs:
            _wait_counted(mesh, ns, s, sum(1 for r in recs if not r.get("stale")))
    t = f"{WINDOW_S}s"
    answers: dict[str, Any] = {
        "inbound": mesh.stat_json("deploy", "-n", ns, "-t", t),
        "svc": mesh.stat_json("svc", "-n", ns, "-t", t),
        "inbound_records": inbound_records,
        "inbound_latency_records": inbound_latency,
    }
    for caller in callers:
        answers[f"from-{caller}"] = mesh.stat_json("deploy", "-n", ns, "--from", f"deploy/{caller}", "-t", t)
    for s in servers:
        if inbound_records[s]:
            answers[f"to-{s}"] = mesh.stat_json("deploy", "-n", ns, "--to", f"deploy/{s}", "-t", t)
    res = mesh.cli("edges", "deploy", "-n", ns, "-t", t, "-o", "json")
    assert res.returncode == 0, res.stderr
    answers["edges"] = json.loads(res.stdout)
    c = Compare(WINDOW_S)
    first = min(r["start"] for recs in callers.values() for r in recs)
    c.check(f"[{ns}] window", window_holds(first, time.time(), WINDOW_S), "no longer holds the whole run")
    for caller, recs in callers.items():
        _check_pair(c, mesh, ns, caller, recs, {"server": _by(recs, "http"), "grpc": _by(recs, "grpc")}, answers)
    return c


# ---------------------------------------------------------------------------- the scenarios
def test_churn_apps_applied_after_install(churn: Run) -> None:
    _check_namespace(churn, APPS, {"client": churn.records["apps"]}).assert_ok()


def test_churn_rolling_update_under_load(churn: Run) -> None:
    recs = churn.records["roll"]
    replicas = {r["pod"] for r in recs if r.get("pod")}
    assert len(replicas) >= 4, f"the rollout replaced the HTTP replicas under load: {replicas}"
    _check_namespace(churn, ROLL, {"client": recs}).assert_ok()


def test_churn_scale_up_and_down(churn: Run) -> None:
    recs = churn.records["scale"]
    assert len({r["pod"] for r in recs if r.get("pod")}) >= 3, "the new replicas took traffic"
    _check_namespace(churn, SCALE, {"client": recs}).assert_ok()


def test_churn_pod_ip_reuse_is_never_misattributed(churn: Run) -> None:
    old, new = churn.records["old"], churn.records["new"]
    assert old and new
    assert max(r["end"] for r in old) < min(r["start"] for r in new), "old stopped before new started"
    c = _check_namespace(churn, REUSE, {"old": old, "new": new}, held=("new",))
    c.check("[reuse] the new pod sent from the old pod's IP",
            any(p["status"].get("podIP") == churn.reused_ip and p["metadata"]["name"].startswith("new-")
                for p in churn.mesh.sb.pods(REUSE)))
    c.assert_ok()


def test_churn_nothing_from_meshed_pods_is_unknown(churn: Run) -> None:
    ips = pod_ips(churn.mesh, NAMESPACES) | {churn.reused_ip} | set(churn.cluster_ips.values())
    unknown = [s for s in agent_metrics(churn.mesh)
               if (s["src_kind"] == "unknown" and s["src_name"] in ips)
               or (s["dst_kind"] == "unknown" and s["dst_name"] in ips)]
    assert not unknown, json.dumps(unknown[:5], indent=1)


def test_churn_agent_was_restarted_under_load(churn: Run) -> None:
    # The restart happened while every long-running client was sending (their numbers above held).
    assert churn.old_agent_id and all(churn.new_agent_ids) and churn.old_agent_id not in churn.new_agent_ids
    log = churn.mesh.sb.node_process_log("node2", f"{agent_process('node2')}-b").read_text(errors="replace")
    assert "event=controller_connected" in log
    for key in ("apps", "roll", "scale"):
        recs = churn.records[key]
        assert min(r["start"] for r in recs) < churn.events["agent_restart"] < max(r["end"] for r in recs)
    ipaddress.ip_address(churn.reused_ip)
