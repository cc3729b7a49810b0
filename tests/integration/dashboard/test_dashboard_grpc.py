"""The dashboard's API against the gRPC API of the same running controller (loopback): equal
stat numbers for every type, window and --from/--to, and a tap from a fake agent connected over
real gRPC that reaches the browser's SSE stream and is closed on the agent when the page goes."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from dashboard_harness import NS, ControllerThread, tap_request
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.cli.render import stat_json
from waiting import eventually


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[ControllerThread]:
    ct = ControllerThread(tmp_path)
    try:
        ct.start()
        ct.report_traffic(4)
        yield ct
    finally:
        ct.stop()


def get(base: str, path: str, **params: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"{base}{path}?{urllib.parse.urlencode(params)}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("window", [10, 60, 3600])
def test_dashboard_stat_equals_grpc_stat_summary(controller: ControllerThread, window: int) -> None:
    web = pb.Resource(namespace=NS, type="deployment", name="web")
    cases: list[tuple[dict[str, str], pb.StatRequest]] = []
    for t in ("deploy", "po", "svc", "ds", "sts", "job", "rs", "ns", "all"):
        cases.append(({"type": t, "namespace": NS}, pb.StatRequest(selector=pb.Resource(namespace=NS, type=t))))
    cases.append(({"type": "deploy", "all_namespaces": "true"},
                  pb.StatRequest(selector=pb.Resource(type="deploy"), all_namespaces=True)))
    cases.append(({"type": "deploy", "namespace": NS, "to": "deploy/web"},
                  pb.StatRequest(selector=pb.Resource(namespace=NS, type="deploy"), to=web)))
    cases.append(({"type": "deploy", "namespace": NS, "from": "deploy/web"},
                  pb.StatRequest(**{"selector": pb.Resource(namespace=NS, type="deploy"), "from": web})))
    with grpc.insecure_channel(controller.grpc_address) as ch:
        stub = pb_grpc.ControllerStub(ch)
        for params, req in cases:
            req.window_seconds = window
            resp = stub.StatSummary(req, timeout=10)
            assert resp.error == ""
            status, body = get(controller.base_url, "/api/stat", window=f"{window}s", **params)
            assert status == 200, body
            # Exactly what `nodemesh stat ... -o json` prints for the same question.
            assert body["rows"] == json.loads(stat_json(resp.rows)), params
    assert any(r["rps"] for r in body["rows"])  # the comparison was over real numbers


def test_dashboard_tap_over_grpc_agent_and_close(controller: ControllerThread) -> None:
    agent = controller.agents["node-1"]
    url = f"{controller.base_url}/api/tap?" + urllib.parse.urlencode(
        {"namespace": NS, "type": "deploy", "name": "web", "authority": "web-svc.emojivoto:8080"})

    async def browse() -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        async with aiohttp.ClientSession() as http, http.get(url) as r:
            assert r.status == 200
            buf = b""
            async for chunk in r.content.iter_any():
                buf += chunk
                while b"\n\n" in buf:
                    block, buf = buf.split(b"\n\n", 1)
                    lines = block.decode().split("\n")
                    if lines[0] == "event: open":
                        await eventually(lambda: bool(agent.open_taps()))
                        (tap_id,) = agent.open_taps()
                        for m in tap_request(tap_id, "3:1", "/api/list") + tap_request(tap_id, "3:2", "/x", 503):
                            agent.send(m)
                    elif lines[0] == "event: tap":
                        got.append(json.loads(lines[1][5:]))
                if len(got) == 6:
                    return got  # leaving the `async with` closes the connection, as a closed tab
        return got

    events = controller.call(browse())
    assert [e["event"] for e in events] == ["request_init", "response_init", "response_end"] * 2
    assert events[0]["path"] == "/api/list" and events[4]["http_status"] == 503
    (opened,) = agent.of("tap_open")
    assert opened.filter.authority == "web-svc.emojivoto:8080" and opened.filter.max_rps == 100
    controller.call(eventually(lambda: [c.tap_id for c in agent.of("tap_close")] == [opened.tap_id], 10))
    assert controller.run(lambda: controller.running.controller._taps) == {}  # type: ignore[union-attr]
    assert controller.agents["node-2"].of("tap_open") == []  # web runs on node-1 only
