// A workload's page: inbound stats, sparklines for the last hour, callers and callees (table
// and graph), the routes it serves (`nodemesh routes`), pods and nodes, a Grafana link, and the
// live tap panel.
import {edgeGraph, sparkline} from "./charts.js";
import {
  SHORT, SortTable, clear, fmtCount, fmtMs, fmtPercent, fmtRps, getJSON, h, health, workloadHash,
} from "./lib.js";
import {TapPanel} from "./tap.js";

const REFRESH_MS = 5000;

function edgeColumns() {
  return [
    {key: "name", label: "Peer", value: (e) => e.peer.name, render: (e) => h("a", {
      href: workloadHash(e.peer.namespace, e.peer.kind, e.peer.name)}, `${e.peer.short}/${e.peer.name}`)},
    {key: "namespace", label: "Namespace", value: (e) => e.peer.namespace},
    {key: "success", label: "Success", num: true, value: (e) => e.stat.success,
      render: (e) => fmtPercent(e.stat.success), cls: (e) => health(e.stat.success)},
    {key: "rps", label: "RPS", num: true, value: (e) => e.stat.rps, render: (e) => fmtRps(e.stat.rps)},
    {key: "p50", label: "P50", num: true, value: (e) => e.stat.latency_ms_p50, render: (e) => fmtMs(e.stat.latency_ms_p50)},
    {key: "p95", label: "P95", num: true, value: (e) => e.stat.latency_ms_p95, render: (e) => fmtMs(e.stat.latency_ms_p95)},
    {key: "p99", label: "P99", num: true, value: (e) => e.stat.latency_ms_p99, render: (e) => fmtMs(e.stat.latency_ms_p99)},
  ];
}

// `nodemesh routes TYPE/NAME` as a table; the API sends rows ordered as the CLI prints them.
const ROUTE_COLUMNS = [
  {key: "route", label: "Route", value: (r) => r.route},
  {key: "service", label: "Service", value: (r) => r.service || "-"},
  {key: "success", label: "Success", num: true, value: (r) => r.success,
    render: (r) => fmtPercent(r.success), cls: (r) => health(r.success)},
  {key: "rps", label: "RPS", num: true, value: (r) => r.rps, render: (r) => fmtRps(r.rps)},
  {key: "p50", label: "P50", num: true, value: (r) => r.latency_ms_p50, render: (r) => fmtMs(r.latency_ms_p50)},
  {key: "p95", label: "P95", num: true, value: (r) => r.latency_ms_p95, render: (r) => fmtMs(r.latency_ms_p95)},
  {key: "p99", label: "P99", num: true, value: (r) => r.latency_ms_p99, render: (r) => fmtMs(r.latency_ms_p99)},
];

const POD_COLUMNS = [
  {key: "name", label: "Pod"},
  {key: "node", label: "Node"},
  {key: "ip", label: "IP"},
  {key: "status", label: "Status"},
  {key: "meshed", label: "Meshed", render: (p) => (p.meshed ? "yes" : "no")},
];

export class WorkloadPage {
  constructor(root, ui, target) {
    this.root = root;
    this.ui = ui;
    this.target = target;
    this.timer = null;
    this.title = h("h1", {}, `${SHORT[target.type] || target.type}/${target.name}`);
    this.grafana = h("a", {className: "grafana", target: "_blank", rel: "noopener noreferrer", hidden: ""}, "Open in Grafana ↗");
    this.error = h("p", {className: "error", hidden: ""});
    this.cards = h("div", {className: "cards"});
    this.sparks = h("div", {className: "sparks"});
    this.graph = h("div", {className: "graphbox"});
    this.callers = new SortTable(edgeColumns(), {rowProps: (e) => ({dataset: {peer: e.peer.name}})});
    this.callees = new SortTable(edgeColumns(), {rowProps: (e) => ({dataset: {peer: e.peer.name}})});
    this.routes = new SortTable(ROUTE_COLUMNS, {rowProps: (r) => ({dataset: {route: r.route, service: r.service}})});
    this.pods = new SortTable(POD_COLUMNS, {rowProps: (p) => ({dataset: {pod: p.name}})});
    this.tap = new TapPanel(target);
    root.append(h("section", {className: "workload", id: "workload"},
      h("div", {className: "titlebar"}, this.title, h("span", {className: "ns-label"}, `namespace ${target.namespace}`), this.grafana),
      this.error,
      h("h2", {}, "Inbound"), this.cards,
      h("h2", {}, "Last hour"), this.sparks,
      h("h2", {}, "Traffic"), this.graph,
      h("div", {className: "two"},
        h("div", {id: "callers"}, h("h3", {}, "Callers"), this.callers.table),
        h("div", {id: "callees"}, h("h3", {}, "Callees"), this.callees.table)),
      h("h2", {}, "Routes"), h("div", {id: "routes"}, this.routes.table),
      h("h2", {}, "Pods"), h("div", {id: "pods"}, this.pods.table),
      h("h2", {}, "Live tap"), this.tap.root));
  }

