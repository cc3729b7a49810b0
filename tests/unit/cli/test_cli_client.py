"""Finding the controller, credentials, and one-line errors for every user mistake."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cli_testkit import Served
from click.testing import CliRunner
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.cli.client import ClientConfig, CliError, resolve_target
from nodemesh.cli.main import cli


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port with nobody listening."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    yield port


def test_cli_client_flag_beats_env_beats_sandbox(tmp_path: Path) -> None:
    (tmp_path / "c1").mkdir()
    (tmp_path / "c1" / "controller.addr").write_text("10.0.0.1:8085\n")
    env = {"NODEMESH_SANDBOX_ROOT": str(tmp_path), "HOME": str(tmp_path)}   # no kubeconfig: the sandbox
    assert resolve_target(ClientConfig.from_cli(None, None, env)).address == "10.0.0.1:8085"
    env["NODEMESH_CONTROLLER"] = "127.0.0.1:9000"
    assert resolve_target(ClientConfig.from_cli(None, None, env)).address == "127.0.0.1:9000"
    assert resolve_target(ClientConfig.from_cli("[::1]:7", None, env)).address == "[::1]:7"


def test_cli_client_sandbox_choice(tmp_path: Path) -> None:
    """Which sandbox, when the sandbox is what the CLI talks to (more: test_cli_context.py)."""
    env = {"NODEMESH_SANDBOX_ROOT": str(tmp_path), "HOME": str(tmp_path)}
    with pytest.raises(CliError, match="no cluster to talk to"):
        resolve_target(ClientConfig.from_cli(None, None, env))
    for name in ("a", "b"):  # two test clusters, none the default one
        (tmp_path / name).mkdir()
        (tmp_path / name / "controller.addr").write_text(f"127.0.0.{1 if name == 'a' else 2}:8085")
    with pytest.raises(CliError, match=r"several sandboxes are running \(a, b\)"):
        resolve_target(ClientConfig.from_cli(None, None, env))
    (tmp_path / "nodemesh").mkdir()
    (tmp_path / "nodemesh" / "controller.addr").write_text("127.0.0.3:8085")
    assert resolve_target(ClientConfig.from_cli(None, None, env)).address == "127.0.0.3:8085"
    env["NODEMESH_SANDBOX"] = "b"
    target = resolve_target(ClientConfig.from_cli(None, None, env))
    assert target.address == "127.0.0.2:8085" and "sandbox state" in target.origin
    (tmp_path / "b" / "controller.addr").write_text("garbage")
    with pytest.raises(CliError, match="invalid controller address 'garbage'"):
        resolve_target(ClientConfig.from_cli(None, None, env))


def test_cli_client_token_sent_as_bearer(controller: Served, tmp_path: Path) -> None:
    controller.run("edges", "deploy", env={"NODEMESH_TOKEN": "s3cret"})
    assert controller.fake.metadata[-1]["authorization"] == "Bearer s3cret"
    token = tmp_path / "token"
    token.write_text("from-file\n")
    controller.run("edges", "deploy", "--token-file", str(token))
    assert controller.fake.metadata[-1]["authorization"] == "Bearer from-file"
    controller.run("edges", "deploy")
    assert "authorization" not in controller.fake.metadata[-1]


def _one_error_line(result, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: "), result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("args", "fragment"), [
    (["stat", "bogus"], "unknown resource type 'bogus'"),
    (["stat", "deploy/a/b"], "invalid resource selector"),
    (["stat", "all", "--from", "deploy/web"], "'all' cannot be combined"),
    (["stat", "deploy", "-t", "5s"], "minimum is 10s"),
    (["stat", "deploy", "-t", "2h"], "maximum is 1h"),
    (["stat", "deploy", "-o", "yaml"], "invalid output format 'yaml'"),
    (["stat"], "must specify a resource type"),
    (["stat", "deploy", "-l", "a b"], "invalid label selector"),
    (["tap", "all"], "tap does not accept 'all'"),
    (["top", "bogus/x"], "unknown resource type"),
    (["edges"], "must specify a resource type"),
    (["edges", "deploy", "-o", "table2"], "invalid output format"),
    (["stat", "deploy", "--controller", "nonsense"], "invalid controller address"),
])
def test_cli_client_bad_input_is_one_line(controller: Served, args: list[str], fragment: str) -> None:
    _one_error_line(controller.run(*args), fragment)
    assert controller.fake.requests == []  # refused before any call


@pytest.mark.parametrize("verb", [["stat", "deploy"], ["tap", "deploy"], ["top", "deploy"], ["edges", "deploy"],
                                  ["version"]])
def test_cli_client_unreachable_controller(dead_port: int, verb: list[str]) -> None:
    result = CliRunner().invoke(cli, [*verb, "--controller", f"127.0.0.1:{dead_port}"], catch_exceptions=False)
    if verb == ["version"]:
        assert result.stdout.startswith("Client version: ")
        assert result.exit_code == 1 and result.stderr.startswith("Error: cannot reach the controller")
        return
    _one_error_line(result, f"cannot reach the controller at 127.0.0.1:{dead_port} (--controller")


@pytest.mark.parametrize("verb", [["stat", "deploy/x"], ["tap", "deploy/x"], ["edges", "deploy"]])
def test_cli_client_server_status_is_one_line(controller: Served, verb: list[str]) -> None:
    controller.fake.abort = (grpc.StatusCode.INVALID_ARGUMENT, 'no deployment "x" in namespace "default"')
    _one_error_line(controller.run(*verb), 'Error: no deployment "x" in namespace "default"')
    controller.fake.abort = (grpc.StatusCode.INTERNAL, "boom")
    _one_error_line(controller.run(*verb), "controller error (INTERNAL): boom")


def test_cli_client_edges_error_field(controller: Served) -> None:
    controller.fake.edges = pb.EdgesResponse(error="edges need traffic data")
    _one_error_line(controller.run("edges", "deploy"), "edges need traffic data")


def test_cli_client_no_address_anywhere(tmp_path: Path) -> None:
    """No flag, env or sandbox, and no kubeconfig: one line that says every way to fix it."""
    env = {"NODEMESH_CONTROLLER": "", "NODEMESH_SANDBOX_ROOT": str(tmp_path), "KUBECONFIG": str(tmp_path / "nope"),
           "HOME": str(tmp_path), "KUBERNETES_SERVICE_HOST": ""}
    result = CliRunner().invoke(cli, ["stat", "deploy"], env=env, catch_exceptions=False)
    _one_error_line(result, "no cluster to talk to: no kube context")
    assert "--context NAME" in result.stderr and "--sandbox" in result.stderr and "--controller" in result.stderr


def test_cli_client_sandbox_address_roundtrip(tmp_path: Path) -> None:
    from nodemesh.manifests.sandboxfiles import write_controller_address

    (tmp_path / "nodemesh").mkdir()
    path = write_controller_address(tmp_path / "nodemesh", "10.200.0.2", 8085)
    assert path.read_text() == "10.200.0.2:8085\n"
    target = resolve_target(ClientConfig.from_cli(None, None, {"NODEMESH_SANDBOX_ROOT": str(tmp_path),
                                                                "HOME": str(tmp_path)}))
    assert target.address == "10.200.0.2:8085"


def test_cli_client_port_forward_splice_copies_both_ways() -> None:
    """The byte pump behind the Kubernetes port-forward, on real socket pairs."""
    import threading

    from nodemesh.cli.client import _splice

    local_app, local_end = socket.socketpair()
    remote_end, remote_app = socket.socketpair()
    pump = threading.Thread(target=_splice, args=(local_end, remote_end), daemon=True)
    pump.start()
    try:
        local_app.sendall(b"PRI * HTTP/2.0\r\n")
        assert remote_app.recv(100) == b"PRI * HTTP/2.0\r\n"
        remote_app.sendall(b"\x00\x00\x00\x04")
        assert local_app.recv(100) == b"\x00\x00\x00\x04"
        local_app.close()  # one side closes: the pump ends
        pump.join(timeout=5)
        assert not pump.is_alive()
    finally:
        for s in (local_app, local_end, remote_end, remote_app):
            s.close()
