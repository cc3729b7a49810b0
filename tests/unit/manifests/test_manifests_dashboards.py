"""Grafana dashboards and the Prometheus scrape config: they parse, match what agents export, and load.

Every query is parsed by promql-parser (Prometheus' own grammar, Rust bindings from PyPI); the
metric and label names it uses are checked against the api/model.py contract and against a real
Prometheus text exposition produced by the agent's own collector. The dashboard JSON is checked
for what Grafana needs to load it (uid, title, schemaVersion, panels with ids, gridPos, targets and
datasource, a datasource template variable).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from nodemesh.agent.metrics import METRICS
from nodemesh.agent.metrics_export import SnapshotCollector
from nodemesh.api import model
from nodemesh.manifests import observability as obs
from nodemesh.manifests.render import CONTROLLER_AUDIENCE, render_daemonset
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

# ---------------------------------------------------------------------------- the dashboards' queries

# Labels Prometheus (with manifests/prometheus.yaml's relabeling) puts on every scraped series.
TARGET_LABELS = ("job", "instance", "node", "pod")
PROCESS_METRICS = ("process_cpu_seconds_total", "process_resident_memory_bytes")


def dashboard_queries() -> Iterator[tuple[str, str, str]]:
    """(dashboard file, where, PromQL or label_values(...)) for every query of every dashboard."""
    for filename, dash in obs.dashboards().items():
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                yield filename, f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"]
        for var in dash["templating"]["list"]:
            if var["type"] == "query":
                yield filename, f"variable {var['name']}", var["query"]["query"]


_GRAFANA_VAR = re.compile(r"\$(\{[A-Za-z_][A-Za-z0-9_.:]*\}|[A-Za-z_][A-Za-z0-9_]*)")
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.*),\s*(?P<label>[A-Za-z_][A-Za-z0-9_]*)\)$")


def substitute_grafana_variables(expr: str) -> str:
    """What Prometheus receives: Grafana's interval variables become durations, the others values."""
    def one(m: re.Match[str]) -> str:
        name = m.group(1).strip("{}")
        return "5m" if name.startswith("__") and name.endswith(("interval", "range")) else "value"

    return _GRAFANA_VAR.sub(one, expr)


def query_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a dashboard query uses, from promql-parser's AST.

    `label_values(SELECTOR, LABEL)` (a Grafana variable query) is checked as SELECTOR plus LABEL.
    Raises ValueError when the PromQL does not parse.
    """
    text = substitute_grafana_variables(expr)
    extra_labels: set[str] = set()
    m = _LABEL_VALUES.match(text)
    if m:
        text, extra_labels = m.group("selector"), {m.group("label")}
    ast = promql_parser.parse(text)
    metrics: set[str] = set()
    label_names: set[str] = set(extra_labels)

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                metrics.add(node.name)
            label_names.update(mt.name for mt in node.matchers.matchers if mt.name != "__name__")
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            label_names.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            matching = node.modifier.matching
            if matching is not None:
                label_names.update(matching.labels)

    promql_parser.walk(ast, visit)
    return metrics, label_names


def dashboard_metric_names() -> set[str]:
    """Every metric name the dashboards query (for a check against a real agent /metrics scrape)."""
    names: set[str] = set()
    for _, _, expr in dashboard_queries():
        names |= query_names(expr)[0]
    return names


def exported_metric_names() -> set[str]:
    """The series names an agent's /metrics may carry, per the api/model.py contract."""
    counters_gauges = {model.REQUEST_TOTAL, model.RESPONSE_TOTAL, model.TCP_OPEN_TOTAL, model.TCP_CLOSE_TOTAL,
                       model.TCP_OPEN_CONNECTIONS, model.TCP_READ_BYTES_TOTAL, model.TCP_WRITE_BYTES_TOTAL,
                       model.CAPTURE_INSTALLED, model.ROUTE_REQUEST_TOTAL, model.ROUTE_RESPONSE_TOTAL}
    histograms = {model.RESPONSE_LATENCY_MS, model.TCP_CONNECTION_DURATION_MS, model.ROUTE_RESPONSE_LATENCY_MS}
    names = set(counters_gauges) | set(PROCESS_METRICS)
    for h in histograms:
        names |= {f"{h}_bucket", f"{h}_sum", f"{h}_count"}
    # `up` is Prometheus' own per-target series, there for every scrape target.
    return names | {"up"}


