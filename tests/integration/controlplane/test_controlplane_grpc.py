"""The controller over loopback with real grpc.aio: fake agents (real gRPC clients) connect,
receive identity built by the SandboxSource from an objects.json, report cumulative metrics;
StatSummary, Tap and Check answer through a real channel; a controller restart does not double
count."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from controller_feed import NS, FakeAgent
from controller_link import (
    EMOJI_POD,
    TESTDATA,
    config_for,
    report,
    reports_from,
    run,
    write_cluster,
)
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.controlplane.main import RunningController, start
from waiting import eventually


async def stat_emoji(port: int, **extra: Any) -> pb.StatResponse:
    # Stats count complete seconds only: let the second of the last report end first.
    await asyncio.sleep(1.0 - time.time() % 1.0 + 0.01)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        req = pb.StatRequest(selector=pb.Resource(namespace=NS, type="deploy", name="emoji"), window_seconds=60,
                             **extra)
        return await pb_grpc.ControllerStub(ch).StatSummary(req)


def test_identity_push_stat_and_web(state_dir: Path) -> None:
    async def main() -> None:
        running = await start(config_for(state_dir))
        agent = None
        try:
            agent = FakeAgent(running.grpc_port, "agent-1", "node-1", int(time.time() * 1000))
            await eventually(lambda: len(agent.of("identity")) >= 1)
            snap = agent.of("identity")[-1]
            assert {p.name for p in snap.pods} >= {"web-5f7c9d8b6-x2vqm", EMOJI_POD, "db-0"}
            assert "emojivoto" in snap.captured_namespaces and "legacy" not in snap.captured_namespaces
            assert {s.name for s in snap.services} == {"web-svc", "emoji-svc", "voting-svc"}

            # The sandbox adds a pod: the agent gets a delta with it (not the whole cluster again).
            items = json.loads(TESTDATA.read_text())["items"]
            extra = copy.deepcopy(next(o for o in items if o["metadata"]["name"] == "debug"))
            extra["metadata"]["name"] = "debug-2"
            extra["metadata"]["uid"] = "uid-debug-2"
            extra["status"]["podIP"] = "10.244.2.50"
            extra["status"]["podIPs"] = [{"ip": "10.244.2.50"}]
            write_cluster(state_dir, [*items, extra], 2)
            await eventually(lambda: any(p.name == "debug-2" for d in agent.of("identity_delta") for p in d.pods))
            delta = agent.of("identity_delta")[-1]
            assert [p.name for p in delta.pods] == ["debug-2"] and not delta.removed_pods
            assert (delta.epoch, delta.base_version) == (snap.epoch, snap.version)

            agent.send(report("agent-1", 1, 30, 10))
            agent.send(report("agent-1", 2, 60, 20))
            await eventually(lambda: reports_from(running, "agent-1") == 2)
            resp = await stat_emoji(running.grpc_port)
            assert resp.error == ""
            (row,) = resp.rows
            assert (row.success_count, row.failure_count) == (60, 20)
            assert row.rps == pytest.approx(80 / 60)
            assert (row.meshed_pods, row.total_pods) == (1, 2)  # only node-1 has an agent

            bad = await stat_emoji(running.grpc_port, label_selector="((")
            assert "invalid label selector" in bad.error

            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as ch:
                check = await pb_grpc.ControllerStub(ch).Check(pb.CheckRequest())
            nodes = {n.node: n for n in check.nodes}
            assert nodes["node-1"].agent_connected and nodes["node-1"].capture_installed
            assert not nodes["node-2"].agent_connected
            assert abs(nodes["node-1"].clock_skew_ms) < 5000

            async with aiohttp.ClientSession() as http:
                base = f"http://127.0.0.1:{running.web_port}"
                async with http.get(base + "/metrics") as r:
                    text = await r.text()
                    assert r.status == 200
                    assert "nodemesh_controller_connected_agents 1.0" in text
                    assert "nodemesh_controller_reports_received_total 2.0" in text
                    assert "nodemesh_controller_stat_request_seconds_count" in text
                async with http.get(base + "/ready") as r:
                    assert r.status == 200
                async with http.get(base + "/live") as r:
                    assert r.status == 200
        finally:
            if agent is not None:
                await agent.close()
            await running.stop()
    run(main)


def tap_event(tap_id: str, request_id: str, which: str) -> pb.AgentMessage:
    ev = pb.TapEvent(tap_id=tap_id, request_id=request_id, direction="inbound", node="node-2",
                     time_ms=int(time.time() * 1000))
    if which == "req":
        ev.request_init.CopyFrom(pb.RequestInit(method="GET", scheme="http", authority="voting-svc", path="/vote"))
    elif which == "rsp":
        ev.response_init.CopyFrom(pb.ResponseInit(http_status=200, since_request_init_us=1500))
    else:
        ev.response_end.CopyFrom(pb.ResponseEnd(has_grpc_status=True, grpc_status=0, since_request_init_us=1800))
    return pb.AgentMessage(tap_event=ev)


def test_tap_fans_out_only_to_matching_agents_and_closes_on_cancel(state_dir: Path) -> None:
    async def main() -> None:
        running = await start(config_for(state_dir))
        agents: list[FakeAgent] = []
        try:
            now_ms = int(time.time() * 1000)
            a1 = FakeAgent(running.grpc_port, "agent-1", "node-1", now_ms)
            a2 = FakeAgent(running.grpc_port, "agent-2", "node-2", now_ms)
            agents += [a1, a2]
            await eventually(lambda: len(running.controller.sessions) == 2)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as ch:
                stub = pb_grpc.ControllerStub(ch)
                # voting's only pod runs on node-2: only agent-2 may be asked to tap.
                flt = pb.TapFilter(target=pb.Resource(namespace=NS, type="deploy", name="voting"), max_rps=5)
                call = stub.Tap(pb.TapRequest(filter=flt))
                await eventually(lambda: len(a2.of("tap_open")) == 1)
                tap_id = a2.of("tap_open")[0].tap_id
                assert a2.of("tap_open")[0].filter.target.name == "voting"
                for i in range(3):
                    for which in ("req", "rsp", "end"):
                        a2.send(tap_event(tap_id, f"1:{i}", which))
                got = [await call.read() for _ in range(9)]
                assert [e.WhichOneof("event") for e in got[:3]] == ["request_init", "response_init", "response_end"]
                assert got[2].response_end.grpc_status == 0 and got[1].response_init.http_status == 200
                # A burst beyond max_rps across the merged stream is cut to the rate.
                for i in range(40):
                    a2.send(tap_event(tap_id, f"2:{i}", "req"))
                await asyncio.sleep(0.5)
                call.cancel()
                await eventually(lambda: len(a2.of("tap_close")) == 1)
                assert a2.of("tap_close")[0].tap_id == tap_id
                assert a1.of("tap_open") == [] and a1.of("tap_close") == []
                tap_sessions = running.controller._taps
                assert tap_sessions == {}
                # An unknown target is a clean INVALID_ARGUMENT.
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    bad = stub.Tap(pb.TapRequest(filter=pb.TapFilter(
                        target=pb.Resource(namespace=NS, type="deploy", name="nope"))))
                    await bad.read()
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert 'deployment "nope" not found' in err.value.details()
            # 3 requests were admitted at first, then at most a second's worth of the burst.
            assert running.controller.metrics.tap_events._value.get() <= 9 + 6
        finally:
            for a in agents:
                await a.close()
            await running.stop()
    run(main)


def test_controller_restart_does_not_double_count(state_dir: Path) -> None:
    async def main() -> None:
        running: RunningController | None = await start(config_for(state_dir))
        port = running.grpc_port
        # The agent process starts after this first controller: its first report is all new.
        agent_started = running.controller.started_ms + 1
        agent = FakeAgent(port, "agent-1", "node-1", agent_started)
        try:
            agent.send(report("agent-1", 1, 100))
            agent.send(report("agent-1", 2, 200))
            await eventually(lambda: reports_from(running, "agent-1") == 2)
            assert (await stat_emoji(port)).rows[0].success_count == 200
            await agent.close()
            await running.stop()
            running = None
            await asyncio.sleep(0.2)  # the controller is down; the agent keeps counting: 200 -> 300
            running = await start(config_for(state_dir, grpc_port=port))
            # The same agent process reconnects: its first report to the new controller (300)
            # includes counts the old controller already had, so it is only a baseline.
            agent = FakeAgent(port, "agent-1", "node-1", agent_started)
            agent.send(report("agent-1", 3, 300))
            agent.send(report("agent-1", 4, 350))
            await eventually(lambda: reports_from(running, "agent-1") == 2)
            assert (await stat_emoji(port)).rows[0].success_count == 50
            # An agent restarted after the controller: a new agent_id whose counters began at 0
            # while this controller listened, so its first report is all new.
            await agent.close()
            agent = FakeAgent(port, "agent-1b", "node-1", int(time.time() * 1000) + 1)
            agent.send(report("agent-1b", 1, 25))
            await eventually(lambda: reports_from(running, "agent-1b") == 1)
            assert (await stat_emoji(port)).rows[0].success_count == 75
        finally:
            await agent.close()
            if running is not None:
                await running.stop()
    run(main)
