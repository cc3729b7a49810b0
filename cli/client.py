"""Finding the controller and talking to it.

The address comes from, in order: `--controller HOST:PORT`, `NODEMESH_CONTROLLER`, the running
sandbox (`<sandbox root>/<cluster>/controller.addr`, written by `nodemesh install --sandbox`), and
last a port-forward through the Kubernetes API to the controller pod (current kubeconfig). Every
failure a user can cause or meet becomes one `Error: ...` line and exit 1 (click's
ClickException), never a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.api.model import CONTROLLER_GRPC_PORT, GRPC_CHANNEL_OPTIONS

log = logging.getLogger("nodemesh.cli")

DEFAULT_SANDBOX_ROOT = Path("/run/nodemesh/sandbox")
CONTROLLER_ADDR_FILE = "controller.addr"
CONTROLLER_TOKEN_FILE = "controller.token"  # beside controller.addr (cli/sandbox_install.py TOKEN_FILE)
DEFAULT_SANDBOX = "nodemesh"  # nodemesh.sandbox.naming.DEFAULT_CLUSTER (not imported: pyroute2 is heavy)
CONTROLLER_NAMESPACE = "nodemesh"
CONTROLLER_LABEL = "app=nodemesh-controller"
DEFAULT_TIMEOUT_S = 10.0

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class CliError(click.ClickException):
    """A user-facing failure: click prints `Error: <message>` on stderr and exits 1."""


# ---------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """How the CLI reaches the controller; built once per command from flags and environment."""

    controller: str | None = None     # --controller or NODEMESH_CONTROLLER
    token: str | None = None          # bearer token (NODEMESH_TOKEN or --token-file)
    sandbox_root: Path = DEFAULT_SANDBOX_ROOT
    sandbox: str | None = None        # cluster name under sandbox_root (NODEMESH_SANDBOX)
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def from_cli(
        cls, controller: str | None, token_file: str | None, env: Mapping[str, str] | None = None,
    ) -> ClientConfig:
        env = os.environ if env is None else env
        token = env.get("NODEMESH_TOKEN") or None
        if token_file:
            try:
                token = Path(token_file).read_text().strip()
            except OSError as exc:
                raise CliError(f"cannot read token file {token_file}: {exc.strerror}") from None
        return cls(
            controller=controller or env.get("NODEMESH_CONTROLLER") or None,
            token=token,
            sandbox_root=Path(env.get("NODEMESH_SANDBOX_ROOT") or DEFAULT_SANDBOX_ROOT),
            sandbox=env.get("NODEMESH_SANDBOX") or None,
        )


def controller_options(func: F) -> F:
    """The connection flags every verb that talks to the controller takes."""
    func = click.option(
        "--token-file", type=click.Path(dir_okay=False), default=None,
        help="File holding a bearer token sent to the controller (else NODEMESH_TOKEN).",
    )(func)
    func = click.option(
        "--controller", envvar="NODEMESH_CONTROLLER", default=None, metavar="HOST:PORT",
        help="Controller gRPC address (else NODEMESH_CONTROLLER, the running sandbox, or a "
             "port-forward to the controller pod of the current kube context).",
    )(func)
    return func


# ---------------------------------------------------------------------------- address resolution

_HOSTPORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>\d{1,5})$")


def parse_hostport(text: str, origin: str) -> tuple[str, int]:
    m = _HOSTPORT.match(text.strip())
    port = int(m.group("port")) if m else 0
    if not m or not 0 < port < 65536:
        raise CliError(f"invalid controller address {text.strip()!r} from {origin}: expected HOST:PORT")
    return m.group("v6") or m.group("host"), port


def sandbox_address_file(root: Path, cluster: str | None) -> Path | None:
    """The controller.addr of the running sandbox, if exactly one can be meant."""
    if cluster:
        path = root / cluster / CONTROLLER_ADDR_FILE
        return path if path.is_file() else None
    try:
        found = sorted(p for p in root.glob(f"*/{CONTROLLER_ADDR_FILE}") if p.is_file())
    except OSError:
        return None
    if len(found) > 1:
        default = root / DEFAULT_SANDBOX / CONTROLLER_ADDR_FILE
        if default in found:
            return default  # test clusters come and go beside the user's own
        names = ", ".join(p.parent.name for p in found)
        raise CliError(f"several sandboxes are running ({names}): set NODEMESH_SANDBOX or pass --controller")
    return found[0] if found else None


def write_sandbox_address(state_dir: Path, host: str, port: int) -> Path:
    """Record where a sandbox's controller listens (for `nodemesh install --sandbox`): atomically,
    so a concurrent `nodemesh stat` never reads half an address. Remove the file on teardown."""
    path = Path(state_dir) / CONTROLLER_ADDR_FILE
    tmp = path.with_name(f".{CONTROLLER_ADDR_FILE}.{os.getpid()}")
    tmp.write_text(f"{_grpc_address(host, port)}\n")
    os.replace(tmp, path)
    return path


@dataclass(frozen=True, slots=True)
class Target:
    """Where the controller is, and how we learned it (named in errors)."""

    address: str  # host:port for grpc
    origin: str
    token: str | None = None  # the sandbox's own token, used when the user gave none


def resolve_target(config: ClientConfig) -> Target | None:
    """The controller address from flags, env or sandbox state; None means: try Kubernetes."""
    if config.controller:
        host, port = parse_hostport(config.controller, "--controller/NODEMESH_CONTROLLER")
        return Target(_grpc_address(host, port), "--controller/NODEMESH_CONTROLLER")
    path = sandbox_address_file(config.sandbox_root, config.sandbox)
    if path is not None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise CliError(f"cannot read {path}: {exc.strerror}") from None
        host, port = parse_hostport(text, str(path))
        return Target(_grpc_address(host, port), f"sandbox state {path}", _sandbox_token(path.parent))
    return None


def _sandbox_token(state_dir: Path) -> str | None:
    """The token `nodemesh install --sandbox` gave its controller; None if absent or unreadable
    (the controller then says what is missing)."""
    try:
        return (state_dir / CONTROLLER_TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def _grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------- Kubernetes port-forward


class KubePortForward:
    """A local TCP listener on 127.0.0.1 whose connections are tunnelled to the controller pod's
    gRPC port through the Kubernetes API (what `kubectl port-forward` does), so grpc can dial it."""

    def __init__(self, remote_port: int = CONTROLLER_GRPC_PORT, local_port: int = 0) -> None:
        try:
            from kubernetes import client, config  # heavy import: only on this path
        except ImportError as exc:  # pragma: no cover - kubernetes is a hard dependency
            raise CliError(f"kubernetes client unavailable: {exc}") from None
        try:
            config.load_kube_config()
        except Exception as exc:  # noqa: BLE001 - any kubeconfig problem is one user-facing line
            raise CliError(
                "no controller address: pass --controller HOST:PORT, set NODEMESH_CONTROLLER, start a "
                f"sandbox, or configure kubectl (kubeconfig: {exc})"
            ) from None
        self._core = client.CoreV1Api()
        self._remote_port = remote_port
        self.pod = self._find_pod()
        self._listener = socket.create_server(("127.0.0.1", local_port))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = threading.Event()
        threading.Thread(target=self._accept_loop, name="nodemesh-portforward", daemon=True).start()

    def _find_pod(self) -> str:
        try:
            pods = self._core.list_namespaced_pod(CONTROLLER_NAMESPACE, label_selector=CONTROLLER_LABEL)
        except Exception as exc:  # noqa: BLE001 - API errors become one line
            raise CliError(f"cannot list controller pods in namespace {CONTROLLER_NAMESPACE}: {exc}") from None
        for pod in pods.items:
            if pod.status and pod.status.phase == "Running":
                return str(pod.metadata.name)
        raise CliError(
            f"no running controller pod ({CONTROLLER_LABEL}) in namespace {CONTROLLER_NAMESPACE}: "
            "is nodemesh installed? (nodemesh install)"
        )

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pump, args=(conn,), daemon=True).start()

    def _pump(self, conn: socket.socket) -> None:
        from kubernetes.stream import portforward

        try:
            forward = portforward(
                self._core.connect_get_namespaced_pod_portforward, self.pod, CONTROLLER_NAMESPACE,
                ports=str(self._remote_port),
            )
            remote = forward.socket(self._remote_port)
        except Exception as exc:  # noqa: BLE001 - the grpc call reports UNAVAILABLE to the user
            log.debug("event=portforward_failed pod=%s error=%r", self.pod, exc)
            conn.close()
            return
        try:
            _splice(conn, remote)
        finally:
            conn.close()
            remote.close()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()


def _splice(a: Any, b: Any) -> None:
    """Copy bytes both ways until either side closes."""
    peers = {a: b, b: a}
    while True:
        readable, _, _ = select.select(list(peers), [], [], 1.0)
        for sock in readable:
            try:
                data = sock.recv(65536)
                if not data:
                    return
                peers[sock].sendall(data)
            except OSError:  # a reset on either side ends the tunnel; grpc reconnects if it must
                return


# ---------------------------------------------------------------------------- the connection


class Controller:
    """An open connection to the controller's gRPC API with the caller's credentials."""

    def __init__(self, target: Target, config: ClientConfig, forward: KubePortForward | None = None) -> None:
        self.target = target
        self.config = config
        self._forward = forward
        self.channel = grpc.insecure_channel(target.address, options=GRPC_CHANNEL_OPTIONS)
        self.stub = pb_grpc.ControllerStub(self.channel)
        token = config.token or target.token
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        self.channel.close()
        if self._forward is not None:
            self._forward.close()

    def unary(self, method: str, request: Any) -> Any:
        """Call a unary RPC; transport and server failures become one CliError line."""
        rpc = getattr(self.stub, method)
        try:
            return rpc(request, timeout=self.config.timeout_s, metadata=self.metadata, wait_for_ready=False)
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def stream(self, method: str, request: Any) -> Any:
        """Start a server-streaming RPC (no deadline: a tap runs until Ctrl-C)."""
        return getattr(self.stub, method)(request, metadata=self.metadata)

    def error(self, exc: grpc.RpcError) -> CliError:
        code = exc.code() if hasattr(exc, "code") else None
        details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return CliError(
                f"cannot reach the controller at {self.target.address} ({self.target.origin}): {details}"
            )
        if code == grpc.StatusCode.UNAUTHENTICATED:
            hint = "" if "--token-file" in details else " (check NODEMESH_TOKEN/--token-file)"
            return CliError(f"the controller refused our credentials: {details}{hint}")
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return CliError(f"the controller refused this call: {details}")
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                    grpc.StatusCode.FAILED_PRECONDITION):
            return CliError(details)  # the controller's words about what we asked
        name = code.name if code is not None else "ERROR"
        return CliError(f"controller error ({name}): {details}")


@contextlib.contextmanager
def connect(config: ClientConfig) -> Iterator[Controller]:
    target = resolve_target(config)
    forward = None
    if target is None:
        forward = KubePortForward()
        target = Target(forward.address, f"port-forward to pod {CONTROLLER_NAMESPACE}/{forward.pod}")
    controller = Controller(target, config, forward)
    try:
        yield controller
    finally:
        controller.close()