def exported_label_names() -> set[str]:
    return (set(model.PEER_LABELS) | set(model.RESPONSE_LABELS) | set(model.ROUTE_LABELS)
            | set(model.ROUTE_RESPONSE_LABELS) | {"le"} | set(TARGET_LABELS))


REPO = Path(__file__).resolve().parents[3]
GRAFANA_DIR = REPO / "manifests" / "grafana"
REGEN = os.environ.get("NODEMESH_REGEN_MANIFESTS") == "1"
QUERIES = list(dashboard_queries())
# Series the agent process itself exports (not per-peer): prometheus-client's process collector
# and the capture-state gauge. `up` is Prometheus' own per-target series.
AGENT_SELF = {"process_cpu_seconds_total", "process_resident_memory_bytes", model.CAPTURE_INSTALLED}


def _golden(path: Path, text: str) -> None:
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists() and path.read_text() == text, (
        f"{path.relative_to(REPO)} is stale: regenerate with NODEMESH_REGEN_MANIFESTS=1")


# ---------------------------------------------------------------------------- golden files

@pytest.mark.parametrize("filename", sorted(obs.dashboards()))
def test_manifests_committed_dashboard_json_is_current(filename: str) -> None:
    _golden(GRAFANA_DIR / filename, obs.dashboard_json(obs.dashboards()[filename]))


def test_manifests_no_stray_dashboard_files() -> None:
    assert sorted(p.name for p in GRAFANA_DIR.glob("*.json")) == sorted(obs.dashboards())


@pytest.mark.parametrize("addon", ["prometheus", "grafana"])
def test_manifests_committed_addon_manifest_is_current(addon: str) -> None:
    _golden(REPO / "manifests" / f"{addon}.yaml", obs.render_addon(addon))


# ---------------------------------------------------------------------------- PromQL

def test_manifests_dashboards_have_queries() -> None:
    assert len(QUERIES) > 60
    assert {q[0] for q in QUERIES} == set(obs.dashboards())


@pytest.mark.parametrize("filename, where, expr", QUERIES, ids=[f"{q[0]}:{q[1]}" for q in QUERIES])
def test_manifests_query_parses_and_uses_only_exported_names(filename: str, where: str, expr: str) -> None:
    try:
        metrics, label_names = query_names(expr)
    except ValueError as exc:
        pytest.fail(f"{filename} {where}: PromQL does not parse: {exc}\n{expr}")
    assert metrics, f"{filename} {where}: no metric selected"
    unknown = metrics - exported_metric_names()
    assert not unknown, f"{filename} {where}: metrics agents do not export: {unknown}"
    unknown_labels = label_names - exported_label_names()
    assert not unknown_labels, f"{filename} {where}: labels agents do not export: {unknown_labels}"


def test_manifests_query_check_catches_bad_queries() -> None:
    # The checker itself must be able to fail: a misspelt metric, an unknown label, a syntax error.
    metrics, label_names = query_names('sum by (dst_nmae) (rate(request_totl{direction="inbound"}[5m]))')
    assert metrics == {"request_totl"} and label_names == {"dst_nmae", "direction"}
    assert not metrics <= exported_metric_names()
    with pytest.raises(ValueError):
        query_names("sum(rate(request_total[5m])")
    assert query_names('label_values(request_total{dst_namespace="$namespace"}, dst_name)') == (
        {"request_total"}, {"dst_namespace", "dst_name"})
    assert query_names("a / on (node) group_left b")[1] == {"node"}


def _aggregations(expr: str) -> list[Any]:
    found: list[Any] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.AggregateExpr):
            found.append(node)

    promql_parser.walk(promql_parser.parse(substitute_grafana_variables(expr)), visit)
    return found


def test_manifests_histogram_quantiles_keep_le() -> None:
    # histogram_quantile over an aggregation that drops `le` returns nothing: a silent empty panel.
    for filename, where, expr in QUERIES:
        if "histogram_quantile" not in expr:
            continue
        aggs = _aggregations(expr)
        assert aggs and all("le" in a.modifier.labels for a in aggs), f"{filename} {where}: {expr}"


