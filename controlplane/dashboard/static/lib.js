// Small shared helpers: DOM building (text only, never markup from data), number formats
// (the CLI's, cli/render.py), the JSON API and a Server-Sent Events reader over fetch.

const SVG_NS = "http://www.w3.org/2000/svg";

// h("td", {className: "num", dataset: {value: 1}}, "text", childNode) -> element.
// Strings become text nodes, so traffic data (paths, authorities) can never become markup.
export function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  setProps(node, props);
  append(node, children);
  return node;
}

export function s(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== null && v !== undefined) node.setAttribute(k, String(v));
  }
  append(node, children);
  return node;
}

function setProps(node, props) {
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined) continue;
    if (k === "dataset") {
      for (const [dk, dv] of Object.entries(v)) node.dataset[dk] = dv === null ? "" : String(dv);
    } else if (k.startsWith("on")) {
      node.addEventListener(k.slice(2), v);
    } else if (k === "className" || k === "textContent" || k === "value" || k === "type" || k === "disabled"
               || k === "placeholder" || k === "name" || k === "checked" || k === "selected") {
      node[k] = v;
    } else {
      node.setAttribute(k, String(v));
    }
  }
}

function append(node, children) {
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

// ----------------------------------------------------------------------------- formats
export const MISSING = "-";

export function fmtPercent(frac) {
  return frac === null || frac === undefined ? MISSING : `${(frac * 100).toFixed(2)}%`;
}

export function fmtRps(rps) {
  return rps === null || rps === undefined ? MISSING : `${rps.toFixed(1)}rps`;
}

export function fmtMs(ms) {
  if (ms === null || ms === undefined) return MISSING;
  if (ms > 0 && ms < 1) return `${ms.toFixed(1)}ms`;
  return `${Math.round(ms)}ms`;
}

export function fmtCount(v) {
  return v === null || v === undefined ? MISSING : String(Math.round(v));
}

export function fmtBytesRate(v) {
  return v === null || v === undefined ? MISSING : `${v.toFixed(1)}B/s`;
}

// A latency in microseconds as `nodemesh top` prints it (Go's Duration after rounding).
export function fmtUs(us) {
  if (us === null || us === undefined) return MISSING;
  if (us < 1000) return `${us}µs`;
  if (us < 1000000) return `${Math.round(us / 1000)}ms`;
  return `${Math.round(us / 1000000)}s`;
}

export const GRPC_CODES = ["OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
  "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange",
  "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated"];

export function grpcName(code) {
  return code >= 0 && code < GRPC_CODES.length ? GRPC_CODES[code] : `Code(${code})`;
}

// Success colours: below 100 % is a warning, below 90 % is bad (the overview's highlight).
export function health(success) {
  if (success === null || success === undefined) return "idle";
  if (success < 0.9) return "bad";
  if (success < 1) return "warn";
  return "ok";
}

export const SHORT = {deployment: "deploy", statefulset: "sts", daemonset: "ds", job: "job", pod: "po",
  replicaset: "rs", service: "svc", namespace: "ns"};

export function workloadHash(namespace, kind, name) {
  return `#/workload/${encodeURIComponent(namespace)}/${encodeURIComponent(kind)}/${encodeURIComponent(name)}`;
}

// ----------------------------------------------------------------------------- API
export class ApiError extends Error {}

export async function getJSON(path, params = {}) {
  const url = `${path}?${new URLSearchParams(params)}`;
  const resp = await fetch(url, {headers: {Accept: "application/json"}});
  const body = await resp.json().catch(() => ({error: `${resp.status} ${resp.statusText}`}));
  if (!resp.ok) throw new ApiError(body.error || `${resp.status} ${resp.statusText}`);
  return body;
}

// Read a Server-Sent Events response with fetch (unlike EventSource, a 4xx answer's JSON error
// is readable, and abort() ends the request at once). onEvent(name, data) per event.
export async function readEvents(path, params, signal, onEvent) {
  const resp = await fetch(`${path}?${new URLSearchParams(params)}`, {signal, headers: {Accept: "text/event-stream"}});
  if (!resp.ok) {
    const body = await resp.json().catch(() => ({}));
    throw new ApiError(body.error || `${resp.status} ${resp.statusText}`);
  }
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buf += value;
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

// ----------------------------------------------------------------------------- tables
// A sortable table: columns [{key, label, num, value(row), render(row) -> string|Node, cls(row)}].
export class SortTable {
  constructor(columns, {sortKey, sortDir = 1, rowProps} = {}) {
    this.columns = columns;
    this.sortKey = sortKey || columns[0].key;
    this.sortDir = sortDir;
    this.rowProps = rowProps || (() => ({}));
    this.rows = [];
    this.tbody = h("tbody");
    this.heads = columns.map((c) => h("th", {
      className: c.num ? "num sortable" : "sortable", dataset: {key: c.key}, tabindex: 0,
      onclick: () => this.sortBy(c.key),
    }, c.label));
    this.table = h("table", {className: "stat"}, h("thead", {}, h("tr", {}, this.heads)), this.tbody);
  }

  sortBy(key) {
    this.sortDir = key === this.sortKey ? -this.sortDir : (this.columns.find((c) => c.key === key).num ? -1 : 1);
    this.sortKey = key;
    this.render(this.rows);
  }

  render(rows) {
    this.rows = rows;
    const col = this.columns.find((c) => c.key === this.sortKey);
    const val = col.value || ((r) => r[col.key]);
    const sorted = [...rows].sort((a, b) => {
      const va = val(a), vb = val(b);
      if (va === vb) return 0;
      if (va === null || va === undefined) return 1; // nothing to show sorts last either way
      if (vb === null || vb === undefined) return -1;
      return (va < vb ? -1 : 1) * this.sortDir;
    });
    for (const th of this.heads) {
      th.classList.toggle("asc", th.dataset.key === this.sortKey && this.sortDir > 0);
      th.classList.toggle("desc", th.dataset.key === this.sortKey && this.sortDir < 0);
    }
    const body = h("tbody");
    for (const r of sorted) {
      body.append(h("tr", this.rowProps(r), this.columns.map((c) => {
        const raw = (c.value || ((x) => x[c.key]))(r);
        const shown = c.render ? c.render(r) : raw;
        return h("td", {className: [c.num ? "num" : "", c.cls ? c.cls(r) : ""].join(" ").trim(),
          dataset: {key: c.key, value: raw === null || raw === undefined ? "" : raw}}, shown);
      })));
    }
    this.tbody.replaceWith(body);
    this.tbody = body;
  }
}
