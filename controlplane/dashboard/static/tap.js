// Live tap on a workload: filters as `nodemesh tap` takes them, a streaming table of requests
// and a `nodemesh top`-style aggregation by path. Every value from traffic is set as text.
import {ApiError, SortTable, clear, fmtPercent, fmtUs, grpcName, h, health, readEvents} from "./lib.js";

const MAX_ROWS = 300;
const FIELDS = [
  ["method", "Method", "GET"],
  ["path", "Path prefix", "/api"],
  ["authority", "Authority", "web-svc:8080"],
  ["to", "To (TYPE/NAME)", "deploy/emoji"],
  ["max_rps", "Max RPS", "100"],
];

function peerName(p) {
  return p.pod || (p.ip ? `${p.ip}:${p.port}` : "-");
}

// A request counts as a success when it was not reset, its grpc-status is 0 when present,
// else its HTTP status is below 500 (ARCHITECTURE.md "classification", as `nodemesh top`).
function succeeded(req) {
  if (req.reset_error) return false;
  if (req.grpc_status !== null && req.grpc_status !== undefined) return req.grpc_status === 0;
  return (req.http_status || 0) < 500;
}

const TOP_COLUMNS = [
  {key: "method", label: "Method"},
  {key: "path", label: "Path", cls: () => "path"},
  {key: "count", label: "Count", num: true},
  {key: "best", label: "Best", num: true, render: (r) => fmtUs(r.best)},
  {key: "worst", label: "Worst", num: true, render: (r) => fmtUs(r.worst)},
  {key: "last", label: "Last", num: true, render: (r) => fmtUs(r.last)},
  {key: "success", label: "Success Rate", num: true, value: (r) => r.ok / r.count,
    render: (r) => fmtPercent(r.ok / r.count), cls: (r) => health(r.ok / r.count)},
];

export class TapPanel {
  constructor(target) {
    this.target = target;
    this.abort = null;
    this.requests = new Map(); // id -> {row, data}
    this.top = new Map();      // "METHOD path" -> aggregate
    this.inputs = {};
    const fields = FIELDS.map(([key, label, ph]) => {
      const input = h("input", {name: key, placeholder: ph, type: key === "max_rps" ? "number" : "text"});
      if (key === "max_rps") input.min = "1";
      this.inputs[key] = input;
      return h("label", {}, label, input);
    });
    this.button = h("button", {type: "submit", className: "start", id: "tap-toggle"}, "Start");
    this.status = h("span", {className: "tapstatus", id: "tap-status"}, "stopped");
    this.count = 0;
    this.form = h("form", {className: "tapform", id: "tap-form", onsubmit: (ev) => {
      ev.preventDefault();
      if (this.abort) this.stop(); else this.start();
    }}, fields, this.button, this.status);
    this.tbody = h("tbody");
    this.stream = h("table", {className: "stat tap", id: "tap-table"},
      h("thead", {}, h("tr", {}, ["Dir", "Source", "Destination", "Method", "Path", "Status", "gRPC", "Latency"]
        .map((c) => h("th", {}, c)))), this.tbody);
    this.topTable = new SortTable(TOP_COLUMNS, {sortKey: "count", sortDir: -1,
      rowProps: (r) => ({dataset: {path: r.path}})});
    this.topTable.table.id = "tap-top";
    this.root = h("div", {className: "tappanel"}, this.form,
      h("div", {className: "two"},
        h("div", {}, h("h3", {}, "Requests"), h("div", {className: "scroll"}, this.stream)),
        h("div", {}, h("h3", {}, "Top paths"), this.topTable.table)));
  }

  params() {
    const p = {namespace: this.target.namespace, type: this.target.type, name: this.target.name};
    for (const [k, input] of Object.entries(this.inputs)) {
      if (input.value.trim()) p[k] = input.value.trim();
    }
    return p;
  }