def test_manifests_legends_name_labels_the_query_keeps() -> None:
    for filename, dash in obs.dashboards().items():
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                wanted = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"]))
                if not wanted:
                    continue
                kept = {label for a in _aggregations(target["expr"]) if a.modifier is not None
                        for label in a.modifier.labels}
                assert wanted <= kept, f"{filename} {panel['title']}: legend {wanted} but by ({kept})"


def test_manifests_dashboard_names_appear_in_a_real_agent_scrape() -> None:
    # The agent's own collector (agent/metrics.py) exporting one series of every metric, scraped
    # as Prometheus text and parsed back: what the dashboards query must be in it.
    peer = tuple(f"v-{name}" for name in model.PEER_LABELS)
    snapshot: dict[str, dict[tuple[str, ...], Any]] = {}
    for name, (kind, label_names, _help) in METRICS.items():
        key = peer + tuple(f"v-{n}" for n in label_names[len(model.PEER_LABELS):])
        if kind == "histogram":
            snapshot[name] = {key: [1] + [0] * len(model.LATENCY_BUCKETS_MS) + [3.0]}
        else:
            snapshot[name] = {key: 1}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snapshot))
    scraped: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            scraped.setdefault(sample.name, set()).update(sample.labels)
    wanted = dashboard_metric_names() - AGENT_SELF - {"up"}
    assert wanted <= set(scraped), f"dashboards query series the agent does not export: {wanted - set(scraped)}"
    assert dashboard_metric_names() & AGENT_SELF <= exported_metric_names()
    scraped_labels = set().union(*scraped.values()) | set(TARGET_LABELS)
    for filename, where, expr in QUERIES:
        metrics, label_names = query_names(expr)
        if metrics & AGENT_SELF or metrics == {"up"}:
            continue
        assert label_names <= scraped_labels, f"{filename} {where}: {label_names - scraped_labels}"


# ---------------------------------------------------------------------------- Grafana's schema

def _grafana_vars(text: str) -> set[str]:
    return {m.strip("{}").split(":")[0] for m in re.findall(r"\$(\{[^}]+\}|[A-Za-z_]\w*)", text)}


@pytest.mark.parametrize("filename", sorted(obs.dashboards()))
def test_manifests_dashboard_has_what_grafana_needs(filename: str) -> None:
    dash = json.loads((GRAFANA_DIR / filename).read_text())
    assert re.fullmatch(r"[a-z0-9-]{1,40}", dash["uid"]) and dash["uid"] == filename.removesuffix(".json")
    assert dash["title"] and isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(pos) and all(isinstance(pos[k], int) for k in "hwxy")
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0
        cells = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not cells & occupied, f"panel {panel['id']} overlaps another"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"stat", "timeseries", "table", "state-timeline"}
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"panel {panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["refId"] and target["expr"]
    # Every $variable a query or title uses is defined (or is one of Grafana's built-ins).
    text = json.dumps([p.get("targets", []) for p in dash["panels"]] + [p["title"] for p in dash["panels"]]
                      + [v.get("definition", "") for v in variables.values()])
    for var in _grafana_vars(text):
        assert var.startswith("__") or var in variables, f"{filename}: ${var} is not a template variable"
    for name, var in variables.items():
        if var["type"] == "query":
            assert var["datasource"]["uid"] == "${datasource}" and var["query"]["query"] == var["definition"], name


def test_manifests_workload_links_point_at_the_workload_dashboard_variables() -> None:
    workload = obs.dashboards()["nodemesh-workload.json"]
    names = {v["name"] for v in workload["templating"]["list"]}
    for dash in obs.dashboards().values():
        for panel in dash["panels"]:
            for override in panel.get("fieldConfig", {}).get("overrides", []):
                for prop in override["properties"]:
                    if prop["id"] != "links":
                        continue
                    url = prop["value"][0]["url"]
                    assert url.startswith(f"/d/{workload['uid']}/")
                    assert set(re.findall(r"var-(\w+)=", url)) <= names


# ---------------------------------------------------------------------------- manifests agree

