"""Prometheus and Grafana for the mesh: scrape config, dashboards, and their manifests.

The dashboards are built here as Python data and committed as JSON under `manifests/grafana/`
(golden files, like `manifests/daemonset.yaml`); `manifests/grafana.yaml` embeds the same JSON in
provisioning ConfigMaps. Every query uses only the metric names and labels the agents export
(api/model.py), so the dashboards work with any Prometheus that scrapes the agents' port 4191 and
adds the `node` target label (manifests/prometheus.yaml shows how).
"""

from __future__ import annotations

import json
from typing import Any

from nodemesh.api import model
from nodemesh.manifests.render import (
    CONTROLLER_AUDIENCE,
    CONTROLLER_CA_DIR,
    CONTROLLER_CA_KEY,
    CONTROLLER_NAME,
    controller_ca_volume,
    dump_documents,
    header,
    labels,
    meta,
    selector_labels,
    to_yaml,
)

SOURCE = "manifests/observability.py"  # named in the rendered files' header
RATE = "$__rate_interval"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
AGENT_JOB = "nodemesh-agent"
CONTROLLER_JOB = "nodemesh-controller"
PROMETHEUS_NAME = "nodemesh-prometheus"
SCRAPE_TOKEN_DIR = "/var/run/secrets/nodemesh"
SCRAPE_AUDIENCE = CONTROLLER_AUDIENCE
GRAFANA_NAME = "nodemesh-grafana"
PROMETHEUS_PORT = 9090
GRAFANA_PORT = 3000
PROMETHEUS_IMAGE = "quay.io/prometheus/prometheus:v2.53.1"
GRAFANA_IMAGE = "docker.io/grafana/grafana:11.1.0"
# Dashboard uids: stable, so the controller's web dashboard can link to /d/<uid>?var-...
UIDS = {
    "overview": "nodemesh-overview",
    "namespace": "nodemesh-namespace",
    "workload": "nodemesh-workload",
    "agent": "nodemesh-agent",
}


# ---------------------------------------------------------------------------- PromQL building

def _sel(**matchers: str) -> str:
    return ", ".join(f'{k}="{v}"' if not v.startswith("~") else f'{k}=~"{v[1:]}"' for k, v in matchers.items())


# The request/response families a query reads: the peer series, or the per-route ones (issue 15).
PEER = (model.REQUEST_TOTAL, model.RESPONSE_TOTAL, model.RESPONSE_LATENCY_MS)
ROUTE = (model.ROUTE_REQUEST_TOTAL, model.ROUTE_RESPONSE_TOTAL, model.ROUTE_RESPONSE_LATENCY_MS)


def rps(f: str, by: str = "", family: tuple[str, str, str] = PEER) -> str:
    return f"sum{_by(by)}(rate({family[0]}{{{f}}}[{RATE}]))"


def success_rate(f: str, by: str = "", family: tuple[str, str, str] = PEER) -> str:
    ok = f'{f}, classification="success"'
    return (f"sum{_by(by)}(rate({family[1]}{{{ok}}}[{RATE}]))"
            f" / sum{_by(by)}(rate({family[1]}{{{f}}}[{RATE}]))")


def latency(q: float, f: str, by: str = "", family: tuple[str, str, str] = PEER) -> str:
    by_le = f"le, {by}" if by else "le"
    return (f"histogram_quantile({q}, sum by ({by_le}) "
            f"(rate({family[2]}_bucket{{{f}}}[{RATE}])))")


def _by(by: str) -> str:
    return f" by ({by}) " if by else ""


# ---------------------------------------------------------------------------- panels

