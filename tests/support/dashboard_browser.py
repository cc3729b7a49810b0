"""Driving the dashboard in Debian's chromium with Playwright (sync API), reusable against any
dashboard base URL — the loopback harness here, or a full sandbox with real traffic:

    with browser_page() as page:
        open_overview(page, "http://10.0.0.1:8084", window="1m")
        assert_rows_match(overview_rows(page), json.loads(subprocess.check_output(
            ["nodemesh", "stat", "deploy", "-A", "-o", "json"])), rel=0.05)

Never runs `playwright install`: the browser is the system's /usr/bin/chromium (apt, bootstrap).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "dashboard"
METRIC_KEYS = ("meshed", "success", "rps", "latency_ms_p50", "latency_ms_p95", "latency_ms_p99",
               "tcp_open_connections")
_COLUMN_OF = {"name": "name", "meshed": "meshed", "success": "success", "rps": "rps",
              "latency_ms_p50": "latency_ms_p50", "latency_ms_p95": "latency_ms_p95",
              "latency_ms_p99": "latency_ms_p99", "tcp_open_connections": "tcp_open_connections"}


@contextlib.contextmanager
def browser_page(width: int = 1280, height: int = 900) -> Iterator[Page]:
    """A fresh headless page; `page.errors` collects console errors and uncaught exceptions."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # bypass_csp: Playwright's wait_for_function evaluates strings, which the page's CSP
            # forbids; it also means the <script> check tests the page's escaping, not the CSP.
            page = browser.new_page(viewport={"width": width, "height": height}, bypass_csp=True)
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
            page.errors = errors  # type: ignore[attr-defined]
            yield page
        finally:
            browser.close()


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


# ------------------------------------------------------------------------------------ overview
def open_overview(page: Page, base_url: str, window: str = "1m", timeout_ms: int = 15_000) -> None:
    page.goto(base_url.rstrip("/") + "/#/")
    page.wait_for_selector("section.ns tr.row", timeout=timeout_ms)
    set_window(page, window, timeout_ms)


def set_window(page: Page, window: str, timeout_ms: int = 15_000) -> None:
    """Pick a window in the selector and wait for the live label to report it."""
    seconds = {"10s": 10, "1m": 60, "5m": 300, "15m": 900, "1h": 3600}[window]
    if page.input_value("#window") != window:
        page.select_option("#window", window)
    page.wait_for_function(f"document.getElementById('live').textContent.includes('{seconds}s window')",
                           timeout=timeout_ms)


def wait_overview_update(page: Page, after_ms: int, timeout_ms: int = 15_000) -> None:
    """Wait for a pushed refresh computed after `after_ms` (epoch milliseconds)."""
    page.wait_for_function(f"Number(document.getElementById('view').dataset.updated || 0) > {after_ms}",
                           timeout=timeout_ms)


def _num(text: str) -> float | None:
    return None if text == "" else float(text)


def overview_rows(page: Page) -> list[dict[str, Any]]:
    """Every workload row of the overview: namespace, kind, name, css class and the raw numbers
    behind each formatted cell (data-value), as the API sent them."""
    raw = page.eval_on_selector_all("section.ns tr.row", """rows => rows.map(tr => ({
        namespace: tr.closest('section.ns').dataset.namespace, kind: tr.dataset.kind, name: tr.dataset.name,
        cls: tr.className,
        cells: Object.fromEntries([...tr.querySelectorAll('td')].map(td => [td.dataset.key, [td.dataset.value, td.textContent]]))
    }))""")
    out = []
    for r in raw:
        row: dict[str, Any] = {"namespace": r["namespace"], "kind": r["kind"], "name": r["name"], "class": r["cls"],
                               "text": {k: v[1] for k, v in r["cells"].items()}}
        for key in METRIC_KEYS:
            row[key] = _num(r["cells"][_COLUMN_OF[key]][0])
        out.append(row)
    return out


def assert_rows_match(page_rows: Sequence[Mapping[str, Any]], expected: Sequence[Mapping[str, Any]],
                      rel: float = 0.0) -> None:
    """Every expected row (`nodemesh stat -o json` / /api/stat) of a kind the overview shows is on
    the page with equal numbers (`rel`: tolerance for refresh jitter against live traffic)."""
    shown = {(r["namespace"], r["kind"], r["name"]): r for r in page_rows}
    for want in expected:
        key = (want["namespace"], want["kind"], want["name"])
        if want["kind"] not in ("deployment", "statefulset", "daemonset", "job"):
            continue
        assert key in shown, f"{key} missing from the overview"
        got = shown[key]
        for metric in METRIC_KEYS:
            a, b = got[metric], want[metric]
            if a is None or b is None:
                assert a is None and b is None, f"{key} {metric}: page {a!r} != expected {b!r}"
            else:
                assert math.isclose(a, b, rel_tol=rel, abs_tol=1e-9), f"{key} {metric}: page {a} != expected {b}"


# ------------------------------------------------------------------------------------ workload page
def open_workload(page: Page, base_url: str, namespace: str, kind: str, name: str,
                  timeout_ms: int = 15_000) -> None:
    page.goto(f"{base_url.rstrip('/')}/#/workload/{namespace}/{kind}/{name}")
    page.wait_for_selector(".cards .card[data-key=success]", timeout=timeout_ms)


def workload_edges(page: Page) -> dict[str, list[str]]:
    """Peers in the callers/callees tables, and the graph's edges with their colour class."""
    peers = lambda sel: page.eval_on_selector_all(sel, "rows => rows.map(r => r.dataset.peer)")
    return {
        "callers": peers("#callers tbody tr"),
        "callees": peers("#callees tbody tr"),
        "graph": page.eval_on_selector_all("svg.graph path.edge",
                                           "ps => ps.map(p => p.querySelector('title').textContent + ' ' + "
                                           "p.getAttribute('class'))"),
    }


# ------------------------------------------------------------------------------------ tap
def start_tap(page: Page, timeout_ms: int = 15_000, **filters: str) -> None:
    """Fill the tap form (method, path, authority, to, max_rps) and start; waits for the stream."""
    for key, value in filters.items():
        page.fill(f"#tap-form input[name={key}]", value)
    page.click("#tap-toggle")
    page.wait_for_selector("#tap-status.running", timeout=timeout_ms)


def stop_tap(page: Page) -> None:
    page.click("#tap-toggle")
    page.wait_for_selector("#tap-status.stopped")


def tap_rows(page: Page) -> list[dict[str, str]]:
    return page.eval_on_selector_all("#tap-table tbody tr", """rows => rows.map(tr => {
        const td = [...tr.children].map(c => c.textContent);
        return {direction: td[0], source: td[1], destination: td[2], method: td[3], path: td[4], status: td[5],
                grpc: td[6], latency: td[7], cls: tr.className};
    })""")


def top_rows(page: Page) -> list[dict[str, str]]:
    return page.eval_on_selector_all("#tap-top tbody tr", """rows => rows.map(tr => Object.fromEntries(
        [...tr.children].map(td => [td.dataset.key, td.textContent])))""")
