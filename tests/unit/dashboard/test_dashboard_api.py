"""The dashboard's JSON API on a real aiohttp server (loopback) over a real Controller fed
synthetic agent reports through its own ingestion path (`agent_connected`, `ingest_report`)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import controller_feed
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from controller_feed import NS, PODS, peer, recorded_registry
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.cli.render import routes_json
from nodemesh.cli.render import stat_row_json as cli_stat_row_json
from nodemesh.controlplane.aggregate import BOUNDS, N_LATENCY
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.controller import Controller
from nodemesh.controlplane.dashboard import add_routes, views
from nodemesh.controlplane.web import build_app

TESTDATA = Path(__file__).parent / "testdata" / "cluster.json"
REPO = Path(__file__).resolve().parents[3]


def series_for(labels: dict[str, str], success: int, failure: int, bound_ms: float) -> list[pb.Series]:
    return controller_feed.series_for(labels, success, failure, bound_ms, status_codes=False)


def route_series(method: str, success: int, failure: int) -> list[pb.Series]:
    """voting's inbound route series (node-2) for one gRPC method of the demo's VotingService."""
    lab = {"direction": "inbound", "src_namespace": NS, "src_kind": "deployment", "src_name": "web",
           "dst_namespace": NS, "dst_kind": "deployment", "dst_name": "voting", "dst_service": f"voting-svc.{NS}",
           "rt_route": f"/emojivoto.v1.VotingService/{method}"}
    counts = [0] * N_LATENCY
    counts[BOUNDS.index(100.0)] = success + failure
    return [
        pb.Series(name="route_request_total", labels=lab, value=success + failure),
        pb.Series(name="route_response_total", labels={**lab, "classification": "success"}, value=success),
        pb.Series(name="route_response_total", labels={**lab, "classification": "failure"}, value=failure),
        pb.Series(name="route_response_latency_ms", labels=lab, bucket_counts=counts, sum=0.0),
    ]


def node1_series(scale: int) -> list[pb.Series]:
    out: list[pb.Series] = []
    for direction in ("outbound", "inbound"):  # same node: recorded in both directions
        out += series_for(peer(direction, "web", "emoji", "emoji-svc"), 54 * scale, 6 * scale, 20.0)
        out += series_for(peer(direction, "vote-bot", "web", "web-svc"), 12 * scale, 0, 5.0)
    out += series_for(peer("outbound", "web", "voting", "voting-svc"), 30 * scale, 0, 100.0)
    return out


@pytest.fixture
def controller() -> Controller:
    c = Controller(ControllerConfig(tap_max_rps=50), registry=recorded_registry(TESTDATA))
    # Fed relative to this test's start, not the module's import: a long session must not age the
    # "5 s ago" traffic out of a 10 s window before the API is asked.
    now = c.test_fed_at = time.time()  # type: ignore[attr-defined]
    start = c.started_ms + 1000  # agents started after the controller: first reports are all new
    n1 = c.agent_connected(pb.AgentHello(agent_id="agent-1", node="node-1", version="0.1.0", start_time_ms=start))
    n2 = c.agent_connected(pb.AgentHello(agent_id="agent-2", node="node-2", version="0.1.0", start_time_ms=start))
    c.agent_message(n1, pb.AgentMessage(status=pb.AgentStatus(ready=True, capture_installed=True)))
    # Traffic spread over the last hour: 40 min ago, 5 min ago, 5 s ago (cumulative counters).
    for seq, (age, scale) in enumerate(((2400, 1), (300, 3), (5, 10)), start=1):
        c.ingest_report(n1, pb.MetricsReport(agent_id="agent-1", seq=seq, series=node1_series(scale)), now=now - age)
        c.ingest_report(n2, pb.MetricsReport(agent_id="agent-2", seq=seq, series=[*series_for(
            peer("inbound", "web", "voting", "voting-svc"), 30 * scale, 0, 100.0),
            *route_series("VoteJoy", 20 * scale, 0), *route_series("VoteDoughnut", 0, 10 * scale)]), now=now - age)
    return c


Client = Callable[..., Awaitable[tuple[int, Any]]]


def serve(controller: Controller, test: Callable[[str, Client], Awaitable[None]]) -> None:
    """Run `test(base_url, get)` against build_app(controller) on a real loopback server."""
    async def main() -> None:
        server = TestServer(build_app(controller), host="127.0.0.1")
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as http:
                async def get(path: str, **params: str) -> tuple[int, Any]:
                    async with http.get(f"{server.make_url(path)}", params=params) as r:
                        return r.status, await r.json()
                await test(str(server.make_url("")), get)
        finally:
            await server.close()
    asyncio.run(asyncio.wait_for(main(), 30))


def grpc_rows(c: Controller, type_: str, window: int = 60, **kw: Any) -> list[dict[str, object]]:
    """What `nodemesh stat -o json` prints for the same question (the gRPC servicer calls c.stat)."""
    req = pb.StatRequest(selector=pb.Resource(namespace=NS, type=type_), window_seconds=window, **kw)
    resp = c.stat(req, time.time())
    assert resp.error == ""
    return [cli_stat_row_json(r) for r in sorted(resp.rows, key=lambda r: (r.resource.namespace, r.resource.name))]


# ------------------------------------------------------------------------------------ stat
@pytest.mark.parametrize("window,seconds", [("10s", 10), ("1m", 60), ("5m", 300), ("15m", 900), ("1h", 3600)])
def test_dashboard_stat_equals_stat_json(controller: Controller, window: str, seconds: int) -> None:
    async def test(base: str, get: Client) -> None:
        for type_ in ("deploy", "po", "svc", "sts"):
            status, body = await get("/api/stat", type=type_, namespace=NS, window=window)
            assert status == 200, body
            assert body["window_s"] == seconds
            assert body["rows"] == grpc_rows(controller, type_, seconds)
    serve(controller, test)


def test_dashboard_stat_rows_carry_the_numbers(controller: Controller) -> None:
    async def test(base: str, get: Client) -> None:
        _, body = await get("/api/stat", type="deploy", namespace=NS, window="1m")
        rows = {r["name"]: r for r in body["rows"]}
        assert list(rows["emoji"]) == ["namespace", "kind", "name", "meshed", "totalPods", "success", "rps",
                                       "latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "tcp_open_connections",
                                       "tcp_read_bytes_rate", "tcp_write_bytes_rate"]
        # 5 s ago counters went from 3x to 10x: 7 * (54 + 6) responses in the last minute.
        assert rows["emoji"]["success"] == pytest.approx(0.9)
        assert rows["emoji"]["rps"] == pytest.approx(7 * 60 / 60)
        assert rows["emoji"]["kind"] == "deployment" and rows["emoji"]["meshed"] == 1
        assert rows["vote-bot"]["rps"] is None  # nobody calls vote-bot
        # --to and --from as the CLI's flags.
        _, body = await get("/api/stat", type="deploy", namespace=NS, to="deploy/emoji")
        assert [r["name"] for r in body["rows"]] == ["web"]
        assert body["rows"] == grpc_rows(controller, "deploy", to=pb.Resource(namespace=NS, type="deployment",
                                                                                name="emoji"))
        _, body = await get("/api/stat", type="deploy,sts", all_namespaces="true")
        assert {(r["kind"], r["name"]) for r in body["rows"]} >= {("deployment", "old"), ("statefulset", "db")}
    serve(controller, test)


@pytest.mark.parametrize("params,status,message", [
    ({"type": "nope"}, 400, "unknown resource type 'nope'"),
    ({}, 400, "missing parameter 'type'"),
    ({"type": "deploy", "namespace": NS, "window": "2h"}, 400, "too long: the maximum is 1h"),
    ({"type": "deploy", "namespace": NS, "window": "5s"}, 400, "too short: the minimum is 10s"),
    ({"type": "deploy", "namespace": NS, "window": "1 minute"}, 400, "invalid time window"),
    ({"type": "deploy", "namespace": NS, "name": "nope"}, 404, 'deployment "nope" not found'),
    ({"type": "deploy", "namespace": "nowhere"}, 404, 'namespace "nowhere" not found'),
    ({"type": "deploy", "windw": "1m"}, 400, "unknown parameter 'windw'"),
    ({"type": "deploy", "all_namespaces": "maybe"}, 400, "invalid all_namespaces"),
    ({"type": "deploy", "namespace": NS, "from": "deploy/web", "to": "deploy/emoji"}, 400, "cannot be used together"),
    ({"type": "deploy", "namespace": NS, "label_selector": "(("}, 400, "invalid label selector"),
    ({"type": "deploy", "to": "bogus/x"}, 400, "invalid to: unknown resource type 'bogus'"),
])
def test_dashboard_stat_bad_parameters(controller: Controller, params: dict[str, str], status: int,
                                       message: str) -> None:
    async def test(base: str, get: Client) -> None:
        got, body = await get("/api/stat", **params)
        assert got == status
        assert set(body) == {"error"} and message in body["error"]
    serve(controller, test)


# ------------------------------------------------------------------------------------ workload
def test_dashboard_workload_page_data(controller: Controller) -> None:
    async def test(base: str, get: Client) -> None:
        status, body = await get("/api/workload", namespace=NS, type="deploy", name="web", window="1m")
        assert status == 200, body
        assert body["stat"] == grpc_rows(controller, "deploy")[-1]  # web sorts last
        assert [c["peer"]["name"] for c in body["callers"]] == ["vote-bot"]
        assert [c["peer"]["name"] for c in body["callees"]] == ["emoji", "voting"]
        emoji = body["callees"][0]["stat"]
        # The edge's numbers are `stat deploy/web --to deploy/emoji`... seen from web's side:
        # `stat deploy/emoji --from deploy/web`.
        assert emoji == grpc_rows(controller, "deploy", **{"from": pb.Resource(
            namespace=NS, type="deployment", name="web")})[0]
        assert emoji["success"] == pytest.approx(0.9)
        assert body["callers"][0]["stat"]["success"] == 1
        assert body["pods"] == [{"name": PODS["web"], "namespace": NS, "node": "node-1", "ip": "10.244.1.5",
                                 "status": "Running", "ready": True, "meshed": True}]
        assert body["grafana_url"] is None
        # The series: 60 one-minute steps; the hour's responses add up to the hour's stat.
        series = body["series"]
        assert series["step_s"] == 60 and len(series["points"]) == 60
        total = sum(p["rps"] * 60 for p in series["points"] if p["rps"] is not None)
        assert total == pytest.approx(12 * 10)  # vote-bot -> web, cumulative 12 x 10 over the hour
        busy = [p for p in series["points"] if p["rps"] is not None]
        assert len(busy) == 3 and all(p["success"] == 1 and p["p50"] == pytest.approx(4.5) for p in busy)
        assert series["points"][-1]["t"] >= int(controller.test_fed_at) - 1
        # Finer steps cover the same traffic.
        _, fine = await get("/api/workload", namespace=NS, type="deploy", name="web", step="10")
        assert len(fine["series"]["points"]) == 360
        assert sum(p["rps"] * 10 for p in fine["series"]["points"] if p["rps"]) == pytest.approx(120)
    serve(controller, test)


def test_dashboard_workload_routes_equal_routes_json(controller: Controller) -> None:
    """The page's route table is `nodemesh routes deploy/voting -o json` for the same window."""
    async def test(base: str, get: Client) -> None:
        _, body = await get("/api/workload", namespace=NS, type="deploy", name="voting", window="1m")
        resp = controller.routes(pb.RoutesRequest(selector=pb.Resource(namespace=NS, type="deployment",
                                                                       name="voting"), window_seconds=60))
        assert not resp.error and body["routes"] == json.loads(routes_json(resp.rows))
        named = {r["route"].rsplit("/", 1)[-1]: r for r in body["routes"] if r["route"].startswith("/")}
        assert set(named) == {"VoteJoy", "VoteDoughnut"}, body["routes"]
        assert named["VoteDoughnut"]["success"] == 0 and named["VoteDoughnut"]["requests"] == 70
        assert named["VoteJoy"]["success"] == 1 and named["VoteJoy"]["requests"] == 140  # cumulative 20 x (10 - 3) in the minute
        _, pod = await get("/api/workload", namespace=NS, type="po", name=PODS["voting"], window="1m")
        assert pod["routes"] == []  # route series are per workload: a pod has no table, and no error
    serve(controller, test)