class _Layout:
    """Places panels left to right on Grafana's 24-column grid and numbers them."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = 0
        self.y = 0
        self.row_h = 0

    def add(self, panel: dict[str, Any], w: int, h: int) -> None:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def row(self, title: str) -> None:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        self.add({"type": "row", "title": title, "collapsed": False, "panels": []}, 24, 1)
        self.x, self.y, self.row_h = 0, self.y + 1, 0


def _targets(queries: list[tuple[str, str]], table: bool = False) -> list[dict[str, Any]]:
    out = []
    for i, (expr, legend) in enumerate(queries):
        t: dict[str, Any] = {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
                             "legendFormat": legend}
        if table:
            t.update({"format": "table", "instant": True, "range": False})
        out.append(t)
    return out


def stat(title: str, expr: str, unit: str, thresholds: list[tuple[float | None, str]] | None = None,
         mappings: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    steps = [{"color": c, "value": v} for v, c in (thresholds or [(None, "green")])]
    return {
        "type": "stat",
        "title": title,
        "datasource": DATASOURCE,
        "targets": _targets([(expr, "")]),
        "fieldConfig": {"defaults": {"unit": unit, "decimals": 2, "mappings": mappings or [],
                                     "thresholds": {"mode": "absolute", "steps": steps}},
                        "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "auto"},
    }


def timeseries(title: str, queries: list[tuple[str, str]], unit: str, stack: bool = False) -> dict[str, Any]:
    return {
        "type": "timeseries",
        "title": title,
        "datasource": DATASOURCE,
        "targets": _targets(queries),
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"fillOpacity": 10, "showPoints": "never",
                                                              "stacking": {"mode": "normal" if stack else "none"}}},
                        "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def table(title: str, by: str, columns: list[tuple[str, str, str]], link: str = "") -> dict[str, Any]:
    """One row per `by` label set; columns are instant queries merged on those labels."""
    overrides = []
    for i, (_, name, unit) in enumerate(columns):
        overrides.append({"matcher": {"id": "byName", "options": f"Value #{chr(ord('A') + i)}"},
                          "properties": [{"id": "displayName", "value": name}, {"id": "unit", "value": unit}]})
    by_labels = [b.strip() for b in by.split(",")]
    if link:
        overrides.append({"matcher": {"id": "byName", "options": by_labels[-1]},
                          "properties": [{"id": "links", "value": [{"title": "Open", "url": link}]}]})
    return {
        "type": "table",
        "title": title,
        "datasource": DATASOURCE,
        "targets": _targets([(expr, "") for expr, _, _ in columns], table=True),
        "transformations": [
            {"id": "merge", "options": {}},
            {"id": "organize", "options": {"excludeByName": {"Time": True},
                                           "indexByName": {label: i for i, label in enumerate(by_labels)}}},
        ],
        "fieldConfig": {"defaults": {"custom": {"align": "auto"}}, "overrides": overrides},
        "options": {"showHeader": True, "cellHeight": "sm"},
    }


# ---------------------------------------------------------------------------- variables

def _datasource_var() -> dict[str, Any]:
    return {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []}


def _query_var(name: str, label: str, query: str, multi: bool = False) -> dict[str, Any]:
    var: dict[str, Any] = {
        "name": name, "label": label, "type": "query", "datasource": DATASOURCE,
        "definition": query, "query": {"query": query, "refId": f"{name}-query"},
        "refresh": 2, "sort": 1, "current": {}, "hide": 0, "options": [], "regex": "",
        "multi": multi, "includeAll": multi,
    }
    if multi:
        var["allValue"] = ".*"
    return var


def _dashboard(uid: str, title: str, layout: _Layout, variables: list[dict[str, Any]],
               description: str) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["nodemesh"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "timezone": "browser",
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "graphTooltip": 1,
        "templating": {"list": [_datasource_var(), *variables]},
        "annotations": {"list": []},
        "links": [{"title": "nodemesh", "type": "dashboards", "tags": ["nodemesh"], "asDropdown": True,
                   "includeVars": False, "keepTime": True}],
        "panels": layout.panels,
    }


def _workload_link(ns: str, kind: str, name: str) -> str:
    return (f"/d/{UIDS['workload']}/nodemesh-workload?var-datasource=${{datasource}}"
            f"&var-namespace=${{__data.fields.{ns}}}&var-kind=${{__data.fields.{kind}}}"
            f"&var-workload=${{__data.fields.{name}}}")


def _workload_columns(f: str, by: str) -> list[tuple[str, str, str]]:
    return [
        (success_rate(f, by), "Success rate", "percentunit"),
        (rps(f, by), "RPS", "reqps"),
        (latency(0.5, f, by), "p50", "ms"),
        (latency(0.95, f, by), "p95", "ms"),
        (latency(0.99, f, by), "p99", "ms"),
        (f"sum by ({by}) ({model.TCP_OPEN_CONNECTIONS}{{{f}}})", "TCP conns", "short"),
    ]


_SR_THRESHOLDS: list[tuple[float | None, str]] = [(None, "red"), (0.9, "orange"), (0.99, "green")]


# ---------------------------------------------------------------------------- the four dashboards

def overview_dashboard() -> dict[str, Any]:
    f = 'direction="inbound"'
    by = "dst_namespace, dst_kind, dst_name"
    lay = _Layout()
    lay.add(stat("Success rate (inbound)", success_rate(f), "percentunit", _SR_THRESHOLDS), 5, 4)
    lay.add(stat("Requests/s (inbound)", rps(f), "reqps"), 5, 4)
    lay.add(stat("p95 latency", latency(0.95, f), "ms"), 5, 4)
    lay.add(stat("Open TCP connections", f"sum({model.TCP_OPEN_CONNECTIONS}{{{f}}})", "short"), 5, 4)
    lay.add(stat("Nodes with capture", f"sum({model.CAPTURE_INSTALLED})", "short"), 4, 4)
    lay.add(table("Workloads (inbound)", by, _workload_columns(f, by),
                  _workload_link("dst_namespace", "dst_kind", "dst_name")), 24, 10)
    nsby = "dst_namespace"
    lay.add(timeseries("Success rate by namespace", [(success_rate(f, nsby), "{{dst_namespace}}")],
                       "percentunit"), 8, 8)
    lay.add(timeseries("Requests/s by namespace", [(rps(f, nsby), "{{dst_namespace}}")], "reqps", True), 8, 8)
    lay.add(timeseries("p95 latency by namespace", [(latency(0.95, f, nsby), "{{dst_namespace}}")], "ms"), 8, 8)
    return _dashboard(UIDS["overview"], "nodemesh / Mesh overview", lay, [],
                      "Every meshed workload: success rate, request rate, latency, as seen by the agents.")


def namespace_dashboard() -> dict[str, Any]:
    f = 'direction="inbound", dst_namespace="$namespace"'
    out = 'direction="outbound", src_namespace="$namespace"'
    by = "dst_kind, dst_name"
    lay = _Layout()
    lay.add(stat("Success rate", success_rate(f), "percentunit", _SR_THRESHOLDS), 6, 4)
    lay.add(stat("Requests/s", rps(f), "reqps"), 6, 4)
    lay.add(stat("p95 latency", latency(0.95, f), "ms"), 6, 4)
    lay.add(stat("Open TCP connections", f"sum({model.TCP_OPEN_CONNECTIONS}{{{f}}})", "short"), 6, 4)
    cols = _workload_columns(f, f"dst_namespace, {by}")
    lay.add(table("Workloads in $namespace (inbound)", f"dst_namespace, {by}", cols,
                  _workload_link("dst_namespace", "dst_kind", "dst_name")), 24, 9)
    legend = "{{dst_kind}}/{{dst_name}}"
    lay.add(timeseries("Success rate by workload", [(success_rate(f, by), legend)], "percentunit"), 8, 8)
    lay.add(timeseries("Requests/s by workload", [(rps(f, by), legend)], "reqps", True), 8, 8)
    lay.add(timeseries("p95 latency by workload", [(latency(0.95, f, by), legend)], "ms"), 8, 8)
    lay.row("Traffic leaving $namespace")
    outby = "dst_namespace, dst_name"
    lay.add(timeseries("Outbound requests/s by destination",
                       [(rps(out, outby), "{{dst_namespace}}/{{dst_name}}")], "reqps", True), 12, 8)
    lay.add(timeseries("Outbound success rate by destination",
                       [(success_rate(out, outby), "{{dst_namespace}}/{{dst_name}}")], "percentunit"), 12, 8)
    lay.row("TCP")
    lay.add(timeseries("Bytes/s", [
        (f"sum(rate({model.TCP_READ_BYTES_TOTAL}{{{f}}}[{RATE}]))", "read from callers"),
        (f"sum(rate({model.TCP_WRITE_BYTES_TOTAL}{{{f}}}[{RATE}]))", "written to callers"),
    ], "Bps"), 12, 8)
    lay.add(timeseries("Connections opened/s by workload",
                       [(f"sum by ({by}) (rate({model.TCP_OPEN_TOTAL}{{{f}}}[{RATE}]))", legend)], "cps"), 12, 8)
    ns = _query_var("namespace", "Namespace", f'label_values({model.REQUEST_TOTAL}{{direction="inbound"}}, '
                                               "dst_namespace)")
    return _dashboard(UIDS["namespace"], "nodemesh / Namespace", lay, [ns],
                      "The workloads of one namespace and the traffic leaving it.")


def workload_dashboard() -> dict[str, Any]:
    inb = 'direction="inbound", dst_namespace="$namespace", dst_kind="$kind", dst_name="$workload"'
    outb = 'direction="outbound", src_namespace="$namespace", src_kind="$kind", src_name="$workload"'
    lay = _Layout()
    lay.row("Inbound: $kind/$workload")
    lay.add(stat("Success rate", success_rate(inb), "percentunit", _SR_THRESHOLDS), 4, 4)
    lay.add(stat("Requests/s", rps(inb), "reqps"), 4, 4)
    lay.add(stat("p50 latency", latency(0.5, inb), "ms"), 4, 4)
    lay.add(stat("p95 latency", latency(0.95, inb), "ms"), 4, 4)
    lay.add(stat("p99 latency", latency(0.99, inb), "ms"), 4, 4)
    lay.add(stat("Open TCP connections", f"sum({model.TCP_OPEN_CONNECTIONS}{{{inb}}})", "short"), 4, 4)
    lay.add(timeseries("Success rate", [(success_rate(inb), "success rate")], "percentunit"), 8, 8)
    lay.add(timeseries("Requests/s by classification", [
        (f"sum by (classification) (rate({model.RESPONSE_TOTAL}{{{inb}}}[{RATE}]))", "{{classification}}"),
    ], "reqps", True), 8, 8)
    lay.add(timeseries("Latency", [(latency(q, inb), f"p{int(q * 100)}") for q in (0.5, 0.95, 0.99)], "ms"), 8, 8)
    src = "src_namespace, src_kind, src_name"
    src_legend = "{{src_namespace}}/{{src_kind}}/{{src_name}}"
    lay.row("Inbound by caller")
    lay.add(table("Callers", src, _workload_columns(inb, src),
                  _workload_link("src_namespace", "src_kind", "src_name")), 24, 7)
    lay.add(timeseries("Requests/s by caller", [(rps(inb, src), src_legend)], "reqps", True), 8, 8)
    lay.add(timeseries("Success rate by caller", [(success_rate(inb, src), src_legend)], "percentunit"), 8, 8)
    lay.add(timeseries("p95 latency by caller", [(latency(0.95, inb, src), src_legend)], "ms"), 8, 8)
    dst = "dst_namespace, dst_kind, dst_name"
    dst_legend = "{{dst_namespace}}/{{dst_kind}}/{{dst_name}}"
    lay.row("Outbound by callee")
    lay.add(table("Callees", dst, _workload_columns(outb, dst),
                  _workload_link("dst_namespace", "dst_kind", "dst_name")), 24, 7)
    lay.add(timeseries("Requests/s by callee", [(rps(outb, dst), dst_legend)], "reqps", True), 8, 8)
    lay.add(timeseries("Success rate by callee", [(success_rate(outb, dst), dst_legend)], "percentunit"), 8, 8)
    lay.add(timeseries("p95 latency by callee", [(latency(0.95, outb, dst), dst_legend)], "ms"), 8, 8)
    # Routes it serves (`nodemesh routes`): a table, then one panel per route (Grafana repeats it
    # for each value of $route).
    rt = "dst_service, rt_route"
    lay.row("Routes served")
    lay.add(table("Routes", rt, [
        (success_rate(inb, rt, ROUTE), "Success rate", "percentunit"),
        (rps(inb, rt, ROUTE), "RPS", "reqps"),
        (latency(0.5, inb, rt, ROUTE), "p50", "ms"),
        (latency(0.95, inb, rt, ROUTE), "p95", "ms"),
        (latency(0.99, inb, rt, ROUTE), "p99", "ms"),
    ]), 24, 8)
    one = f'{inb}, rt_route=~"$route"'
    route_panel = timeseries("Route $route", [
        (success_rate(one, family=ROUTE), "success rate"),
        (rps(one, family=ROUTE), "rps"),
        (latency(0.95, one, family=ROUTE), "p95 ms"),
    ], "short")
    route_panel.update({"repeat": "route", "repeatDirection": "h", "maxPerRow": 3})
    lay.add(route_panel, 8, 8)
    lay.row("TCP")
    lay.add(timeseries("Open connections", [
        (f"sum({model.TCP_OPEN_CONNECTIONS}{{{inb}}})", "inbound"),
        (f"sum({model.TCP_OPEN_CONNECTIONS}{{{outb}}})", "outbound"),
    ], "short"), 8, 8)
    lay.add(timeseries("Connections opened/s", [
        (f"sum(rate({model.TCP_OPEN_TOTAL}{{{inb}}}[{RATE}]))", "inbound"),
        (f"sum(rate({model.TCP_OPEN_TOTAL}{{{outb}}}[{RATE}]))", "outbound"),
    ], "cps"), 8, 8)
    lay.add(timeseries("Bytes/s", [
        (f"sum(rate({model.TCP_READ_BYTES_TOTAL}{{{inb}}}[{RATE}]))", "inbound: read from callers"),
        (f"sum(rate({model.TCP_WRITE_BYTES_TOTAL}{{{inb}}}[{RATE}]))", "inbound: written to callers"),
        (f"sum(rate({model.TCP_READ_BYTES_TOTAL}{{{outb}}}[{RATE}]))", "outbound: read from workload"),
        (f"sum(rate({model.TCP_WRITE_BYTES_TOTAL}{{{outb}}}[{RATE}]))", "outbound: written to workload"),
    ], "Bps"), 8, 8)
    variables = [
        _query_var("namespace", "Namespace",
                   f'label_values({model.REQUEST_TOTAL}{{direction="inbound"}}, dst_namespace)'),
        _query_var("kind", "Kind",
                   f'label_values({model.REQUEST_TOTAL}{{direction="inbound", dst_namespace="$namespace"}}, '
                   "dst_kind)"),
        _query_var("workload", "Workload",
                   f'label_values({model.REQUEST_TOTAL}{{direction="inbound", dst_namespace="$namespace", '
                   'dst_kind="$kind"}, dst_name)'),
        _query_var("route", "Route",
                   f'label_values({model.ROUTE_REQUEST_TOTAL}{{direction="inbound", dst_namespace="$namespace", '
                   'dst_kind="$kind", dst_name="$workload"}, rt_route)', multi=True),
    ]
    return _dashboard(UIDS["workload"], "nodemesh / Workload", lay, variables,
                      "One workload: top-line metrics, its callers (inbound), its callees (outbound) and "
                      "the routes it serves.")


def agent_dashboard() -> dict[str, Any]:
    node = f'job="{AGENT_JOB}", node=~"$node"'
    lay = _Layout()
    lay.add(stat("Agents scraped", f'count(up{{{node}}} == 1)', "short"), 6, 4)
    lay.add(stat("Nodes with capture installed", f"sum({model.CAPTURE_INSTALLED}{{{node}}})", "short"), 6, 4)
    lay.add(stat("Agent CPU (cores, all nodes)",
                 f"sum(rate(process_cpu_seconds_total{{{node}}}[{RATE}]))", "short"), 6, 4)
    lay.add(stat("Agent memory (all nodes)", f"sum(process_resident_memory_bytes{{{node}}})", "bytes"), 6, 4)
    lay.add({
        "type": "state-timeline",
        "title": "Capture installed per node",
        "datasource": DATASOURCE,
        "targets": _targets([(f"max by (node) ({model.CAPTURE_INSTALLED}{{{node}}})", "{{node}}")]),
        "fieldConfig": {"defaults": {
            "mappings": [{"type": "value", "options": {
                "0": {"text": "not installed", "color": "red", "index": 0},
                "1": {"text": "installed", "color": "green", "index": 1}}}],
            "thresholds": {"mode": "absolute", "steps": [{"color": "red", "value": None},
                                                         {"color": "green", "value": 1}]},
        }, "overrides": []},
        "options": {"showValue": "auto", "mergeValues": True, "rowHeight": 0.8},
    }, 24, 6)
    lay.add(timeseries("CPU per node (cores)", [
        (f"sum by (node) (rate(process_cpu_seconds_total{{{node}}}[{RATE}]))", "{{node}}"),
    ], "short"), 12, 8)
    lay.add(timeseries("Resident memory per node", [
        (f"sum by (node) (process_resident_memory_bytes{{{node}}})", "{{node}}"),
    ], "bytes"), 12, 8)
    lay.add(timeseries("Open connections per node", [
        (f"sum by (node, direction) ({model.TCP_OPEN_CONNECTIONS}{{{node}}})", "{{node}} {{direction}}"),
    ], "short"), 8, 8)
    lay.add(timeseries("Connections opened/s per node", [
        (f"sum by (node) (rate({model.TCP_OPEN_TOTAL}{{{node}}}[{RATE}]))", "{{node}}"),
    ], "cps"), 8, 8)
    lay.add(timeseries("Requests/s handled per node", [
        (f"sum by (node, direction) (rate({model.REQUEST_TOTAL}{{{node}}}[{RATE}]))", "{{node}} {{direction}}"),
    ], "reqps"), 8, 8)
    lay.add(timeseries("Bytes/s proxied per node", [
        ((f"sum by (node) (rate({model.TCP_READ_BYTES_TOTAL}{{{node}}}[{RATE}]) "
          f"+ rate({model.TCP_WRITE_BYTES_TOTAL}{{{node}}}[{RATE}]))"), "{{node}}"),
    ], "Bps"), 12, 8)
    lay.add(timeseries("Connection errors/s per node", [
        (f'sum by (node) (rate({model.TCP_CLOSE_TOTAL}{{{node}, error!=""}}[{RATE}]))', "{{node}}"),
    ], "cps"), 12, 8)
    variables = [_query_var("node", "Node", f'label_values(process_resident_memory_bytes{{job="{AGENT_JOB}"}}, node)',
                            multi=True)]
    return _dashboard(UIDS["agent"], "nodemesh / Agents", lay, variables,
                      "The agents themselves: CPU, memory, connections and capture state per node.")


def dashboards() -> dict[str, dict[str, Any]]:
    """File name (under manifests/grafana/) -> dashboard JSON object."""
    return {
        "nodemesh-overview.json": overview_dashboard(),
        "nodemesh-namespace.json": namespace_dashboard(),
        "nodemesh-workload.json": workload_dashboard(),
        "nodemesh-agent.json": agent_dashboard(),
    }


def dashboard_json(obj: dict[str, Any]) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------- manifests

def prometheus_config(namespace: str, controller_tls: bool = True) -> dict[str, Any]:
    def pods(component: str) -> dict[str, Any]:
        return {
            "role": "pod",
            "namespaces": {"names": [namespace]},
            "selectors": [{"role": "pod", "label": ",".join(f"{k}={v}" for k, v in
                                                            selector_labels(component).items())}],
        }

    running = {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Pending|Succeeded|Failed|Unknown",
               "action": "drop"}
    node = {"source_labels": ["__meta_kubernetes_pod_node_name"], "target_label": "node"}
    pod = {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"}
    return {
        "global": {"scrape_interval": "10s", "scrape_timeout": "5s", "evaluation_interval": "10s"},
        "scrape_configs": [
            {
                "job_name": AGENT_JOB,
                "kubernetes_sd_configs": [pods("agent")],
                # An agent's /metrics answers only scrapers with a credential the controller accepts:
                # this ServiceAccount's projected token (audience nodemesh-controller), re-read per scrape.
                "authorization": {"type": "Bearer", "credentials_file": f"{SCRAPE_TOKEN_DIR}/token"},
                "relabel_configs": [
                    running,
                    # The DaemonSet declares no container ports (hostNetwork + maxSurge, see
                    # daemonset.yaml), so discovery yields one port-less target per container:
                    # keep the agent's and point it at the admin port.
                    {"source_labels": ["__meta_kubernetes_pod_container_name"], "regex": "agent",
                     "action": "keep"},
                    {"source_labels": ["__meta_kubernetes_pod_ip"], "regex": "(.+)",
                     "target_label": "__address__", "replacement": f"$1:{model.ADMIN_PORT}"},
                    node,
                    pod,
                ],
            },
            {
                "job_name": CONTROLLER_JOB,
                "kubernetes_sd_configs": [pods("controller")],
                # The controller's web port speaks TLS (its own CA, published in a ConfigMap the
                # pod mounts): verified under the Service's name, as the targets are pod IPs.
                **({"scheme": "https", "tls_config": {
                    "ca_file": f"{CONTROLLER_CA_DIR}/{CONTROLLER_CA_KEY}",
                    "server_name": f"{CONTROLLER_NAME}.{namespace}.svc"}} if controller_tls else {}),
                "relabel_configs": [
                    running,
                    {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "web",
                     "action": "keep"},
                    node,
                    pod,
                ],
            },
        ],
    }


def _nonroot(user: int, read_only: bool) -> dict[str, Any]:
    return {"privileged": False, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": read_only,
            "runAsNonRoot": True, "runAsUser": user, "runAsGroup": user, "capabilities": {"drop": ["ALL"]}}


def _deployment(name: str, namespace: str, component: str, pod_spec: dict[str, Any],
                checksum_of: str) -> dict[str, Any]:
    import hashlib

    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(name, namespace, component),
        "spec": {
            "replicas": 1,
            # The data lives in an emptyDir: never two writers.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector_labels(component)},
            "template": {
                "metadata": {"labels": labels(component), "annotations": {
                    "nodemesh.io/config-checksum": hashlib.sha256(checksum_of.encode()).hexdigest()}},
                "spec": {"securityContext": {"seccompProfile": {"type": "RuntimeDefault"}}, **pod_spec},
            },
        },
    }


def _service(name: str, namespace: str, component: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(name, namespace, component),
        "spec": {"type": "ClusterIP", "selector": selector_labels(component),
                 "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}]},
    }


def prometheus_documents(namespace: str, controller_tls: bool = True) -> list[dict[str, Any]]:
    config = to_yaml(prometheus_config(namespace, controller_tls))
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(PROMETHEUS_NAME, namespace, "prometheus"),
          "automountServiceAccountToken": True}
    # Discovery only looks at pods in the mesh's namespace: a Role there, not a ClusterRole.
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": meta(PROMETHEUS_NAME, namespace, "prometheus"),
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": meta(PROMETHEUS_NAME, namespace, "prometheus"),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": PROMETHEUS_NAME},
               "subjects": [{"kind": "ServiceAccount", "name": PROMETHEUS_NAME, "namespace": namespace}]}
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(PROMETHEUS_NAME, namespace, "prometheus"),
          "data": {"prometheus.yml": config}}
    container = {
        "name": "prometheus",
        "image": PROMETHEUS_IMAGE,
        "args": ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus",
                 "--storage.tsdb.retention.time=6h", f"--web.listen-address=:{PROMETHEUS_PORT}"],
        "ports": [{"name": "http", "containerPort": PROMETHEUS_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/-/ready", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/-/healthy", "port": "http"}, "initialDelaySeconds": 10,
                          "periodSeconds": 10},
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "securityContext": _nonroot(65534, True),
        "volumeMounts": [{"name": "config", "mountPath": "/etc/prometheus", "readOnly": True},
                         {"name": "data", "mountPath": "/prometheus"},
                         {"name": "scrape-token", "mountPath": SCRAPE_TOKEN_DIR, "readOnly": True},
                         *([{"name": "controller-ca", "mountPath": CONTROLLER_CA_DIR, "readOnly": True}]
                           if controller_tls else [])],
    }
    # The token the agents' /metrics asks for: checked by the controller with a TokenReview
    # (`--token-review-scrapers`, default this ServiceAccount); one hour, rotated by the kubelet.
    token = {"name": "scrape-token", "projected": {"sources": [{"serviceAccountToken": {
        "audience": SCRAPE_AUDIENCE, "expirationSeconds": 3600, "path": "token"}}]}}
    pod_spec = {"serviceAccountName": PROMETHEUS_NAME, "containers": [container],
                "volumes": [{"name": "config", "configMap": {"name": PROMETHEUS_NAME}},
                            {"name": "data", "emptyDir": {"sizeLimit": "2Gi"}}, token,
                            *([controller_ca_volume()] if controller_tls else [])]}
    return [sa, role, binding, cm, _deployment(PROMETHEUS_NAME, namespace, "prometheus", pod_spec, config),
            _service(PROMETHEUS_NAME, namespace, "prometheus", PROMETHEUS_PORT)]


def grafana_documents(namespace: str) -> list[dict[str, Any]]:
    datasources = to_yaml({"apiVersion": 1, "datasources": [{
        "name": "Prometheus (nodemesh)", "uid": "nodemesh-prometheus", "type": "prometheus", "access": "proxy",
        "url": f"http://{PROMETHEUS_NAME}.{namespace}.svc.cluster.local:{PROMETHEUS_PORT}",
        "isDefault": True, "editable": False}]})
    providers = to_yaml({"apiVersion": 1, "providers": [{
        "name": "nodemesh", "folder": "nodemesh", "type": "file", "disableDeletion": True,
        "allowUiUpdates": False, "updateIntervalSeconds": 60,
        "options": {"path": "/var/lib/grafana/dashboards/nodemesh"}}]})
    boards = {name: dashboard_json(d) for name, d in dashboards().items()}

    def cm(name: str, data: dict[str, str]) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(name, namespace, "grafana"),
                "data": data}

    container = {
        "name": "grafana",
        "image": GRAFANA_IMAGE,
        "ports": [{"name": "http", "containerPort": GRAFANA_PORT, "protocol": "TCP"}],
        "env": [
            # Read-only viewers need no login; editing still needs the admin account.
            {"name": "GF_AUTH_ANONYMOUS_ENABLED", "value": "true"},
            {"name": "GF_AUTH_ANONYMOUS_ORG_ROLE", "value": "Viewer"},
            {"name": "GF_ANALYTICS_REPORTING_ENABLED", "value": "false"},
            {"name": "GF_ANALYTICS_CHECK_FOR_UPDATES", "value": "false"},
            {"name": "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH",
             "value": "/var/lib/grafana/dashboards/nodemesh/nodemesh-overview.json"},
        ],
        "readinessProbe": {"httpGet": {"path": "/api/health", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/api/health", "port": "http"}, "initialDelaySeconds": 30,
                          "periodSeconds": 10},
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
        # Grafana writes under its home at runtime (plugins, caches): root fs stays writable.
        "securityContext": _nonroot(472, False),
        "volumeMounts": [
            {"name": "data", "mountPath": "/var/lib/grafana"},
            {"name": "datasources", "mountPath": "/etc/grafana/provisioning/datasources", "readOnly": True},
            {"name": "providers", "mountPath": "/etc/grafana/provisioning/dashboards", "readOnly": True},
            {"name": "dashboards", "mountPath": "/var/lib/grafana/dashboards/nodemesh", "readOnly": True},
        ],
    }
    pod_spec = {"automountServiceAccountToken": False, "containers": [container],
                "volumes": [{"name": "data", "emptyDir": {"sizeLimit": "1Gi"}},
                            {"name": "datasources", "configMap": {"name": f"{GRAFANA_NAME}-datasources"}},
                            {"name": "providers", "configMap": {"name": f"{GRAFANA_NAME}-providers"}},
                            {"name": "dashboards", "configMap": {"name": f"{GRAFANA_NAME}-dashboards"}}]}
    deployment = _deployment(GRAFANA_NAME, namespace, "grafana", pod_spec,
                             datasources + providers + "".join(boards.values()))
    # fsGroup must sit beside seccompProfile in the pod securityContext, not replace it.
    spec = deployment["spec"]["template"]["spec"]
    spec["securityContext"] = {"seccompProfile": {"type": "RuntimeDefault"}, "fsGroup": 472}
    return [
        cm(f"{GRAFANA_NAME}-datasources", {"prometheus.yaml": datasources}),
        cm(f"{GRAFANA_NAME}-providers", {"nodemesh.yaml": providers}),
        cm(f"{GRAFANA_NAME}-dashboards", boards),
        deployment,
        _service(GRAFANA_NAME, namespace, "grafana", GRAFANA_PORT),
    ]


def render_addon(addon: str, namespace: str = "nodemesh", controller_tls: bool = True) -> str:
    """`controller_tls`: the mesh's controllerTls (Prometheus scrapes the controller over TLS)."""
    if addon == "prometheus":
        return dump_documents(prometheus_documents(namespace, controller_tls), header(
            "Prometheus scraping the agents (apply after daemonset.yaml)",
            "nodemesh install --addon prometheus > manifests/prometheus.yaml", SOURCE))
    if addon == "grafana":
        return dump_documents(grafana_documents(namespace), header(
            "Grafana with the nodemesh dashboards (needs prometheus.yaml)",
            "nodemesh install --addon grafana > manifests/grafana.yaml", SOURCE))
    raise ValueError(f"unknown addon {addon!r}")

