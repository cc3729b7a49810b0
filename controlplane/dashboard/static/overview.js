// The overview: every namespace with a table of its workloads, refreshed live from
// /api/stream (Server-Sent Events), failing workloads highlighted, columns sortable.
import {
  SHORT, SortTable, fmtCount, fmtMs, fmtPercent, fmtRps, h, health, workloadHash,
} from "./lib.js";

export function statColumns(showKind) {
  return [
    {key: "name", label: "Name", value: (r) => r.name, render: (r) => h("a", {
      href: workloadHash(r.namespace, r.kind, r.name), className: "wl"}, showKind ? `${SHORT[r.kind] || r.kind}/${r.name}` : r.name)},
    {key: "meshed", label: "Meshed", num: true, value: (r) => r.meshed, render: (r) => `${r.meshed}/${r.totalPods}`},
    {key: "success", label: "Success", num: true, render: (r) => fmtPercent(r.success), cls: (r) => health(r.success)},
    {key: "rps", label: "RPS", num: true, render: (r) => fmtRps(r.rps)},
    {key: "latency_ms_p50", label: "P50", num: true, render: (r) => fmtMs(r.latency_ms_p50)},
    {key: "latency_ms_p95", label: "P95", num: true, render: (r) => fmtMs(r.latency_ms_p95)},
    {key: "latency_ms_p99", label: "P99", num: true, render: (r) => fmtMs(r.latency_ms_p99)},
    {key: "tcp_open_connections", label: "TCP conns", num: true, render: (r) => fmtCount(r.tcp_open_connections)},
  ];
}

export class Overview {
  constructor(root, ui) {
    this.root = root;
    this.ui = ui;
    this.tables = new Map(); // namespace -> {section, table}
    this.sort = {key: "name", dir: 1};
    this.source = null;
    this.list = h("div", {className: "namespaces"});
    this.empty = h("p", {className: "empty"}, "Waiting for the controller…");
    // What the stat backend says about the rows (Prometheus missing agents, or away this time).
    this.warning = h("p", {className: "error warning", hidden: ""});
    root.append(h("section", {className: "overview", id: "overview"},
      h("h1", {}, "Workloads"), this.warning, this.empty, this.list));
  }

  start() {
    this.ui.setCrumbs([]);
    this.connect();
  }

  stop() {
    if (this.source) this.source.close();
    this.source = null;
  }

  setWindow() {
    this.stop();
    this.connect();
  }

  connect() {
    const params = new URLSearchParams({all_namespaces: "true", window: this.ui.window});
    const source = new EventSource(`/api/stream?${params}`);
    this.source = source;
    this.ui.setLive("pending", "connecting…");
    source.addEventListener("stat", (ev) => {
      const data = JSON.parse(ev.data);
      this.render(data.rows);
      this.showWarning(data.warning);
      const t = new Date(data.time_ms).toLocaleTimeString();
      this.ui.setLive("on", `live · ${data.window_s}s window · ${t}`);
      this.root.dataset.updated = String(data.time_ms);
    });
    source.addEventListener("warning", (ev) => this.showWarning(JSON.parse(ev.data).error));
    source.addEventListener("error", (ev) => {
      if (ev.data) this.empty.textContent = JSON.parse(ev.data).error;
      this.ui.setLive("off", "reconnecting…");
    });
  }

  showWarning(text) {
    this.warning.textContent = text || "";
    this.warning.hidden = !text;
  }

  render(rows) {
    const byNs = new Map();
    for (const r of rows) {
      if (!byNs.has(r.namespace)) byNs.set(r.namespace, []);
      byNs.get(r.namespace).push(r);
    }
    this.empty.textContent = rows.length ? "" : "No workloads found.";
    this.empty.hidden = rows.length > 0;
    for (const [ns, entry] of this.tables) {
      if (!byNs.has(ns)) {
        entry.section.remove();
        this.tables.delete(ns);
      }
    }
    const names = [...byNs.keys()].sort();
    for (const ns of names) {
      let entry = this.tables.get(ns);
      const nsRows = byNs.get(ns);
      if (!entry) {
        const kinds = new Set(rows.map((r) => r.kind));
        const table = new SortTable(statColumns(kinds.size > 1), {
          sortKey: this.sort.key, sortDir: this.sort.dir,
          rowProps: (r) => ({className: `row ${health(r.success)}`, dataset: {name: r.name, kind: r.kind}}),
        });
        const failing = h("span", {className: "badge"});
        const section = h("section", {className: "ns", dataset: {namespace: ns}},
          h("h2", {}, ns, " ", failing), table.table);
        entry = {section, table, failing};
        this.tables.set(ns, entry);
      }
      const bad = nsRows.filter((r) => r.success !== null && r.success < 1).length;
      entry.failing.textContent = bad ? `${bad} failing` : "";
      entry.failing.hidden = !bad;
      entry.table.render(nsRows);
    }
    // Keep namespaces in name order (new ones may arrive between existing ones).
    for (const ns of names) this.list.append(this.tables.get(ns).section);
  }
}
