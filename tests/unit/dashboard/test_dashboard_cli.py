"""`nodemesh dashboard`: where the URL comes from (flag, env, sandbox state, dashboard.addr),
workload deep links, and opening a browser. The Kubernetes port-forward path is the CLI's
KubePortForward (tested by the CLI room) pointed at port 8084."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from nodemesh.cli import dashboard as dash
from nodemesh.cli.main import cli
from nodemesh.manifests.sandboxfiles import write_controller_address, write_dashboard_address


def run(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["dashboard", *args], env=env or {})
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def no_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("NODEMESH_CONTROLLER", "NODEMESH_SANDBOX", "NODEMESH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NODEMESH_SANDBOX_ROOT", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))       # no kube context: the sandbox is the only cluster
    monkeypatch.delenv("KUBECONFIG", raising=False)
    return tmp_path


def test_dashboard_url_from_controller_flag_and_env(no_sandbox: Path) -> None:
    assert run(["--controller", "10.0.0.1:8085", "--show", "url"])[:2] == (0, "http://10.0.0.1:8084/\n")
    assert run(["--controller", "[fd00::1]:9000", "--show", "url"])[:2] == (0, "http://[fd00::1]:8084/\n")
    assert run(["--show", "url"], env={"NODEMESH_CONTROLLER": "127.0.0.2:8085"})[:2] == (
        0, "http://127.0.0.2:8084/\n")
    code, _, err = run(["--controller", "nonsense", "--show", "url"])
    assert code == 1 and "invalid controller address 'nonsense'" in err


def test_dashboard_url_from_sandbox_state(no_sandbox: Path) -> None:
    state = no_sandbox / "nodemesh"
    state.mkdir()
    write_controller_address(state, "10.99.0.2", 8085)
    assert run(["--show", "url"])[:2] == (0, "http://10.99.0.2:8084/\n")
    # An installer that serves the dashboard elsewhere says so beside controller.addr.
    write_dashboard_address(state, "10.99.0.2", 18084)
    assert run(["--show", "url"])[:2] == (0, "http://10.99.0.2:18084/\n")
    # --controller wins over the sandbox (and its dashboard.addr).
    assert run(["--controller", "127.0.0.1:8085", "--show", "url"])[1] == "http://127.0.0.1:8084/\n"
    # With a kube context the sandbox is used only when asked for.
    kube = no_sandbox / ".kube" / "config"
    kube.parent.mkdir()
    kube.write_text("current-context: c\ncontexts: [{name: c, context: {cluster: k}}]\n"
                    "clusters: [{name: k, cluster: {server: 'https://127.0.0.1:1'}}]\n")
    assert run(["--sandbox", "--show", "url"])[:2] == (0, "http://10.99.0.2:18084/\n")


def test_dashboard_workload_deep_link(no_sandbox: Path) -> None:
    code, out, _ = run(["deploy/web", "-n", "emojivoto", "--controller", "127.0.0.1:8085", "--show", "url"])
    assert (code, out) == (0, "http://127.0.0.1:8084/#/workload/emojivoto/deployment/web\n")
    for bad, message in (("deploy", "takes a workload TYPE/NAME"), ("widget/x", "unknown resource type"),
                         ("ns/emojivoto", "takes a workload TYPE/NAME")):
        code, _, err = run([bad, "--controller", "127.0.0.1:8085", "--show", "url"])
        assert code == 1 and message in err, err


def test_dashboard_opens_a_browser(no_sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    monkeypatch.setattr(dash.webbrowser, "open", lambda url: opened.append(url) or True)
    code, out, err = run(["--controller", "127.0.0.1:8085"])
    assert code == 0 and opened == ["http://127.0.0.1:8084/"] and "http://127.0.0.1:8084/" in err and out == ""


def test_dashboard_url_signs_in_with_the_token(no_sandbox: Path) -> None:
    """With a token (the sandbox's own, NODEMESH_TOKEN or --token-file) the URL goes through /login,
    which keeps the token in a cookie for the page (controlplane/webauth.py)."""
    state = no_sandbox / "nodemesh"
    state.mkdir()
    write_controller_address(state, "10.99.0.2", 8085)
    (state / "controller.token").write_text("s3cret/+=\n")
    code, out, _ = run(["deploy/web", "-n", "emojivoto", "--show", "url"])
    assert (code, out) == (0, "http://10.99.0.2:8084/login?token=s3cret%2F%2B%3D#/workload/emojivoto/deployment/web\n")
    code, out, _ = run(["--controller", "127.0.0.1:8085", "--show", "url"], env={"NODEMESH_TOKEN": "tok"})
    assert (code, out) == (0, "http://127.0.0.1:8084/login?token=tok\n")