@pytest.mark.parametrize("params,status,message", [
    ({"namespace": NS, "type": "deploy", "name": "nope"}, 404, 'deployment "nope" not found in namespace'),
    ({"namespace": NS, "type": "deploy"}, 400, "missing parameter 'name'"),
    ({"namespace": NS, "type": "ns", "name": NS}, 400, "is not a workload"),
    ({"namespace": NS, "type": "deploy", "name": "web", "window": "3h"}, 400, "too long"),
    ({"namespace": NS, "type": "deploy", "name": "web", "step": "7"}, 400, "step 7 is out of range"),
    ({"namespace": NS, "type": "deploy", "name": "web", "step": "70"}, 400, "must divide 3600"),
    ({"namespace": "gone", "type": "deploy", "name": "web"}, 404, 'namespace "gone" not found'),
])
def test_dashboard_workload_bad_parameters(controller: Controller, params: dict[str, str], status: int,
                                           message: str) -> None:
    async def test(base: str, get: Client) -> None:
        got, body = await get("/api/workload", **params)
        assert (got, set(body)) == (status, {"error"}) and message in body["error"], body
    serve(controller, test)


def test_dashboard_grafana_link(controller: Controller) -> None:
    me = pb.Resource(namespace=NS, type="deployment", name="web")
    assert views.grafana_workload_url("http://grafana.test:3000/", me) == (
        "http://grafana.test:3000/d/nodemesh-workload/nodemesh-workload?"
        "var-namespace=emojivoto&var-kind=deployment&var-workload=web")
    assert views.grafana_workload_url("", me) is None

    async def test(base: str, get: Client) -> None:
        status, body = await get("/api/grafana")
        assert status == 200 and body == {"url": None, "workload_dashboard_uid": "nodemesh-workload"}
    serve(controller, test)

    # A configured base URL (add_routes' argument, else the controller config's grafana_url).
    async def main() -> None:
        app = web.Application()
        add_routes(app, controller, grafana_url="http://grafana.test:3000")
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(server.make_url("/api/grafana")) as r:
                    assert (await r.json())["url"] == "http://grafana.test:3000"
                async with http.get(server.make_url("/api/workload"), params={
                        "namespace": NS, "type": "deploy", "name": "web"}) as r:
                    url = (await r.json())["grafana_url"]
                    assert url.startswith("http://grafana.test:3000/d/nodemesh-workload/")
                    assert "var-workload=web" in url
        finally:
            await server.close()
    asyncio.run(main())


