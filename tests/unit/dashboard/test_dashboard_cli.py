"""`nodemesh dashboard`: where the URL comes from (flag, env, sandbox state, dashboard.addr),
workload deep links, and opening a browser. The Kubernetes port-forward path is the CLI's
KubePortForward (tested by the CLI room) pointed at port 8084."""

from __future__ import annotations

import http.client
import http.server
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from nodemesh.api.certs import write_controller_pki
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


def test_dashboard_of_a_tls_sandbox_is_forwarded_and_verified(no_sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sandbox installed with controllerTls=true: its web port speaks TLS with the sandbox's own
    CA. The browser gets http://127.0.0.1:PORT (never a certificate it cannot verify) and each
    connection goes on as TLS verified with controller-ca.crt; a server with another CA is refused;
    a web port in plain HTTP beside a TLS gRPC port (the node-process sandbox) gets its URL as is."""
    state = no_sandbox / "nodemesh"
    state.mkdir()
    pki = write_controller_pki(state, ["127.0.0.1"])
    served: list[str] = []

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.append(self.path)
            body = b"the dashboard"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.cert, pki.key)
    web.socket = context.wrap_socket(web.socket, server_side=True)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    write_controller_address(state, "127.0.0.1", 8085)
    write_dashboard_address(state, "127.0.0.1", web.server_address[1])
    fetched: list[tuple[str, int, bytes]] = []

    def browse(_seconds: float) -> None:
        """What a browser does with the printed URL while the command forwards (then Ctrl-C)."""
        url = printed[-1]
        with urllib.request.urlopen(url, timeout=5) as resp:
            fetched.append((url, resp.status, resp.read()))
        raise KeyboardInterrupt

    printed: list[str] = []
    monkeypatch.setattr(dash.time, "sleep", browse)
    monkeypatch.setattr(dash.webbrowser, "open", lambda url: printed.append(url) or True)
    try:
        code, _, err = run(["--port", "0"])
        assert code == 0, err
        ((url, status, body),) = fetched
        assert url.startswith("http://127.0.0.1:") and status == 200 and body == b"the dashboard", fetched
        assert f"127.0.0.1:{web.server_address[1]} over TLS verified with {pki.ca}" in err
        assert served  # it reached the TLS server

        # The same page behind a certificate of another CA: refused with one line, never a
        # fallback to plain HTTP, nothing served.
        (no_sandbox / "other").mkdir()
        other = write_controller_pki(no_sandbox / "other", ["127.0.0.1"])
        context.load_cert_chain(other.cert, other.key)
        served.clear()
        code, _, err = run(["--port", "0"])
        assert code == 1 and "presents a certificate the controller's CA does not verify" in err, err
        assert not served and len(fetched) == 1
    finally:
        web.shutdown()
        web.server_close()

    # A node-process sandbox: its controller serves gRPC over TLS (the CA file is there) and the web
    # port in plain HTTP. The command finds the port plain and prints its URL at once, as before.
    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    try:
        write_dashboard_address(state, "127.0.0.1", plain.server_address[1])
        monkeypatch.setattr(dash.time, "sleep", lambda _s: pytest.fail("no forward for a plain web port"))
        assert run(["--show", "url"])[:2] == (0, f"http://127.0.0.1:{plain.server_address[1]}/\n")
    finally:
        plain.shutdown()
        plain.server_close()
