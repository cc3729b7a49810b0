"""Regression tests found in review: numbers a user would trust wrongly, and robustness."""

from __future__ import annotations

import contextlib
import time

# The synthetic cluster and its reports (the `controller` fixture: conftest.py).
from controller_feed import NS, peer, series_for
from controller_testkit import stat
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.controlplane.controller import Controller


def _idle_reports(c: Controller, now: float, seconds: int) -> None:
    """node-1's agent keeps reporting the same cumulative counters, every connection closed (the
    agent keeps the gauge series at 0 forever), once a second from `now`."""
    session = c.sessions["agent-1"]
    series = []
    for direction in ("outbound", "inbound"):
        series += series_for(peer(direction, "web", "emoji", "emoji-svc"), 540, 60, 20.0)
        series += series_for(peer(direction, "vote-bot", "web", "web-svc"), 120, 0, 5.0)
    series += series_for(peer("outbound", "web", "voting", "voting-svc"), 300, 0, 100.0)
    for s in series:
        if s.name == "tcp_open_connections":
            s.value = 0
    for i in range(seconds):
        c.ingest_report(session, pb.MetricsReport(agent_id="agent-1", seq=2 + i, series=series), now=now + i)


def test_closed_connections_do_not_keep_old_edges_and_peers_alive(controller: Controller) -> None:
    # Traffic happened ~5 s ago; then two idle minutes. A zero open-connection gauge is not traffic.
    now = time.time()
    _idle_reports(controller, now, 120)
    later = now + 121
    resp = controller.edges(pb.EdgesRequest(selector=pb.Resource(namespace=NS, type="deploy"), window_seconds=60),
                            now=later)
    assert resp.error == "" and list(resp.edges) == []
    req = pb.StatRequest(selector=pb.Resource(namespace=NS, type="deploy"), window_seconds=60)
    getattr(req, "from").CopyFrom(pb.Resource(namespace=NS, type="deploy", name="web"))
    assert list(controller.stat(req, now=later).rows) == []


def _stream_survives(c: Controller, bad: list[pb.Series], bounds: list[float] | None = None) -> None:
    """A malformed series in a report is skipped; the rest of the report still counts, and nothing
    poisons the aggregates (NaN, negative counts) for the next hour."""
    session = c.sessions["agent-2"]
    good = series_for(peer("inbound", "web", "voting", "voting-svc"), 600, 0, 100.0)  # +300 since seq 1
    if bounds:  # the agent's own bounds: its histogram has len(bounds) + 1 buckets, 300 more at 100 ms
        good = [g for g in good if g.name != "response_latency_ms"]
        good.append(pb.Series(name="response_latency_ms", labels=_labels(),
                              bucket_counts=[300 if b == 100.0 else 0 for b in (*bounds, 0)]))
    report = pb.MetricsReport(agent_id="agent-2", seq=2, series=[*bad, *good], latency_bounds_ms=bounds or [])
    c.ingest_report(session, report, now=time.time() - 4)
    r = {row.resource.name: row for row in stat(c, "deploy").rows}
    assert r["voting"].success_count == 600
    assert r["voting"].rps == r["voting"].rps and r["voting"].rps == 10.0  # not NaN
    assert 50 < r["voting"].latency_ms_p95 <= 100


def _labels() -> dict[str, str]:
    return peer("inbound", "web", "voting", "voting-svc")


def test_report_with_an_oversized_histogram_is_skipped_not_fatal(controller: Controller) -> None:
    _stream_survives(controller, [pb.Series(name="response_latency_ms", labels=_labels(), bucket_counts=[1] * 40)])


def test_report_with_histogram_longer_than_its_bounds_is_skipped(controller: Controller) -> None:
    _stream_survives(controller, [pb.Series(name="response_latency_ms", labels={**_labels(), "authority": "x"},
                                            bucket_counts=[1] * 10)], bounds=[1.0, 5.0, 10.0, 100.0])


def test_report_with_nan_or_negative_counters_is_skipped(controller: Controller) -> None:
    bad = [pb.Series(name="response_total", labels={**_labels(), "authority": "nan", "classification": "success"},
                     value=float("nan")),
           pb.Series(name="response_total", labels={**_labels(), "authority": "neg", "classification": "success"},
                     value=-5.0),
           pb.Series(name="response_total", labels={**_labels(), "authority": "inf", "classification": "success"},
                     value=float("inf"))]
    _stream_survives(controller, bad)


def test_tap_request_dropped_on_a_full_queue_drops_its_responses_too() -> None:
    from nodemesh.controlplane import tap as tapmod

    session = tapmod.TapSession(pb.TapFilter(), max_rps=0)  # no rate limit: only the queue refuses
    for i in range(tapmod.QUEUE_SIZE):
        assert session.offer("a", pb.TapEvent(request_id=f"r{i}", request_init=pb.RequestInit()))
    late = pb.TapEvent(request_id="late", request_init=pb.RequestInit())
    assert not session.offer("a", late)            # the reader is slow: the queue is full
    session.queue.get_nowait()                     # ... then catches up a little
    # The request was never shown: its response must not show up alone.
    assert not session.offer("a", pb.TapEvent(request_id="late", response_end=pb.ResponseEnd()))