def test_dashboard_grafana_uid_matches_manifests() -> None:
    """The link's uid and `var-*` names are those of manifests/grafana/nodemesh-workload.json."""
    board = json.loads((REPO / "manifests" / "grafana" / "nodemesh-workload.json").read_text())
    assert board["uid"] == views.GRAFANA_WORKLOAD_UID
    names = {v["name"] for v in board["templating"]["list"]}
    assert set(views.GRAFANA_WORKLOAD_VARS) <= names
    # The `kind` variable takes the agents' dst_kind label values: canonical types (deployment).
    kind = next(v for v in board["templating"]["list"] if v["name"] == "kind")
    assert "dst_kind" in json.dumps(kind)


def test_dashboard_namespaces_and_index(controller: Controller) -> None:
    async def test(base: str, get: Client) -> None:
        status, body = await get("/api/namespaces")
        assert status == 200
        assert {"name": "emojivoto", "captured": True} in body["namespaces"]
        assert {"name": "kube-system", "captured": False} in body["namespaces"]
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/") as r:
                html = await r.text()
                assert r.status == 200 and '<script type="module" src="/static/app.js">' in html
                assert "script-src 'self'" in r.headers["Content-Security-Policy"]
                assert "http" not in html.replace("http://www.w3.org", "")  # nothing from the internet
            for asset in ("app.js", "lib.js", "overview.js", "workload.js", "tap.js", "charts.js", "style.css"):
                async with http.get(f"{base}/static/{asset}") as r:
                    body_text = await r.text()
                    assert r.status == 200, asset
                    assert "javascript" in r.content_type or asset.endswith(".css")
                    assert "innerHTML" not in body_text and "insertAdjacentHTML" not in body_text
                    assert "https://" not in body_text  # no CDN
            async with http.get(base + "/api/nope") as r:
                assert r.status == 404
    serve(controller, test)


