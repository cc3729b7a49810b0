"""The Prometheus store's pure parts (PromQL asked, replies turned into Totals) and the controller's
backend choice and errors. The equality with the in-memory store on real traffic, with the real
Prometheus server, is tests/integration/stat/test_stat_prometheus.py."""

from __future__ import annotations

import asyncio
import math
import time

import promql_parser
import pytest
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import PEER_LABELS
from nodemesh.controlplane import promstore
from nodemesh.controlplane.aggregate import BOUNDS, N_LATENCY
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.controller import Controller

LABELS = {name: "" for name in PEER_LABELS} | {
    "direction": "inbound", "dst_namespace": "ns", "dst_kind": "deployment", "dst_name": "web"}
KEY = tuple(LABELS[name] for name in PEER_LABELS)


def test_promstore_queries_sum_by_every_label_over_the_window() -> None:
    q = promstore.queries(promstore.PEER, 60)
    by = ", ".join(PEER_LABELS)
    assert q["requests"].startswith(f"sum by ({by}) (increase(request_total[60s])) + ")
    # a series born in the window adds its first value (increase() starts at the first sample)
    assert "(min_over_time(request_total[60s]) unless request_total offset 60s)" in q["requests"]
    assert f"sum by ({by}, classification) (increase(response_total[60s]))" in q["responses"]
    assert f"sum by ({by}, le) (increase(response_latency_ms_bucket[60s]))" in q["latency"]
    assert q["open_connections"] == f"sum by ({by}) (last_over_time(tcp_open_connections[60s]))"
    assert set(q) >= {"tcp_open", "tcp_close", "read_bytes", "write_bytes", "latency_sum"}
    route = promstore.queries(promstore.ROUTE, 10)
    assert "route_response_latency_ms_bucket[10s]" in route["latency"] and "open_connections" not in route
    for expr in (*q.values(), *route.values()):
        promql_parser.parse(expr)  # the real grammar (Prometheus' own parser, ported)


def test_promstore_totals_from_replies() -> None:
    def cum(le: str, v: float) -> tuple[dict[str, str], float]:
        return ({**LABELS, "le": le}, v)

    answers = {
        "requests": [(LABELS, 100.0)],
        "responses": [({**LABELS, "classification": "success"}, 80.0),
                      ({**LABELS, "classification": "failure"}, 20.0)],
        # cumulative, as Prometheus keeps histograms: 10 at <=1 ms, 90 more at <=10 ms, 0 beyond
        "latency": [cum("1", 10.0), cum("2", 10.0), cum("5", 10.0), cum("10", 100.0), cum("+Inf", 100.0)],
        "latency_sum": [(LABELS, 700.0)],
        "read_bytes": [(LABELS, 5000.0)],
        "open_connections": [(LABELS, 3.0)],
    }
    by_key = promstore.totals_from(promstore.PEER, 60, answers)
    tot = by_key[KEY]
    assert (tot.requests, tot.success, tot.failure, tot.read_bytes) == (100, 80, 20, 5000)
    assert tot.open_connections == 3 and tot.has_gauge
    assert len(tot.latency) == N_LATENCY and sum(tot.latency) == 100
    assert tot.latency[BOUNDS.index(1)] == 10 and tot.latency[BOUNDS.index(10)] == 90
    assert 1 < tot.quantile(0.5) <= 10


def test_promstore_series_that_did_not_move_are_left_out_as_memory_has_no_bucket_for_them() -> None:
    other = {**LABELS, "dst_name": "idle"}
    by_key = promstore.totals_from(promstore.PEER, 60, {
        "requests": [(LABELS, 1.0), (other, 0.0)], "open_connections": [(other, 0.0)]})
    assert list(by_key) == [KEY]


def test_promstore_per_bucket_handles_missing_bounds_and_extrapolation_noise() -> None:
    counts = promstore.per_bucket([(1.0, 2.0), (10.0, 5.0), (math.inf, 6.0)])
    assert counts[BOUNDS.index(1)] == 2 and counts[BOUNDS.index(2)] == 0
    assert counts[BOUNDS.index(10)] == 3 and counts[-1] == 1
    # increase() extrapolates each bucket on its own: a higher bucket may come out a hair lower.
    assert min(promstore.per_bucket([(1.0, 5.0), (2.0, 4.9), (math.inf, 5.0)])) >= 0


def test_promstore_parse_vector_rejects_what_is_not_an_instant_vector() -> None:
    ok = {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"a": "1"}, "value": [1.0, "2.5"]}, {"metric": {}, "value": [1.0, "NaN"]}]}}
    assert promstore.parse_vector(ok) == [({"a": "1"}, 2.5)]
    with pytest.raises(promstore.PrometheusError, match="bad_data: parse error"):
        promstore.parse_vector({"status": "error", "errorType": "bad_data", "error": "parse error"})
    with pytest.raises(promstore.PrometheusError, match="expected a vector"):
        promstore.parse_vector({"status": "success", "data": {"resultType": "matrix", "result": []}})


def _stat(controller: Controller, backend: str, window_s: int = 0) -> pb.StatResponse:
    req = pb.StatRequest(selector=pb.Resource(type="deployment"), all_namespaces=True, backend=backend,
                         window_seconds=window_s)

    async def ask() -> pb.StatResponse:
        try:
            return await controller.answer_stat(req)
        finally:
            await controller.stop()

    return asyncio.run(ask())


