"""Which cluster the CLI talks to: kubectl's rules, the sandbox only when asked or when there is no
kube context at all (issue 11 item 9: with a sandbox running, `nodemesh stat` used it instead of the
current kube context and failed with `invalid token`).

Real kubeconfig files in a temporary HOME; the choices and every error line are pinned in
testdata/context_choice.golden. The last tests run the real kubernetes client against two local
HTTP "API servers" and check which one the CLI asked for the controller pod.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from cli_testkit import assert_golden
from click.testing import CliRunner
from nodemesh.cli.client import ClientConfig, CliError, resolve_target
from nodemesh.cli.main import cli


def kubeconfig(path: Path, current: str | None, contexts: dict[str, str], token: str = "t") -> Path:
    """A kubeconfig with one cluster and one user per context; contexts: name -> server URL."""
    doc: dict[str, object] = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": f"{n}-cluster", "cluster": {"server": s}} for n, s in contexts.items()],
        "users": [{"name": f"{n}-user", "user": {"token": f"{token}-{n}"}} for n in contexts],
        "contexts": [{"name": n, "context": {"cluster": f"{n}-cluster", "user": f"{n}-user"}} for n in contexts],
    }
    if current is not None:
        doc["current-context"] = current
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


@dataclass
class Machine:
    """A HOME, a sandbox root, and what a command line / environment adds."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        (self.root / "home").mkdir(parents=True)
        (self.root / "sandboxes").mkdir()
        self.env.update({"HOME": str(self.root / "home"), "NODEMESH_SANDBOX_ROOT": str(self.root / "sandboxes")})

    @property
    def kube(self) -> Path:
        return self.root / "home" / ".kube" / "config"

    def sandbox(self, name: str = "nodemesh", addr: str = "10.240.0.1:8085") -> None:
        (self.root / "sandboxes" / name).mkdir()
        (self.root / "sandboxes" / name / "controller.addr").write_text(addr + "\n")

    def choose(self, **flags: object) -> str:
        """Where the CLI would go, as one line (the golden's words)."""
        try:
            target = resolve_target(ClientConfig.from_cli(
                flags.get("controller"), None, self.env, use_sandbox=bool(flags.get("sandbox")),  # type: ignore[arg-type]
                context=flags.get("context"), kubeconfig=flags.get("kubeconfig")))  # type: ignore[arg-type]
        except CliError as exc:
            return "Error: " + exc.message.replace(str(self.root), "$ROOT")
        if target.kube is not None:
            return f"kube context {target.kube.name} -> {target.kube.server}"
        return f"{target.address} ({target.origin.replace(str(self.root), '$ROOT')})"


PROD, KIND = "https://prod.example:6443", "https://127.0.0.1:34567"


def scenarios(tmp: Path) -> Iterator[tuple[str, str]]:
    def machine(name: str) -> Machine:
        return Machine(tmp / name)

    m = machine("empty")
    yield "nothing at all", m.choose()
    m.sandbox()
    yield "a sandbox, no kubeconfig", m.choose()

    m = machine("both")
    m.sandbox()
    kubeconfig(m.kube, "prod", {"prod": PROD, "kind-a": KIND})
    yield "a sandbox and ~/.kube/config (current: prod)", m.choose()
    yield "  --sandbox", m.choose(sandbox=True)
    yield "  --context kind-a", m.choose(context="kind-a")
    yield "  --controller 127.0.0.1:9", m.choose(controller="127.0.0.1:9")
    yield "  --context nope", m.choose(context="nope")
    yield "  --sandbox --context kind-a", m.choose(sandbox=True, context="kind-a")
    m.env["NODEMESH_SANDBOX"] = "nodemesh"
    yield "  NODEMESH_SANDBOX=nodemesh", m.choose()
    yield "  NODEMESH_SANDBOX=nodemesh --context prod", m.choose(context="prod")
    del m.env["NODEMESH_SANDBOX"]
    m.env["NODEMESH_CONTROLLER"] = "10.0.0.9:8085"
    yield "  NODEMESH_CONTROLLER=10.0.0.9:8085", m.choose()
    yield "  NODEMESH_CONTROLLER=10.0.0.9:8085 --context kind-a", m.choose(context="kind-a")
    del m.env["NODEMESH_CONTROLLER"]
    m.env["NODEMESH_SANDBOX"] = "other"
    yield "  NODEMESH_SANDBOX=other (not running)", m.choose()
    del m.env["NODEMESH_SANDBOX"]

    m = machine("list")
    m.sandbox()
    f1 = kubeconfig(m.root / "f1.yaml", "kind-a", {"kind-a": KIND})
    f2 = kubeconfig(m.root / "f2.yaml", "prod", {"prod": PROD, "kind-a": "https://shadowed.example"})
    f3 = kubeconfig(m.root / "f3.yaml", None, {"staging": "https://staging.example"})
    (m.root / "empty.yaml").write_text("")
    kubeconfig(m.kube, "home", {"home": "https://home.example"})
    m.env["KUBECONFIG"] = f"{f1}:{f2}"
    yield "KUBECONFIG=f1:f2 (current kind-a, then prod)", m.choose()
    m.env["KUBECONFIG"] = f"{f3}:{f2}"
    yield "KUBECONFIG=f3:f2 (f3 sets no current-context)", m.choose()
    m.env["KUBECONFIG"] = f"{f2}:{f1}"
    yield "KUBECONFIG=f2:f1, --context kind-a (first definition wins)", m.choose(context="kind-a")
    m.env["KUBECONFIG"] = f"{m.root}/missing.yaml:{m.root}/empty.yaml:{f3}"
    yield "KUBECONFIG=missing:empty:f3 (no current-context; sandbox)", m.choose()
    yield "  --context staging", m.choose(context="staging")
    del m.env["KUBECONFIG"]
    yield "--kubeconfig f2", m.choose(kubeconfig=str(f2))
    yield "--kubeconfig missing.yaml", m.choose(kubeconfig=str(m.root / "missing.yaml"))

    m = machine("broken")
    m.sandbox()
    m.kube.parent.mkdir(parents=True)
    m.kube.write_text("apiVersion: v1\ncontexts: [\n")
    yield "invalid ~/.kube/config", m.choose()
    kubeconfig(m.kube, "gone", {"prod": PROD})
    yield "current-context names no context", m.choose()
    yield "  --sandbox", m.choose(sandbox=True)
    doc = yaml.safe_load(m.kube.read_text())
    doc["current-context"] = "prod"
    doc["clusters"] = []
    m.kube.write_text(yaml.safe_dump(doc))
    yield "context names a missing cluster", m.choose()

    m = machine("twosandboxes")
    m.sandbox("a", "127.0.0.1:1")
    m.sandbox("b", "127.0.0.2:1")
    yield "two test sandboxes, no kubeconfig", m.choose()
    yield "  --sandbox", m.choose(sandbox=True)
    m.env["NODEMESH_SANDBOX"] = "b"
    yield "  NODEMESH_SANDBOX=b", m.choose()