# ------------------------------------------------------------------------------------ streams
async def read_sse(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Any]]:
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            name, data = "message", None
            for line in block.decode().split("\n"):
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data = json.loads(line[5:])
            if data is not None:
                yield name, data


def test_dashboard_stream_pushes_stat_rows(controller: Controller) -> None:
    async def test(base: str, get: Client) -> None:
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/api/stream", params={"namespace": NS, "interval": "1"}) as r:
                assert r.status == 200 and r.content_type == "text/event-stream"
                events = read_sse(r)
                name, first = await anext(events)
                assert name == "stat" and {row["kind"] for row in first["rows"]} == {
                    "deployment", "statefulset", "daemonset", "job"}
                _, body = await get("/api/stat", type="deploy,sts,ds,job", namespace=NS)
                assert first["rows"] == body["rows"]
                t0 = time.monotonic()
                name, second = await anext(events)
                assert name == "stat" and 0.5 < time.monotonic() - t0 < 3
                assert second["time_ms"] > first["time_ms"]
            async with http.get(base + "/api/stream", params={"window": "2h"}) as r:
                assert r.status == 400 and "too long" in (await r.json())["error"]
    serve(controller, test)


def test_dashboard_tap_streams_and_closes(controller: Controller) -> None:
    session = controller.sessions["agent-1"]

    def opened() -> list[str]:
        out = []
        while not session.outbox.empty():
            msg = session.outbox.get_nowait()
            if isinstance(msg, pb.ControllerMessage) and msg.WhichOneof("msg") in ("tap_open", "tap_close"):
                out.append(msg.WhichOneof("msg") + ":" + getattr(msg, msg.WhichOneof("msg")).tap_id)
        return out

    async def test(base: str, get: Client) -> None:
        opened()
        async with aiohttp.ClientSession() as http:
            for params, message in (({"namespace": NS, "type": "deploy", "name": "nope"}, "not found"),
                                    ({"namespace": NS, "type": "deploy", "name": "web", "path": "x"},
                                     "a path prefix starts with '/'"),
                                    ({"namespace": NS, "type": "deploy", "name": "web", "max_rps": "0"},
                                     "max_rps must be positive"),
                                    ({"namespace": NS, "type": "all"}, "tap does not accept 'all'"),
                                    ({"namespace": NS, "type": "deploy", "name": "web", "to": "deploy/nope"},
                                     'deployment "nope" not found')):
                async with http.get(base + "/api/tap", params=params) as r:
                    assert r.status in (400, 404) and message in (await r.json())["error"]
            assert controller._taps == {}
            params = {"namespace": NS, "type": "deploy", "name": "web", "method": "get", "path": "/api",
                      "max_rps": "1000"}
            async with http.get(base + "/api/tap", params=params) as r:
                assert r.status == 200
                events = read_sse(r)
                name, info = await anext(events)
                # The browser's rate is capped by the controller's limit (50 in this config).
                assert name == "open" and info["max_rps"] == 50
                (tap,) = controller._taps.values()
                assert tap.filter.method == "GET" and tap.filter.path_prefix == "/api"
                assert opened() == [f"tap_open:{tap.tap_id}"]  # web runs on node-1 only
                evil = "/api/<script>window.__x=1</script>"
                for which, body in (("request_init", pb.RequestInit(method="GET", path=evil, authority="web-svc")),
                                    ("response_init", pb.ResponseInit(http_status=503, since_request_init_us=900)),
                                    ("response_end", pb.ResponseEnd(has_grpc_status=True, grpc_status=14,
                                                                    since_request_init_us=1000))):
                    ev = pb.TapEvent(tap_id=tap.tap_id, request_id="7:1", direction="inbound", node="node-1",
                                     source=pb.Peer(ip="10.244.1.9", port=4000, namespace=NS, pod=PODS["vote-bot"],
                                                    owner=pb.Resource(type="deployment", name="vote-bot")))
                    getattr(ev, which).CopyFrom(body)
                    controller.agent_message(session, pb.AgentMessage(tap_event=ev))
                got = [await anext(events) for _ in range(3)]
                assert [n for n, _ in got] == ["tap"] * 3
                req, rsp, end = (d for _, d in got)
                assert req["path"] == evil and req["id"] == "node-1/7:1" and req["source"]["owner"] == "deploy/vote-bot"
                assert rsp["http_status"] == 503 and rsp["latency_us"] == 900
                assert end["grpc_status"] == 14 and end["duration_us"] == 1000
            # The browser went away: the tap closes on the agent within a heartbeat or two.
            deadline = time.monotonic() + 5
            while controller._taps and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert controller._taps == {}
            assert opened() == [f"tap_close:{tap.tap_id}"]
    serve(controller, test)


