// Inline SVG: sparklines of a time series, and the small caller -> workload -> callee graph.
import {h, health, s, workloadHash, SHORT} from "./lib.js";

const COLORS = {ok: "#2e9e5b", warn: "#d99a00", bad: "#d0342c", idle: "#9aa3ad"};

// One sparkline: lines [{values, color, label}] over the same x steps; nulls are gaps.
export function sparkline(title, lines, format, {width = 300, height = 64, min0 = true, max = null} = {}) {
  const all = lines.flatMap((l) => l.values).filter((v) => v !== null && v !== undefined);
  const hi = max !== null ? max : Math.max(...all, 0) || 1;
  const lo = min0 ? 0 : Math.min(...all, hi);
  const n = Math.max(1, ...lines.map((l) => l.values.length - 1));
  const x = (i) => (i / n) * (width - 2) + 1;
  const y = (v) => height - 2 - ((v - lo) / (hi - lo || 1)) * (height - 4);
  const svg = s("svg", {viewBox: `0 0 ${width} ${height}`, class: "spark", role: "img", "aria-label": title});
  svg.append(s("line", {x1: 0, x2: width, y1: height - 1, y2: height - 1, class: "axis"}));
  for (const l of lines) {
    let d = "";
    l.values.forEach((v, i) => {
      if (v === null || v === undefined) return;
      const prev = i > 0 ? l.values[i - 1] : null;
      d += `${prev === null || prev === undefined ? "M" : "L"}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
    });
    svg.append(s("path", {d, fill: "none", stroke: l.color, "stroke-width": 1.5}, s("title", {}, l.label)));
    // A step with no neighbour draws no line: mark it with a dot so one minute of traffic shows.
    l.values.forEach((v, i) => {
      const lone = (i === 0 || l.values[i - 1] === null) && (i === l.values.length - 1 || l.values[i + 1] === null);
      if (v !== null && v !== undefined && lone) svg.append(s("circle", {cx: x(i), cy: y(v), r: 2, fill: l.color}));
    });
  }
  const last = lines.map((l) => {
    const v = [...l.values].reverse().find((x) => x !== null && x !== undefined);
    return `${l.label} ${v === undefined ? "-" : format(v)}`;
  }).join(" · ");
  return h("figure", {className: "sparkfig"}, h("figcaption", {}, h("b", {}, title), " ", h("span", {}, last)), svg);
}

// Callers on the left, the workload in the middle, callees on the right; each edge coloured by
// the success rate of that edge's requests.
export function edgeGraph(me, callers, callees) {
  const rowH = 34, width = 720, boxW = 200;
  const rows = Math.max(1, callers.length, callees.length);
  const height = rows * rowH + 20;
  const svg = s("svg", {viewBox: `0 0 ${width} ${height}`, width, height, class: "graph", role: "img",
    "aria-label": `callers and callees of ${me.name}`});
  const defs = s("defs");
  for (const [k, c] of Object.entries(COLORS)) {
    defs.append(s("marker", {id: `arrow-${k}`, viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 6,
      markerHeight: 6, orient: "auto-start-reverse"}, s("path", {d: "M0,0 L10,5 L0,10 z", fill: c})));
  }
  svg.append(defs);
  const cy = height / 2;
  const mid = {x: (width - boxW) / 2, y: cy - 14};
  const node = (x, y, peer, cls) => {
    const label = `${SHORT[peer.kind] || peer.kind}/${peer.name}`;
    const text = s("text", {x: x + boxW / 2, y: y + 18, "text-anchor": "middle"}, label.length > 28 ? `${label.slice(0, 27)}…` : label);
    const g = s("a", {href: workloadHash(peer.namespace, peer.kind, peer.name), class: `node ${cls}`},
      s("rect", {x, y, width: boxW, height: 26, rx: 5}), text, s("title", {}, `${peer.namespace}/${label}`));
    return g;
  };
  const edge = (x1, y1, x2, y2, stat, title) => {
    const k = health(stat.success);
    return s("path", {d: `M${x1},${y1} C${(x1 + x2) / 2},${y1} ${(x1 + x2) / 2},${y2} ${x2},${y2}`,
      stroke: COLORS[k], "stroke-width": 2, fill: "none", class: `edge ${k}`, "marker-end": `url(#arrow-${k})`},
    s("title", {}, title));
  };
  const place = (list, i) => cy - (list.length * rowH) / 2 + i * rowH + 4;
  callers.forEach((c, i) => {
    const y = place(callers, i);
    svg.append(edge(boxW + 4, y + 13, mid.x, cy, c.stat, `${c.peer.name} → ${me.name}`));
    svg.append(node(4, y, c.peer, "caller"));
  });
  callees.forEach((c, i) => {
    const y = place(callees, i);
    svg.append(edge(mid.x + boxW, cy, width - boxW - 4, y + 13, c.stat, `${me.name} → ${c.peer.name}`));
    svg.append(node(width - boxW - 4, y, c.peer, "callee"));
  });
  svg.append(node(mid.x, mid.y, me, "self"));
  return svg;
}