def test_cli_context_choice_golden(tmp_path: Path) -> None:
    width = 62
    lines = [f"{what:<{width}} {result}" for what, result in scenarios(tmp_path)]
    assert_golden("context_choice", "\n".join(lines) + "\n")


def test_cli_context_errors_are_one_line_with_what_to_do(tmp_path: Path) -> None:
    m = Machine(tmp_path)
    result = CliRunner().invoke(cli, ["stat", "deploy"], env={**m.env, "NODEMESH_CONTROLLER": "",
                                                              "NODEMESH_SANDBOX": "", "KUBECONFIG": ""})
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    for what_to_do in ("--context NAME", "kubectl config use-context", "--sandbox", "nodemesh install --sandbox",
                       "--controller HOST:PORT"):
        assert what_to_do in result.stderr
    result = CliRunner().invoke(cli, ["check", "--sandbox", "--controller", "1.2.3.4:5"], env=m.env)
    assert result.exit_code == 1 and "--controller and --sandbox name different clusters" in result.stderr


# ---------------------------------------------------------------------------- the real client


class FakeAPIServer:
    """Answers the one call the CLI makes before its port-forward (list the controller pods) and
    records who asked with which token."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        seen = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append((self.path, self.headers.get("Authorization", "")))
                body = json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": []}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api_servers() -> Iterator[tuple[FakeAPIServer, FakeAPIServer]]:
    a, b = FakeAPIServer(), FakeAPIServer()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_cli_context_real_client_asks_the_chosen_cluster(tmp_path: Path,
                                                          api_servers: tuple[FakeAPIServer, FakeAPIServer]) -> None:
    kind, prod = api_servers
    m = Machine(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as s:
        dead = s.getsockname()[1]      # the sandbox's controller address: loopback, nobody listening
    m.sandbox(addr=f"127.0.0.1:{dead}")  # running on the same machine: not used while a kube context is current
    kubeconfig(m.kube, "prod", {"prod": prod.url, "kind-a": kind.url})

    def stat(*flags: str, env: dict[str, str] | None = None) -> str:
        result = CliRunner().invoke(cli, ["stat", "deploy", *flags], env={**m.env, **(env or {})})
        assert result.exit_code == 1, result.output
        return result.stderr

    err = stat()
    assert "no running controller pod" in err and f"of kube context prod ({prod.url})" in err
    assert [r[1] for r in prod.requests] == ["Bearer t-prod"] and kind.requests == []
    assert prod.requests[0][0].startswith("/api/v1/namespaces/nodemesh/pods?labelSelector=app")

    stat("--context", "kind-a")
    assert [r[1] for r in kind.requests] == ["Bearer t-kind-a"] and len(prod.requests) == 1

    # KUBECONFIG, a list: the first file to set current-context wins (the Python client alone
    # would take the last one's).
    f1 = kubeconfig(tmp_path / "f1.yaml", "kind-a", {"kind-a": kind.url})
    f2 = kubeconfig(tmp_path / "f2.yaml", "prod", {"prod": prod.url})
    err = stat(env={"KUBECONFIG": f"{f1}:{f2}"})
    assert "kube context kind-a" in err and len(kind.requests) == 2 and len(prod.requests) == 1

    # Asked for the sandbox: its controller, not the cluster's (nobody listens there: unreachable).
    err = stat("--sandbox")
    assert f"cannot reach the controller at 127.0.0.1:{dead} (sandbox state" in err and "; --sandbox)" in err
    assert len(kind.requests) == 2 and len(prod.requests) == 1


def test_cli_context_demo_next_steps_point_at_the_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a kube context on the machine, the demo's "try next" commands need NODEMESH_SANDBOX."""
    from nodemesh.cli.demo import NEXT_STEPS, current_kube_context, next_steps

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    assert current_kube_context() is None
    assert next_steps("nodemesh", None) == NEXT_STEPS
    kubeconfig(tmp_path / ".kube" / "config", "prod", {"prod": PROD})
    assert current_kube_context() == "prod"
    text = next_steps("nodemesh", "prod")
    assert text.splitlines()[0] == ("The mesh is watching emojivoto. Try (after `export NODEMESH_SANDBOX=nodemesh`; "
                                    "without it the CLI talks to your kube context 'prod'):")