def test_dashboard_row_json_equals_cli_render() -> None:
    """One JSON form of a stat row (api/rows.py) for `stat -o json` and the dashboard: null where the
    row saw no traffic of that kind, TCP columns on their own for opaque TCP."""
    rows = [
        pb.StatRow(resource=pb.Resource(namespace=NS, type="deployment", name="a"), meshed_pods=1, total_pods=2),
        pb.StatRow(resource=pb.Resource(namespace=NS, type="pod", name="b"), has_traffic=True, success_count=3,
                   failure_count=1, rps=0.0666666667, latency_ms_p50=1.5, latency_ms_p95=9.75, latency_ms_p99=10,
                   tcp_open_connections=2, tcp_read_bytes_rate=12.5),
        pb.StatRow(resource=pb.Resource(namespace=NS, type="service", name="c"), has_tcp=True,
                   tcp_open_connections=4, tcp_write_bytes_rate=1 / 3),
    ]
    assert views.stat_row_json is cli_stat_row_json  # one definition, not two held equal
    a, b, c = (views.stat_row_json(r) for r in rows)
    assert a["success"] is None and a["rps"] is None and a["tcp_open_connections"] is None and a["totalPods"] == 2
    assert b["success"] == 0.75 and b["rps"] == 0.066667 and b["latency_ms_p99"] == 10 and b["kind"] == "pod"
    assert c["success"] is None and c["tcp_open_connections"] == 4 and c["tcp_write_bytes_rate"] == 0.333333


def test_dashboard_series_spreads_downsampled_blocks_over_their_steps(controller: Controller) -> None:
    """Past the horizons the memory holds one block per minute, then per 5 minutes: each step a
    block covers shows its rate (not one step holding 5 minutes' traffic and gaps around), and
    the hour's responses still add up to the hour's stat."""
    now = controller.test_fed_at + 0.5   # type: ignore[attr-defined]
    controller.aggregator.prune(now=now)           # 40 min ago: a 5-minute block; 5 min ago: a minute
    agg = controller.aggregator
    assert agg.block_width(int(now) - 2400) == 300 and agg.block_width(int(now) - 300) == 60
    assert agg.block_width(int(now) - 5) == 1
    me = pb.Resource(namespace=NS, type="deployment", name="web")
    for step in (60, 10):
        points = views.time_series(controller, me, step, now=now)["points"]
        busy = [p for p in points if p["rps"] is not None]
        assert sum(p["rps"] * step for p in busy) == pytest.approx(120), step
        old = [p for p in busy if p["t"] <= int(now) - 1200]
        assert len(old) == 300 // step and len({p["rps"] for p in old}) == 1   # the block's rate, spread
        assert old[0]["rps"] == pytest.approx(12 / 300)   # the first report: 12 responses
