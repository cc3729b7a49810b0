"""`nodemesh stat` end to end through click against a real grpc server; outputs pinned by goldens."""

from __future__ import annotations

import json

from cli_testkit import Served, assert_golden, stat_row
from nodemesh.api.gen import nodemesh_pb2 as pb

DEPLOYS = [
    stat_row("emojivoto", "deployment", "web", ok=1990, fail=10, rps=2.0, p50=3, p95=9.6, p99=19.2, tcp=2,
             read=1234.5, write=98765.25),
    stat_row("emojivoto", "deployment", "emoji", meshed=2, total=2, ok=4000, rps=4.05, p50=1, p95=2, p99=4.7,
             tcp=1, read=300, write=512),
    stat_row("emojivoto", "deployment", "voting", meshed=1, total=2, ok=1500, fail=500, rps=2.0, p50=0.4,
             p95=1, p99=950, tcp=3),
    stat_row("emojivoto", "deployment", "vote-bot", traffic=False),
    # opaque TCP only: connections and bytes, no responses
    stat_row("emojivoto", "deployment", "redis", traffic=False, has_tcp=True, tcp=4, read=10.5, write=2048),
]


def test_cli_stat_table(controller: Served) -> None:
    controller.fake.stat["deployment"] = pb.StatResponse(rows=DEPLOYS)
    result = controller.run("stat", "deploy", "-n", "emojivoto")
    assert result.exit_code == 0, result.output
    assert_golden("stat_deploy", result.stdout)
    # the no-traffic row keeps its MESHED and shows `-` everywhere else
    assert "vote-bot      1/1         -        -             -" in result.stdout


def test_cli_stat_wide(controller: Served) -> None:
    controller.fake.stat["deployment"] = pb.StatResponse(rows=DEPLOYS)
    result = controller.run("stat", "deploy", "-n", "emojivoto", "-o", "wide")
    assert result.exit_code == 0, result.output
    assert_golden("stat_deploy_wide", result.stdout)
    assert "READ_BYTES/SEC   WRITE_BYTES/SEC" in result.stdout.splitlines()[0]


def test_cli_stat_all_namespaces(controller: Served) -> None:
    controller.fake.stat["deployment"] = pb.StatResponse(rows=[
        stat_row("emojivoto", "deployment", "web", ok=10, rps=1.2, p50=1, p95=2, p99=3, tcp=1),
        stat_row("books", "deployment", "webapp", meshed=3, total=3, ok=9, fail=1, rps=0.5, p50=12,
                 p95=45, p99=97, tcp=4),
    ])
    result = controller.run("stat", "deploy", "-A")
    assert result.exit_code == 0, result.output
    assert_golden("stat_deploy_all_namespaces", result.stdout)
    req = controller.fake.requests[0]
    assert req.all_namespaces and req.selector.namespace == ""


def test_cli_stat_json(controller: Served) -> None:
    controller.fake.stat["deployment"] = pb.StatResponse(rows=DEPLOYS)
    result = controller.run("stat", "deploy", "-n", "emojivoto", "-o", "json")
    assert result.exit_code == 0, result.output
    assert_golden("stat_deploy_json", result.stdout)
    data = json.loads(result.stdout)
    assert [set(d) for d in data] == [{
        "namespace", "kind", "name", "meshed", "totalPods", "success", "rps", "latency_ms_p50",
        "latency_ms_p95", "latency_ms_p99", "tcp_open_connections", "tcp_read_bytes_rate",
        "tcp_write_bytes_rate"}] * 5
    web = next(d for d in data if d["name"] == "web")
    assert web["success"] == 0.995 and web["kind"] == "deployment" and web["totalPods"] == 1
    idle = next(d for d in data if d["name"] == "vote-bot")
    assert idle["success"] is None and idle["rps"] is None and idle["latency_ms_p99"] is None
    assert idle["tcp_open_connections"] is None
    redis = next(d for d in data if d["name"] == "redis")
    assert redis["success"] is None and redis["rps"] is None and redis["tcp_open_connections"] == 4


def test_cli_stat_pods_have_status(controller: Served) -> None:
    controller.fake.stat["pod"] = pb.StatResponse(rows=[
        stat_row("emojivoto", "pod", "web-7d9f-abcde", status="Running", ok=100, rps=1.7, p50=2, p95=4,
                 p99=5, tcp=1),
        stat_row("emojivoto", "pod", "emoji-5c6b-fghij", status="Running", ok=50, fail=50, rps=1.7, p50=1,
                 p95=2, p99=3, tcp=2),
        stat_row("emojivoto", "pod", "voting-6f4d-klmno", meshed=0, status="Pending", traffic=False),
    ])
    result = controller.run("stat", "po", "-n", "emojivoto")
    assert result.exit_code == 0, result.output
    assert_golden("stat_pods", result.stdout)
    assert result.stdout.splitlines()[0].split()[:3] == ["NAME", "STATUS", "MESHED"]


def test_cli_stat_all_prints_one_table_per_type(controller: Served) -> None:
    controller.fake.stat["all"] = pb.StatResponse(rows=[
        stat_row("emojivoto", "deployment", "web", ok=10, rps=1.0, p50=1, p95=2, p99=3, tcp=1),
        stat_row("emojivoto", "pod", "web-7d9f-abcde", status="Running", ok=10, rps=1.0, p50=1, p95=2, p99=3,
                 tcp=1),
        stat_row("emojivoto", "service", "web-svc", meshed=0, total=0, ok=10, rps=1.0, p50=1, p95=2, p99=3,
                 tcp=1),
    ])
    result = controller.run("stat", "all", "-n", "emojivoto")
    assert result.exit_code == 0, result.output
    assert_golden("stat_all", result.stdout)
    assert "deploy/web" in result.stdout and "po/web-7d9f-abcde" in result.stdout


def test_cli_stat_several_names_one_request_each(controller: Served) -> None:
    controller.fake.stat["deployment"] = pb.StatResponse(rows=DEPLOYS[:1])
    result = controller.run("stat", "deploy", "web", "emoji", "-n", "emojivoto", "-t", "90s")
    assert result.exit_code == 0, result.output
    names = [r.selector.name for r in controller.fake.requests]
    assert names == ["web", "emoji"]
    assert all(r.window_seconds == 90 for r in controller.fake.requests)


def test_cli_stat_from_to_reach_the_request(controller: Served) -> None:
    controller.fake.stat["deployment"] = pb.StatResponse(rows=DEPLOYS[1:2])
    result = controller.run("stat", "deploy", "-n", "emojivoto", "--from", "deploy/web")
    assert result.exit_code == 0, result.output
    req = controller.fake.requests[0]
    assert (getattr(req, "from").type, getattr(req, "from").name, getattr(req, "from").namespace) == (
        "deployment", "web", "emojivoto")
    assert not req.HasField("to")


def test_cli_stat_no_rows(controller: Served) -> None:
    result = controller.run("stat", "sts", "-n", "emojivoto")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert result.stderr == "No traffic found.\n"
    result = controller.run("stat", "sts", "-n", "emojivoto", "-o", "json")
    assert result.exit_code == 0 and json.loads(result.stdout) == []


def test_cli_stat_server_error_string(controller: Served) -> None:
    controller.fake.stat["deployment"] = pb.StatResponse(error='deployment "nope" not found in namespace "x"')
    result = controller.run("stat", "deploy/nope", "-n", "x")
    assert result.exit_code == 1
    assert result.stderr == 'Error: deployment "nope" not found in namespace "x"\n'
    assert result.stdout == ""
