"""`nodemesh check` and `nodemesh version` against a real grpc server."""

from __future__ import annotations

import socket

from cli_testkit import Served, assert_golden
from click.testing import CliRunner
from nodemesh import __version__
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.cli.main import cli


def _node(name: str, **kw: object) -> pb.NodeCheck:
    base = {"node": name, "agent_connected": True, "agent_ready": True, "capture_installed": True,
            "agent_version": __version__, "last_report_age_ms": 800, "clock_skew_ms": 3}
    base.update(kw)
    return pb.NodeCheck(**base)


def test_cli_check_pass(controller: Served) -> None:
    controller.fake.check = pb.CheckResponse(controller_version=__version__,
                                             nodes=[_node("node-2"), _node("node-1")])
    result = controller.run("check")
    assert result.exit_code == 0, result.output
    assert_golden("check_pass", result.stdout.replace(controller.address, "ADDRESS"))
    assert result.stdout.count("\u2713") == 6 and "\u00d7" not in result.stdout


def test_cli_check_fail_names_the_broken_part(controller: Served) -> None:
    controller.fake.check = pb.CheckResponse(controller_version=__version__, nodes=[
        _node("node-1"),
        _node("node-2", agent_connected=False, agent_ready=False, capture_installed=False, agent_version=""),
        _node("node-3", capture_installed=False, agent_version="0.0.9", clock_skew_ms=-4500),
    ])
    result = controller.run("check")
    assert result.exit_code == 1
    assert_golden("check_fail", result.stdout.replace(controller.address, "ADDRESS"))
    assert "    node-2: no agent connected" in result.stdout
    assert "    node-3: capture not installed" in result.stdout


def test_cli_check_says_which_capture_runs_on_each_node_and_why(controller: Served) -> None:
    controller.fake.check = pb.CheckResponse(controller_version=__version__, nodes=[
        _node("node-1", capture_mode="ebpf", capture_mode_reason="connect4 programs pinned at /sys/fs/bpf/nodemesh, enabled"),
        _node("node-2", capture_mode="iptables", capture_mode_reason="no eBPF capture pinned at /sys/fs/bpf/nodemesh"),
    ])
    result = controller.run("check")
    assert result.exit_code == 0, result.output
    assert "\u2713 node-1: capture mode ebpf (connect4 programs pinned at /sys/fs/bpf/nodemesh, enabled)" in result.stdout
    assert "\u2713 node-2: capture mode iptables (no eBPF capture pinned at /sys/fs/bpf/nodemesh)" in result.stdout


def test_cli_check_says_where_stat_answers_from_and_fails_on_a_prometheus_missing_agents(controller: Served) -> None:
    nodes = [_node("node-1"), _node("node-2")]
    controller.fake.check = pb.CheckResponse(controller_version=__version__, nodes=nodes, stat_backend="memory",
                                             stat_backend_ok=True)
    result = controller.run("check")
    assert result.exit_code == 0 and "\u2713 stat backend memory\n" in result.stdout, result.output

    url = "http://prometheus.monitoring:9090"
    controller.fake.check = pb.CheckResponse(
        controller_version=__version__, nodes=nodes, stat_backend="prometheus", stat_backend_url=url,
        stat_backend_ok=True, stat_backend_detail="holds metrics of 2 of the 2 ready agents")
    result = controller.run("check")
    assert result.exit_code == 0, result.output
    assert f"\u2713 stat backend prometheus ({url}): holds metrics of 2 of the 2 ready agents" in result.stdout

    controller.fake.check = pb.CheckResponse(
        controller_version=__version__, nodes=nodes, stat_backend="prometheus", stat_backend_url=url,
        stat_backend_ok=False, stat_backend_detail="holds metrics of 1 of the 2 ready agents")
    result = controller.run("check")
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("\u00d7 stat backend prometheus"))
    assert lines[at + 1] == "    holds metrics of 1 of the 2 ready agents" and lines[at + 2].startswith("    hint: ")


def test_cli_check_unreachable_controller() -> None:
    # a port nobody listens on: bind then close, on loopback
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    result = CliRunner().invoke(cli, ["check", "--controller", f"127.0.0.1:{port}"])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[2] == "\u00d7 controller reachable"
    assert lines[3].startswith(f"    cannot reach the controller at 127.0.0.1:{port}")
    assert lines[4].startswith("    hint: ")
    assert lines[-1] == "Status check results are \u00d7"


def test_cli_version(controller: Served) -> None:
    controller.fake.check = pb.CheckResponse(controller_version="0.1.0", nodes=[
        _node("node-1", agent_version="0.1.0"), _node("node-2", agent_version="0.1.0"),
        _node("node-3", agent_connected=False)])
    result = controller.run("version")
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"Client version: {__version__}\nController version: 0.1.0\n"
                             "Agent version: 0.1.0 (node-1, node-2)\n")
    controller.fake.requests.clear()
    result = controller.run("version", "--client")
    assert result.stdout == f"Client version: {__version__}\n"
    assert controller.fake.requests == []  # --client never calls the controller
