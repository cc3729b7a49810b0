"""Must-show 1 on the loopback harness: Debian's chromium (Playwright, headless) against the real
controller fed by fake agents over gRPC. The overview's numbers equal the API's and the gRPC
StatSummary's (what `nodemesh stat -o json` prints), the workload page shows its edges, a live
tap shows rows appearing, and a `<script>` in a tapped path renders as text. Screenshots go to
artifacts/dashboard/."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from dashboard_browser import (
    assert_rows_match,
    browser_page,
    open_overview,
    open_workload,
    overview_rows,
    screenshot,
    set_window,
    start_tap,
    stop_tap,
    tap_rows,
    top_rows,
    wait_overview_update,
    workload_edges,
)
from dashboard_harness import NS, ControllerThread, tap_request
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.cli.render import stat_row_json

XSS_PATH = '/api/<script>window.__nodemeshXss=1</script><img src=x onerror="window.__nodemeshXss=2">'


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[ControllerThread]:
    ct = ControllerThread(tmp_path)
    try:
        ct.start()
        yield ct
    finally:
        ct.stop()


def api(base: str, path: str) -> dict:
    with urllib.request.urlopen(base + path, timeout=10) as r:
        return json.loads(r.read())


def grpc_stat_json(address: str, window_s: int) -> list[dict[str, object]]:
    """`nodemesh stat deploy sts ds job -A -o json`, through the gRPC API."""
    rows = []
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.ControllerStub(ch)
        for t in ("deployment", "statefulset", "daemonset", "job"):
            resp = stub.StatSummary(pb.StatRequest(selector=pb.Resource(type=t), all_namespaces=True,
                                                   window_seconds=window_s), timeout=10)
            assert resp.error == ""
            rows += sorted(resp.rows, key=lambda r: (r.resource.namespace, r.resource.name))
    return [stat_row_json(r) for r in sorted(rows, key=lambda r: r.resource.type)]


def test_dashboard_browser_overview_workload_tap(controller: ControllerThread) -> None:
    base = controller.base_url
    controller.report_traffic(3)
    with browser_page() as page:
        # ---- overview: numbers equal the API's and stat -o json's, live, highlighted, sortable
        open_overview(page, base, window="1m")
        ingested = int(time.time() * 1000)
        wait_overview_update(page, ingested)
        shown = overview_rows(page)
        via_api = api(base, "/api/stat?type=deploy,sts,ds,job&all_namespaces=true&window=1m")["rows"]
        via_grpc = grpc_stat_json(controller.grpc_address, 60)
        assert via_api == via_grpc
        assert_rows_match(shown, via_grpc, rel=0.0)
        by_name = {r["name"]: r for r in shown}
        assert by_name["emoji"]["success"] == pytest.approx(0.9) and "warn" in by_name["emoji"]["class"]
        assert by_name["voting"]["success"] == pytest.approx(0.8) and "bad" in by_name["voting"]["class"]
        assert "ok" in by_name["web"]["class"] and by_name["web"]["text"]["success"] == "100.00%"
        assert {r["namespace"] for r in shown} == {NS, "legacy"}
        page.click("section.ns[data-namespace=emojivoto] th[data-key=rps]")
        order = page.eval_on_selector_all("section.ns[data-namespace=emojivoto] tr.row", "r => r.map(x => x.dataset.name)")
        assert order[0] == "emoji"  # the busiest first (descending on the first click of a number)
        screenshot(page, "overview")

        # Live: more traffic shows up without a page load (a marker on window survives).
        page.evaluate("window.__noReload = true")
        before = by_name["emoji"]["rps"]
        controller.report_traffic(2)
        wait_overview_update(page, int(time.time() * 1000))
        after = {r["name"]: r for r in overview_rows(page)}["emoji"]["rps"]
        assert after > before and page.evaluate("window.__noReload") is True
        set_window(page, "10s")
        wait_overview_update(page, int(time.time() * 1000))
        assert_rows_match(overview_rows(page), grpc_stat_json(controller.grpc_address, 10), rel=0.0)
        set_window(page, "1m")

        # ---- workload page: edges in the tables and in the graph, coloured by success rate
        open_workload(page, base, NS, "deployment", "web")
        page.wait_for_selector("#callees tbody tr")
        edges = workload_edges(page)
        assert edges["callers"] == ["vote-bot"] and edges["callees"] == ["emoji", "voting"]
        assert sorted(edges["graph"]) == ["vote-bot → web edge ok", "web → emoji edge warn", "web → voting edge bad"]
        assert page.text_content("#pods tbody tr") is not None and "node-1" in page.text_content("#pods tbody tr")
        assert page.eval_on_selector_all(".sparkfig svg", "s => s.length") == 3
        screenshot(page, "workload")

        # ---- live tap: filters reach the agent, rows appear, <script> in a path is text
        start_tap(page, method="get", path="/api")
        tap_id = controller.wait_tap_open("node-1")
        opened = next(o for o in controller.agents["node-1"].of("tap_open") if o.tap_id == tap_id)
        assert (opened.filter.method, opened.filter.path_prefix, opened.filter.target.name) == ("GET", "/api", "web")
        for i in range(4):
            controller.send("node-1", tap_request(tap_id, f"1:{i}", "/api/vote", latency_us=1000 + 500 * i))
        controller.send("node-1", tap_request(tap_id, "1:9", "/api/list", status=500))
        page.wait_for_function("document.querySelectorAll('#tap-table tbody tr').length >= 5")
        rows = tap_rows(page)
        assert rows[0]["path"] == "/api/list" and rows[0]["status"] == "500" and "bad" in rows[0]["cls"]
        assert {r["source"] for r in rows} == {"vote-bot-7c4d8b5f9-p2lkd"}
        controller.send("node-1", tap_request(tap_id, "1:66", XSS_PATH))
        page.wait_for_function("document.querySelectorAll('#tap-table tbody tr').length >= 6")
        page.wait_for_timeout(400)  # the top table redraws at most every 250 ms
        assert tap_rows(page)[0]["path"] == XSS_PATH
        cell = page.locator("#tap-table td.path").first
        assert cell.is_visible() and cell.text_content() == XSS_PATH
        assert page.evaluate("window.__nodemeshXss") is None
        assert page.eval_on_selector_all("#workload script, #workload img", "n => n.length") == 0
        top = {r["path"]: r for r in top_rows(page)}
        assert top["/api/vote"]["count"] == "4" and top["/api/vote"]["success"] == "100.00%"
        # durations (response_end) 1300..2800 µs, as `nodemesh top` shows them
        assert top["/api/vote"]["best"] == "1ms" and top["/api/vote"]["worst"] == "3ms"
        assert top["/api/list"]["success"] == "0.00%" and XSS_PATH in top
        screenshot(page, "tap")
        stop_tap(page)
        controller.call(_wait_closed(controller, tap_id))
        assert not page.errors, page.errors


async def _wait_closed(controller: ControllerThread, tap_id: str) -> None:
    from waiting import eventually
    agent = controller.agents["node-1"]
    await eventually(lambda: tap_id in {c.tap_id for c in agent.of("tap_close")}, 10)