def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def test_manifests_prometheus_discovers_the_daemonset_pods_on_the_admin_port() -> None:
    mesh = _docs(render_daemonset())
    ds = next(d for d in mesh if d["kind"] == "DaemonSet")
    controller = next(d for d in mesh if d["kind"] == "Deployment")
    prom = _docs(obs.render_addon("prometheus"))
    config = yaml.safe_load(next(d for d in prom if d["kind"] == "ConfigMap")["data"]["prometheus.yml"])
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}

    def selected(job: dict[str, Any], pod_labels: dict[str, str], namespace: str) -> bool:
        sd = job["kubernetes_sd_configs"][0]
        wanted = dict(kv.split("=", 1) for kv in sd["selectors"][0]["label"].split(","))
        return sd["role"] == "pod" and namespace in sd["namespaces"]["names"] and all(
            pod_labels.get(k) == v for k, v in wanted.items())

    ns = ds["metadata"]["namespace"]
    assert selected(jobs[obs.AGENT_JOB], ds["spec"]["template"]["metadata"]["labels"], ns)
    assert not selected(jobs[obs.AGENT_JOB], controller["spec"]["template"]["metadata"]["labels"], ns)
    assert selected(jobs[obs.CONTROLLER_JOB], controller["spec"]["template"]["metadata"]["labels"], ns)
    relabel = jobs[obs.AGENT_JOB]["relabel_configs"]
    address = next(r for r in relabel if r.get("target_label") == "__address__")
    assert address["replacement"] == f"$1:{model.ADMIN_PORT}"
    keep = next(r for r in relabel if r.get("source_labels") == ["__meta_kubernetes_pod_container_name"])
    assert keep["action"] == "keep" and keep["regex"] in {c["name"] for c in ds["spec"]["template"]["spec"][
        "containers"]}
    assert {r.get("target_label") for r in relabel} >= {"node", "pod"}  # the dashboards group by node
    ports = {p["name"] for p in controller["spec"]["template"]["spec"]["containers"][0]["ports"]}
    keep_port = next(r for r in jobs[obs.CONTROLLER_JOB]["relabel_configs"]
                     if r.get("source_labels") == ["__meta_kubernetes_pod_container_port_name"])
    assert keep_port["regex"] in ports
    # The agents' /metrics wants a credential: the Prometheus ServiceAccount's projected token,
    # with the audience the controller checks, mounted where the scrape config reads it per scrape.
    auth = jobs[obs.AGENT_JOB]["authorization"]
    deploy = next(d for d in prom if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    mount = next(m for m in deploy["containers"][0]["volumeMounts"] if m["name"] == "scrape-token")
    source = next(v for v in deploy["volumes"] if v["name"] == "scrape-token")["projected"]["sources"][0]
    assert auth == {"type": "Bearer", "credentials_file": f"{mount['mountPath']}/{source['serviceAccountToken']['path']}"}
    assert source["serviceAccountToken"]["audience"] == CONTROLLER_AUDIENCE
    assert deploy["serviceAccountName"] == "nodemesh-prometheus"  # the controller's default scraper


def test_manifests_grafana_provisions_the_committed_dashboards_and_datasource() -> None:
    docs = _docs(obs.render_addon("grafana"))
    cms = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    boards = cms[f"{obs.GRAFANA_NAME}-dashboards"]
    assert set(boards) == set(obs.dashboards())
    for name, text in boards.items():
        assert json.loads(text) == json.loads((GRAFANA_DIR / name).read_text())
    ds = yaml.safe_load(cms[f"{obs.GRAFANA_NAME}-datasources"]["prometheus.yaml"])["datasources"][0]
    assert ds["type"] == "prometheus"
    assert ds["url"] == f"http://{obs.PROMETHEUS_NAME}.nodemesh.svc.cluster.local:{obs.PROMETHEUS_PORT}"
    provider = yaml.safe_load(cms[f"{obs.GRAFANA_NAME}-providers"]["nodemesh.yaml"])["providers"][0]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    mounts = {m["name"]: m["mountPath"] for m in deployment["spec"]["template"]["spec"]["containers"][0][
        "volumeMounts"]}
    assert mounts["dashboards"] == provider["options"]["path"]
    assert mounts["datasources"] == "/etc/grafana/provisioning/datasources"
    assert sum(len(t) for t in boards.values()) < 900_000  # a ConfigMap holds at most 1 MiB
