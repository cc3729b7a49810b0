// The dashboard's entry point: hash routing between the overview and a workload's page, and
// the time-window selector every view follows.
import {clear} from "./lib.js";
import {Overview} from "./overview.js";
import {WorkloadPage} from "./workload.js";

const WINDOWS = ["10s", "1m", "5m", "15m", "1h"];
const view = document.getElementById("view");
const select = document.getElementById("window");
const live = document.getElementById("live");
const crumbs = document.getElementById("crumbs");
let current = null;

function savedWindow() {
  const w = localStorage.getItem("nodemesh.window");
  return WINDOWS.includes(w) ? w : "1m";
}

export const ui = {
  window: savedWindow(),
  setLive(state, text) {
    live.className = `live ${state}`;
    live.textContent = text;
  },
  setCrumbs(parts) {
    clear(crumbs);
    for (const p of parts) crumbs.append(p);
  },
};

function route() {
  if (current) current.stop();
  clear(view);
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  if (parts[0] === "workload" && parts.length === 4) {
    current = new WorkloadPage(view, ui, {namespace: parts[1], type: parts[2], name: parts[3]});
  } else {
    current = new Overview(view, ui);
  }
  current.start();
}

select.value = ui.window;
select.addEventListener("change", () => {
  ui.window = select.value;
  localStorage.setItem("nodemesh.window", ui.window);
  if (current) current.setWindow(ui.window);
});
window.addEventListener("hashchange", route);
route();