def test_identity_is_pushed_only_when_what_agents_get_changes() -> None:
    # Deployments, Nodes and Pods get status writes all the time (observedGeneration, heartbeats,
    # probe times) that change nothing an agent is told: those must not cost a push to every agent.
    import asyncio
    import copy
    import json
    from pathlib import Path

    from nodemesh.controlplane.config import ControllerConfig
    from nodemesh.controlplane.registry import WATCHED_KINDS, WorkloadRegistry

    objects = json.loads((Path(__file__).parent / "testdata" / "cluster.json").read_text())["items"]

    async def main() -> None:
        reg = WorkloadRegistry()
        for kind in WATCHED_KINDS:
            reg.replace(kind, [copy.deepcopy(o) for o in objects if o["kind"] == kind])
        c = Controller(ControllerConfig(identity_debounce_s=0.01), registry=reg)
        hang = asyncio.Event()

        async def agent_messages():  # the agent's side: a hello, then it just stays connected
            yield pb.AgentMessage(hello=pb.AgentHello(agent_id="a", node="node-1", start_time_ms=c.started_ms))
            await hang.wait()

        stream = c.serve_agent(agent_messages())
        received: list[pb.ControllerMessage] = []
        acks: list[pb.ReportAck] = []

        async def pump() -> None:
            async for msg in stream:
                if msg.HasField("report_ack"):  # the stream opens with one (agent/history.py)
                    acks.append(msg.report_ack)
                else:
                    received.append(msg)

        task = asyncio.create_task(pump())
        try:
            await asyncio.sleep(0.05)
            assert [a.seq for a in acks] == [0]
            assert len(received) == 1 and received[0].HasField("identity")
            deploy = copy.deepcopy(next(o for o in objects if o["kind"] == "Deployment"))
            deploy["status"] = {"observedGeneration": 7, "replicas": 1}
            deploy["metadata"]["resourceVersion"] = "999"
            reg.apply("MODIFIED", deploy)
            await asyncio.sleep(0.1)
            assert len(received) == 1
            pod = copy.deepcopy(next(o for o in objects if o["kind"] == "Pod" and o["metadata"]["name"] == "debug"))
            pod["metadata"]["labels"] = {"new": "label"}
            reg.apply("MODIFIED", pod)
            await asyncio.sleep(0.1)
            assert len(received) == 2
            # What changed, not the whole cluster again: one pod, applying on top of the first.
            delta = received[1].identity_delta
            assert [p.name for p in delta.pods] == ["debug"] and delta.pods[0].labels == {"new": "label"}
            assert (delta.epoch, delta.base_version) == (received[0].identity.epoch, received[0].identity.version)
            assert not delta.services and not delta.removed_pods and not delta.HasField("config")
        finally:
            task.cancel()
            hang.set()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await stream.aclose()

    asyncio.run(main())


def _big_cluster(n_deploy: int = 200, pods_per: int = 10, peers: int = 5) -> Controller:
    from nodemesh.controlplane.aggregate import series_key
    from nodemesh.controlplane.config import ControllerConfig
    from nodemesh.controlplane.registry import WorkloadRegistry

    reg = WorkloadRegistry()
    deploys, rsets, pods = [], [], []
    for d in range(n_deploy):
        deploys.append({"kind": "Deployment", "metadata": {"namespace": "big", "name": f"d{d}"}})
        rsets.append({"kind": "ReplicaSet", "metadata": {"namespace": "big", "name": f"d{d}-abc", "ownerReferences": [
            {"kind": "Deployment", "name": f"d{d}", "controller": True}]}})
        for p in range(pods_per):
            pods.append({"kind": "Pod", "metadata": {"namespace": "big", "name": f"d{d}-abc-{p}", "ownerReferences": [
                {"kind": "ReplicaSet", "name": f"d{d}-abc", "controller": True}]},
                "spec": {"nodeName": "n1"}, "status": {"phase": "Running", "podIP": f"10.1.{d}.{p}"}})
    reg.replace("Namespace", [{"kind": "Namespace", "metadata": {"name": "big"}}])
    reg.replace("Deployment", deploys)
    reg.replace("ReplicaSet", rsets)
    reg.replace("Pod", pods)
    c = Controller(ControllerConfig(), registry=reg)
    t = time.time() - 5
    for d in range(n_deploy):
        for p in range(pods_per):
            for i in range(1, peers + 1):
                e = (d + i) % n_deploy
                key = series_key({"direction": "inbound", "src_namespace": "big", "src_kind": "deployment",
                                  "src_name": f"d{d}", "src_pod": f"d{d}-abc-{p}", "dst_namespace": "big",
                                  "dst_kind": "deployment", "dst_name": f"d{e}", "dst_pod": f"d{e}-abc-{p}",
                                  "protocol": "http1"})
                c.aggregator.record(key, t=t, success=6)
    return c


def test_stat_over_many_pods_and_series_is_one_pass_not_one_per_row() -> None:
    # 2000 pods, 10k series: `stat po` scanned every series once per pod (3.5 s on the controller's
    # only event loop, where agent reports and taps wait), `stat deploy` every pod per deployment.
    c = _big_cluster()
    for type_, n_rows in (("po", 2000), ("deploy", 200)):
        started = time.perf_counter()
        resp = c.stat(pb.StatRequest(selector=pb.Resource(namespace="big", type=type_), window_seconds=60))
        elapsed = time.perf_counter() - started
        assert resp.error == "" and len(resp.rows) == n_rows
        assert elapsed < 1.5, f"stat {type_} took {elapsed:.2f}s"
        # every pod is called by 5 peers x 6 requests; each deployment's 10 pods by 5 x 10 x 6
        per_row = 30 if type_ == "po" else 300
        assert all(r.success_count == per_row and r.total_pods == (1 if type_ == "po" else 10) for r in resp.rows)
