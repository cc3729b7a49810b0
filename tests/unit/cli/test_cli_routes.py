"""`nodemesh routes` end to end through click against a real grpc server; outputs pinned by goldens."""

from __future__ import annotations

import json

from cli_testkit import Served, assert_golden
from nodemesh.api.gen import nodemesh_pb2 as pb

VOTE = "/emojivoto.v1.VotingService/"


def row(route: str, service: str = "voting-svc", *, ok: int = 0, fail: int = 0, rps: float = 0.0,
        p50: float = 0, p95: float = 0, p99: float = 0, dst: str = "voting") -> pb.RouteRow:
    traffic = bool(ok or fail)
    return pb.RouteRow(route=route, service=service,
                       destination=pb.Resource(namespace="emojivoto", type="deployment", name=dst),
                       has_traffic=traffic, success_count=ok, failure_count=fail, rps=rps,
                       latency_ms_p50=p50, latency_ms_p95=p95, latency_ms_p99=p99, request_count=ok + fail)


ROWS = [
    row(VOTE + "VoteDoughnut", fail=60, rps=1.0, p50=0.7, p95=1.9, p99=4.2),
    row(VOTE + "VoteJoy", ok=300, rps=5.0, p50=1, p95=2.4, p99=9.5),
    row(VOTE + "VotePizza", ok=117, fail=3, rps=2.0, p50=1.2, p95=3, p99=12),
    row("[DEFAULT]"),
    row("[other]", ok=6, rps=0.1, p50=3, p95=4.8, p99=5),
]


def test_cli_routes_table(controller: Served) -> None:
    controller.fake.routes = pb.RoutesResponse(rows=ROWS)
    result = controller.run("routes", "deploy/voting", "-n", "emojivoto")
    assert result.exit_code == 0, result.output
    assert_golden("routes_deploy", result.stdout)
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ROUTE", "SERVICE", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99"]
    assert lines[1].split()[:3] == [VOTE + "VoteDoughnut", "voting-svc", "0.00%"]
    assert lines[4].split() == ["[DEFAULT]", "voting-svc", "-", "-", "-", "-", "-"]
    req = controller.fake.requests[0]
    assert (req.selector.namespace, req.selector.type, req.selector.name) == ("emojivoto", "deployment", "voting")
    assert req.window_seconds == 60 and not req.HasField("to")


def test_cli_routes_wide_and_to(controller: Served) -> None:
    controller.fake.routes = pb.RoutesResponse(rows=ROWS)
    result = controller.run("routes", "deploy/web", "-n", "emojivoto", "--to", "deploy/voting", "-t", "10m",
                            "-o", "wide")
    assert result.exit_code == 0, result.output
    assert_golden("routes_deploy_wide", result.stdout)
    assert result.stdout.splitlines()[0].endswith("DESTINATION     REQUESTS   FAILURES")
    req = controller.fake.requests[0]
    assert (req.to.namespace, req.to.type, req.to.name, req.window_seconds) == (
        "emojivoto", "deployment", "voting", 600)


def test_cli_routes_json(controller: Served) -> None:
    controller.fake.routes = pb.RoutesResponse(rows=ROWS)
    result = controller.run("routes", "deploy/voting", "-n", "emojivoto", "-o", "json")
    assert result.exit_code == 0, result.output
    assert_golden("routes_deploy_json", result.stdout)
    data = json.loads(result.stdout)
    assert data[0]["route"] == VOTE + "VoteDoughnut" and data[0]["success"] == 0
    assert data[3]["route"] == "[DEFAULT]" and data[3]["rps"] is None and data[3]["success"] is None
    assert data[2]["success"] == 0.975 and data[2]["destination"]["kind"] == "deployment"


def test_cli_routes_errors(controller: Served) -> None:
    controller.fake.routes = pb.RoutesResponse(error='deployment "nope" not found in namespace "emojivoto"')
    result = controller.run("routes", "deploy/nope", "-n", "emojivoto")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == 'Error: deployment "nope" not found in namespace "emojivoto"\n'
    # caught before any request: a type without a name, a bad type, a bad window
    for args, message in (
        (("routes", "deploy"), "routes need one resource by name, e.g. deploy/NAME"),
        (("routes", "bogus/x"), "unknown resource type 'bogus'"),
        (("routes", "deploy/web", "-t", "5s"), "too short"),
        (("routes", "deploy/web", "-o", "yaml"), "invalid output format"),
    ):
        result = controller.run(*args)
        assert result.exit_code == 1 and message in result.stderr, (args, result.stderr)
    assert len(controller.fake.requests) == 1


def test_cli_routes_no_rows(controller: Served) -> None:
    result = controller.run("routes", "deploy/web", "-n", "emojivoto")
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == "No traffic found.\n"