  async start() {
    this.abort = new AbortController();
    this.requests.clear();
    this.top.clear();
    clear(this.tbody);
    this.topTable.render([]);
    this.count = 0;
    this.button.textContent = "Stop";
    this.setStatus("starting", "starting…");
    const abort = this.abort;
    try {
      await readEvents("/api/tap", this.params(), abort.signal, (name, data) => this.onEvent(name, data));
      if (this.abort === abort) this.setStatus("stopped", "the controller ended the tap");
    } catch (err) {
      if (err.name === "AbortError") return;
      this.setStatus("error", err instanceof ApiError ? err.message : `tap failed: ${err.message}`);
    }
    if (this.abort === abort) {
      this.abort = null;
      this.button.textContent = "Start";
    }
  }

  stop() {
    if (this.abort) this.abort.abort();
    this.abort = null;
    this.button.textContent = "Start";
    this.setStatus("stopped", `stopped · ${this.count} requests`);
  }

  setStatus(state, text) {
    this.status.className = `tapstatus ${state}`;
    this.status.textContent = text;
  }

  onEvent(name, ev) {
    if (name === "open") {
      this.setStatus("running", `tapping · at most ${ev.max_rps} rps`);
      return;
    }
    if (name !== "tap") return;
    if (ev.event === "request_init") {
      this.count++;
      const cells = {
        status: h("td", {className: "num", dataset: {key: "status"}}, "…"),
        grpc: h("td", {dataset: {key: "grpc"}}, ""),
        latency: h("td", {className: "num", dataset: {key: "latency"}}, ""),
      };
      const row = h("tr", {className: "tap-row", dataset: {id: ev.id, direction: ev.direction}},
        h("td", {}, ev.direction === "inbound" ? "in" : "out"),
        h("td", {title: ev.source.owner || ""}, peerName(ev.source)),
        h("td", {title: ev.destination.owner || ""}, peerName(ev.destination)),
        h("td", {dataset: {key: "method"}}, ev.method),
        h("td", {className: "path", dataset: {key: "path"}, title: ev.authority}, ev.path),
        cells.status, cells.grpc, cells.latency);
      this.tbody.prepend(row);
      this.requests.set(ev.id, {row, cells, data: {method: ev.method, path: ev.path}});
      while (this.tbody.childElementCount > MAX_ROWS) {
        const old = this.tbody.lastElementChild;
        this.requests.delete(old.dataset.id);
        old.remove();
      }
      return;
    }
    const req = this.requests.get(ev.id);
    if (!req) return; // its request_init was before we started, or dropped by the rate limit
    if (ev.event === "response_init") {
      req.data.http_status = ev.http_status;
      req.cells.status.textContent = String(ev.http_status);
      req.cells.latency.textContent = fmtUs(ev.latency_us);
    } else if (ev.event === "response_end") {
      Object.assign(req.data, {grpc_status: ev.grpc_status, reset_error: ev.reset_error});
      if (ev.reset_error) req.cells.grpc.textContent = `reset ${ev.reset_error}`;
      else if (ev.grpc_status !== null) req.cells.grpc.textContent = grpcName(ev.grpc_status);
      if (!req.cells.latency.textContent) req.cells.latency.textContent = fmtUs(ev.duration_us);
      req.row.classList.add(succeeded(req.data) ? "ok" : "bad");
      this.aggregate(req.data, ev.duration_us);
    }
  }

  aggregate(data, us) {
    const key = `${data.method} ${data.path}`;
    let agg = this.top.get(key);
    if (!agg) {
      agg = {method: data.method, path: data.path, count: 0, ok: 0, best: us, worst: us, last: us};
      this.top.set(key, agg);
    }
    agg.count++;
    if (succeeded(data)) agg.ok++;
    agg.best = Math.min(agg.best, us);
    agg.worst = Math.max(agg.worst, us);
    agg.last = us;
    // Redraw at most a few times a second: a busy tap sends hundreds of events.
    if (!this.pending) {
      this.pending = setTimeout(() => {
        this.pending = null;
        this.topTable.render([...this.top.values()]);
      }, 250);
    }
  }
}