def test_controller_backend_choice_and_errors() -> None:
    memory = Controller(ControllerConfig())
    assert not _stat(memory, "").error and not _stat(memory, "memory").error
    assert "unknown backend 'mongo'" in _stat(memory, "mongo").error
    assert "--prometheus-url" in _stat(memory, "prometheus").error
    # A Prometheus nobody listens on: one line naming it, at once (a refused connect).
    down = Controller(ControllerConfig(prometheus_url="http://127.0.0.1:9", prometheus_timeout_s=5))
    t0 = time.monotonic()
    err = _stat(down, "prometheus").error
    assert err.startswith("prometheus backend: cannot query http://127.0.0.1:9"), err
    assert time.monotonic() - t0 < 5
    # The window is checked before anything is asked.
    assert "too short" in _stat(down, "prometheus", window_s=5).error


def test_check_names_a_prometheus_that_hangs_within_a_second() -> None:
    """`nodemesh check` (and the sandbox install's health wait: Check with a 2 s deadline) must not
    wait out the backend's 10 s query timeout: a Prometheus that accepts and never answers is
    reported within CHECK_BACKEND_TIMEOUT_S, the node checks still answered."""
    import socket

    from nodemesh.controlplane.controller import CHECK_BACKEND_TIMEOUT_S

    with socket.create_server(("127.0.0.1", 0)) as hung:  # accepts (backlog), never reads or answers
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        controller = Controller(ControllerConfig(prometheus_url=url, stat_backend="prometheus",
                                                 prometheus_timeout_s=10))

        async def ask() -> tuple[pb.CheckResponse, float]:
            t0 = time.monotonic()
            try:
                return await controller.answer_check(), time.monotonic() - t0
            finally:
                await controller.stop()

        resp, took = asyncio.run(ask())
    assert resp.stat_backend == "prometheus" and resp.stat_backend_url == url and not resp.stat_backend_ok
    assert resp.stat_backend_detail == f"{url} did not answer within {CHECK_BACKEND_TIMEOUT_S:g}s", resp
    assert took < CHECK_BACKEND_TIMEOUT_S + 2, took
    memory = Controller(ControllerConfig())
    assert memory.check().nodes == [] and asyncio.run(memory.answer_check()).stat_backend_ok


def test_promstore_queries_narrowed_by_matchers_parse_and_escape() -> None:
    """The dashboard's sparklines ask range queries narrowed to the workload's direction and
    namespace (or service): every metric of every query carries the matchers, escaped."""
    matchers = {"direction": "inbound", "dst_namespace": 'we"ird\\ns'}
    q = promstore.queries(promstore.PEER, 60, matchers)
    sel = '{direction="inbound",dst_namespace="we\\"ird\\\\ns"}'
    assert promstore.selector(matchers) == sel
    assert f"increase(request_total{sel}[60s])" in q["requests"]
    assert f"request_total{sel} offset 60s" in q["requests"]
    assert f"increase(response_latency_ms_bucket{sel}[60s])" in q["latency"]
    assert f"last_over_time(tcp_open_connections{sel}[60s])" in q["open_connections"]
    for expr in q.values():
        assert expr.count(sel) >= 1, expr
        promql_parser.parse(expr)
    assert promstore.selector({}) == "" and promstore.queries(promstore.PEER, 60, {}) == promstore.queries(promstore.PEER, 60)


def test_promstore_parse_matrix_one_vector_per_step() -> None:
    ok = {"status": "success", "data": {"resultType": "matrix", "result": [
        {"metric": {"a": "1"}, "values": [[1000.0, "2"], [1010.0, "3"], [1020.0, "NaN"]]},
        {"metric": {"a": "2"}, "values": [[1010.0, "4"]]}]}}
    assert promstore.parse_matrix(ok) == {1000: [({"a": "1"}, 2.0)], 1010: [({"a": "1"}, 3.0), ({"a": "2"}, 4.0)]}
    with pytest.raises(promstore.PrometheusError, match="expected a matrix"):
        promstore.parse_matrix({"status": "success", "data": {"resultType": "vector", "result": []}})
    with pytest.raises(promstore.PrometheusError, match="bad_data"):
        promstore.parse_matrix({"status": "error", "errorType": "bad_data", "error": "x"})


def test_controller_without_ingest_acknowledges_reports_keeps_nothing_and_refuses_memory(
        capsys: pytest.CaptureFixture[str]) -> None:
    """--no-ingest (a cluster past one controller's ingest, docs/scale.md): an agent's increment
    reports are acknowledged (its history is freed) and dropped; the memory backend is refused with
    one line; the flag needs the Prometheus backend."""
    from nodemesh.controlplane.main import parse_args

    base = ["--state-dir", "/nonexistent"]
    with pytest.raises(SystemExit):
        parse_args([*base, "--no-ingest"])
    assert "--no-ingest needs --stat-backend prometheus" in capsys.readouterr().err
    config = parse_args([*base, "--no-ingest", "--stat-backend", "prometheus", "--prometheus-url", "http://127.0.0.1:9"])
    assert not config.ingest
    controller = Controller(config)
    session = controller.agent_connected(pb.AgentHello(agent_id="a1", node="node1"))
    report = pb.MetricsReport(increments=True, seq=7, time_ms=int(time.time() * 1000))
    report.series.add(name="request_total", value=5, labels={n: "x" for n in PEER_LABELS})
    controller.ingest_report(session, report)
    assert len(controller.aggregator) == 0 and not list(controller.aggregator.keys())
    assert controller.ack_message("a1").report_ack.seq == 7 and session.reports == 1
    assert "this controller keeps no metrics (--no-ingest)" in _stat(controller, "memory").error