  start() {
    this.ui.setCrumbs([h("a", {href: "#/"}, "overview"), " / ", this.target.namespace, " / ",
      `${SHORT[this.target.type] || this.target.type}/${this.target.name}`]);
    this.refresh();
  }

  stop() {
    clearTimeout(this.timer);
    this.timer = null;
    this.stopped = true;
    this.tap.stop();
  }

  setWindow() {
    clearTimeout(this.timer);
    this.refresh();
  }

  async refresh() {
    try {
      const data = await getJSON("/api/workload", {...this.target, window: this.ui.window});
      if (this.stopped) return;
      // The stat backend's word on these numbers (Prometheus missing agents), else no banner.
      this.error.textContent = data.warning || "";
      this.error.hidden = !data.warning;
      this.render(data);
      this.ui.setLive("on", `every ${REFRESH_MS / 1000}s · ${data.window_s}s window · ${new Date().toLocaleTimeString()}`);
    } catch (err) {
      this.error.textContent = err.message;
      this.error.hidden = false;
      this.ui.setLive("off", "error");
    }
    if (!this.stopped) this.timer = setTimeout(() => this.refresh(), REFRESH_MS);
  }

  render(data) {
    const st = data.stat;
    clear(this.cards).append(
      card("Success", fmtPercent(st.success), health(st.success), "success", st.success),
      card("RPS", fmtRps(st.rps), "", "rps", st.rps),
      card("P50", fmtMs(st.latency_ms_p50), "", "latency_ms_p50", st.latency_ms_p50),
      card("P95", fmtMs(st.latency_ms_p95), "", "latency_ms_p95", st.latency_ms_p95),
      card("P99", fmtMs(st.latency_ms_p99), "", "latency_ms_p99", st.latency_ms_p99),
      card("Meshed", `${st.meshed}/${st.totalPods}`, "", "meshed", st.meshed),
      card("TCP conns", fmtCount(st.tcp_open_connections), "", "tcp_open_connections", st.tcp_open_connections),
    );
    const pts = data.series.points;
    const col = (k) => pts.map((p) => p[k]);
    clear(this.sparks).append(
      sparkline("Success rate", [{values: col("success"), color: "#2e9e5b", label: "success"}],
        (v) => fmtPercent(v), {max: 1}),
      sparkline("Requests", [{values: col("rps"), color: "#3b6fd8", label: "rps"}], (v) => fmtRps(v)),
      sparkline("Latency", [
        {values: col("p50"), color: "#2e9e5b", label: "p50"},
        {values: col("p95"), color: "#d99a00", label: "p95"},
        {values: col("p99"), color: "#d0342c", label: "p99"}], (v) => fmtMs(v)),
    );
    clear(this.graph).append(edgeGraph(data.resource, data.callers, data.callees));
    this.callers.render(data.callers);
    this.callees.render(data.callees);
    this.routes.render(data.routes);
    this.pods.render(data.pods);
    if (data.grafana_url) {
      this.grafana.href = data.grafana_url;
      this.grafana.hidden = false;
    }
  }
}

function card(label, text, cls, key, value) {
  return h("div", {className: `card ${cls}`, dataset: {key, value: value === null || value === undefined ? "" : value}},
    h("div", {className: "label"}, label), h("div", {className: "value"}, text));
}
