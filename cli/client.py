"""Finding the controller and talking to it.

Which cluster, explicit before implicit (kubectl's rules for Kubernetes, cli/kubecontext.py):

1. a flag: `--controller HOST:PORT`, `--sandbox` (the local sandbox) or `--context NAME` (a kube
   context) — at most one of them;
2. the environment: `NODEMESH_CONTROLLER`, then `NODEMESH_SANDBOX` (names the sandbox cluster);
3. the current kube context (`--kubeconfig`, `$KUBECONFIG` as a list of files, `~/.kube/config`):
   a port-forward through the Kubernetes API to the controller pod;
4. only when there is no kube context at all: the running sandbox
   (`<sandbox root>/<cluster>/controller.addr`, written by `nodemesh install --sandbox`).

A sandbox running on the same machine never overrides the kube context: that picked the wrong
cluster on a real machine (issue 11). Every failure a user can cause or meet becomes one
`Error: ...` line and exit 1 (click's ClickException), never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc
from nodemesh.api import channel
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.api.model import CONTROLLER_GRPC_PORT
from nodemesh.cli.kubecontext import KubeConfigError, KubeContext, current_context
from nodemesh.manifests.sandboxfiles import (
    CONTROLLER_ADDR_FILE,
    first_token,
    hostport,
    sandbox_ca,
    sandbox_server_name,
)
from nodemesh.manifests.sandboxfiles import TOKEN_FILE as CONTROLLER_TOKEN_FILE

log = logging.getLogger("nodemesh.cli")

DEFAULT_SANDBOX_ROOT = Path("/run/nodemesh/sandbox")
DEFAULT_SANDBOX = "nodemesh"  # nodemesh.sandbox.naming.DEFAULT_CLUSTER (not imported: pyroute2 is heavy)
CONTROLLER_NAMESPACE = "nodemesh"
CONTROLLER_LABEL = "app=nodemesh-controller"
# manifests/render.py CONTROLLER_CA_CONFIGMAP / CONTROLLER_NAME: where the controller publishes its
# CA, and the Service whose name its certificate carries (controlplane/servingtls.py).
CONTROLLER_CA_CONFIGMAP = "nodemesh-controller-ca"
CONTROLLER_SERVICE_NAME = f"nodemesh-controller.{CONTROLLER_NAMESPACE}.svc"
DEFAULT_TIMEOUT_S = 10.0

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class CliError(click.ClickException):
    """A user-facing failure: click prints `Error: <message>` on stderr and exits 1."""


# ---------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """How the CLI reaches the controller; built once per command from flags and environment."""

    controller: str | None = None     # --controller: this address
    token: str | None = None          # bearer token (NODEMESH_TOKEN or --token-file)
    sandbox_root: Path = DEFAULT_SANDBOX_ROOT
    use_sandbox: bool = False         # --sandbox: the local sandbox's controller
    context: str | None = None        # --context: this kube context
    kubeconfig: str | None = None     # --kubeconfig: this file instead of $KUBECONFIG / ~/.kube/config
    env_controller: str | None = None  # NODEMESH_CONTROLLER
    env_sandbox: str | None = None     # NODEMESH_SANDBOX: the sandbox, and which cluster
    kube_env: tuple[tuple[str, str], ...] = ()   # KUBECONFIG and HOME, as the command saw them
    timeout_s: float = DEFAULT_TIMEOUT_S
    ca_file: str | None = None        # NODEMESH_CONTROLLER_CA: speak TLS, verify the controller with it

    @classmethod
    def from_cli(
        cls, controller: str | None, token_file: str | None, env: Mapping[str, str] | None = None, *,
        use_sandbox: bool = False, context: str | None = None, kubeconfig: str | None = None,
    ) -> ClientConfig:
        env = os.environ if env is None else env
        chosen = [flag for flag, given in (("--controller", controller), ("--sandbox", use_sandbox),
                                           ("--context", context)) if given]
        if len(chosen) > 1:
            raise CliError(f"{' and '.join(chosen)} name different clusters: pass only one")
        token = env.get("NODEMESH_TOKEN") or None
        if token_file:
            try:
                token = first_token(Path(token_file).read_text())
            except OSError as exc:
                raise CliError(f"cannot read token file {token_file}: {exc.strerror}") from None
        return cls(
            controller=controller or None,
            token=token,
            sandbox_root=Path(env.get("NODEMESH_SANDBOX_ROOT") or DEFAULT_SANDBOX_ROOT),
            use_sandbox=use_sandbox, context=context or None, kubeconfig=kubeconfig or None,
            env_controller=env.get("NODEMESH_CONTROLLER") or None,
            env_sandbox=env.get("NODEMESH_SANDBOX") or None,
            kube_env=tuple((k, env[k]) for k in ("KUBECONFIG", "HOME") if env.get(k)),
            ca_file=env.get("NODEMESH_CONTROLLER_CA") or None,
        )


# stat, edges and routes: which store answers (controlplane/promstore.py); unset, the controller's default.
backend_option = click.option(
    "--backend", type=click.Choice(("memory", "prometheus")), default=None,
    help="Answer from the controller's memory or from Prometheus (PromQL over the agents' metrics; "
         "needs a controller started with --prometheus-url). Default: the controller's --stat-backend.")


def controller_options(func: F) -> F:
    """The flags that choose the cluster (and the credentials) for every verb that talks to the
    controller; the command receives them as one `client: ClientConfig`."""

    @functools.wraps(func)
    def command(*args: Any, controller: str | None, sandbox: bool, context: str | None,
                kubeconfig: str | None, token_file: str | None, **kwargs: Any) -> Any:
        client = ClientConfig.from_cli(controller, token_file, use_sandbox=sandbox, context=context,
                                       kubeconfig=kubeconfig)
        return func(*args, client=client, **kwargs)

    for option in reversed((
        click.option("--context", default=None, metavar="NAME",
                     help="Kube context to use (default: the kubeconfig's current-context)."),
        click.option("--kubeconfig", default=None, metavar="FILE",
                     help="Kubeconfig file (default: $KUBECONFIG, a list of files, else ~/.kube/config)."),
        click.option("--sandbox", is_flag=True, default=False,
                     help="Talk to the local sandbox's controller (NODEMESH_SANDBOX names the cluster)."),
        click.option("--controller", default=None, metavar="HOST:PORT",
                     help="Controller gRPC address (else NODEMESH_CONTROLLER, NODEMESH_SANDBOX, the "
                          "current kube context, or the sandbox when there is no kube context)."),
        click.option("--token-file", type=click.Path(dir_okay=False), default=None,
                     help="File holding a bearer token sent to the controller (else NODEMESH_TOKEN)."),
    )):
        command = option(command)
    return command  # type: ignore[return-value]


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
        raise CliError(f"several sandboxes are running ({names}): set NODEMESH_SANDBOX=NAME or pass --controller")
    return found[0] if found else None


@dataclass(frozen=True, slots=True)
class Target:
    """Where the controller is, and how we learned it (named in errors)."""

    address: str | None  # host:port for grpc; None until a kube port-forward is open
    origin: str
    token: str | None = None  # the sandbox's own token, used when the user gave none
    sandbox_dir: Path | None = None      # a sandbox's state directory
    kube: KubeContext | None = None      # reach it through this kube context
    ca: Path | None = None               # the sandbox controller's CA (TLS), when it has one
    ca_pem: bytes | None = None          # the CA the cluster publishes (ConfigMap), port-forward path
    server_name: str | None = None       # the name the controller's certificate carries, when not the address


NO_CLUSTER_HINT = ("use --context NAME (or `kubectl config use-context NAME`), --sandbox after "
                   "`nodemesh install --sandbox`, or --controller HOST:PORT")


def resolve_target(config: ClientConfig) -> Target:
    """The controller's cluster, explicit choices first (see the module docstring)."""
    if config.controller:
        return _direct(config.controller, "--controller")
    if config.use_sandbox:
        return _sandbox_target(config, config.env_sandbox, "--sandbox")
    if config.context:
        return Target(None, f"kube context {config.context}", kube=_kube_context(config))
    if config.env_controller:
        return _direct(config.env_controller, "NODEMESH_CONTROLLER")
    if config.env_sandbox:
        return _sandbox_target(config, config.env_sandbox, f"NODEMESH_SANDBOX={config.env_sandbox}")
    kube = _kube_context(config)
    if kube is not None:
        return Target(None, f"kube context {kube.name}", kube=kube)
    path = sandbox_address_file(config.sandbox_root, None)
    if path is not None:
        return _sandbox_at(path, "no kube context")
    raise CliError(f"no cluster to talk to: no kube context ({_kube_where(config)}) and no sandbox "
                   f"running ({config.sandbox_root}): {NO_CLUSTER_HINT}")


def _direct(address: str, origin: str) -> Target:
    host, port = parse_hostport(address, origin)
    return Target(hostport(host, port), origin)


def _kube_context(config: ClientConfig) -> KubeContext | None:
    try:
        return current_context(config.kubeconfig, config.context, dict(config.kube_env))
    except KubeConfigError as exc:
        raise CliError(str(exc)) from None


def _kube_where(config: ClientConfig) -> str:
    env = dict(config.kube_env)
    if config.kubeconfig:
        return f"--kubeconfig {config.kubeconfig} has no current-context"
    if env.get("KUBECONFIG"):
        return f"KUBECONFIG={env['KUBECONFIG']} sets no current-context"
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    default = home / ".kube" / "config"
    return f"{default} has no current-context" if default.is_file() else f"no {default}"


def _sandbox_target(config: ClientConfig, cluster: str | None, asked_by: str) -> Target:
    path = sandbox_address_file(config.sandbox_root, cluster)
    if path is None:
        which = f"sandbox {cluster!r}" if cluster else "a sandbox"
        raise CliError(f"{asked_by}: {which} has no controller under {config.sandbox_root}: start one with "
                       "`nodemesh sandbox up` and `nodemesh install --sandbox`")
    return _sandbox_at(path, asked_by)


def _sandbox_at(path: Path, why: str) -> Target:
    try:
        text = path.read_text()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    host, port = parse_hostport(text, str(path))
    return Target(hostport(host, port), f"sandbox state {path}; {why}", _sandbox_token(path.parent),
                  sandbox_dir=path.parent, ca=sandbox_ca(path.parent), server_name=sandbox_server_name(path.parent))


def _sandbox_token(state_dir: Path) -> str | None:
    """The token `nodemesh install --sandbox` gave its controller; None if absent or unreadable
    (the controller then says what is missing)."""
    try:
        return first_token((state_dir / CONTROLLER_TOKEN_FILE).read_text()) or None
    except OSError:
        return None


# ---------------------------------------------------------------------------- Kubernetes port-forward


class LocalForward:
    """A local TCP listener on 127.0.0.1 whose connections are each carried to the controller by
    `_remote()` (a subclass's), optionally wrapped in TLS verified with `tls` under `server_name`:
    the local side stays plain for a browser or grpc on loopback only."""

    def __init__(self, local_port: int, tls: ssl.SSLContext | None, server_name: str | None) -> None:
        self._tls = tls
        self._server_name = server_name
        self._listener = socket.create_server(("127.0.0.1", local_port))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = threading.Event()
        threading.Thread(target=self._accept_loop, name="nodemesh-forward", daemon=True).start()

    def _remote(self) -> Any:
        raise NotImplementedError

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pump, args=(conn,), daemon=True).start()

    def _pump(self, conn: socket.socket) -> None:
        try:
            remote = self._remote()
            if self._tls is not None:
                remote.settimeout(DEFAULT_TIMEOUT_S)
                remote = self._tls.wrap_socket(remote, server_hostname=self._server_name)
                remote.settimeout(None)
        except Exception as exc:  # noqa: BLE001 - the client (grpc, the browser) sees the close
            log.debug("event=forward_failed to=%s error=%r", self, exc)
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


class TlsForward(LocalForward):
    """The dashboard of a controller reached directly (a sandbox, --controller) whose web port
    speaks TLS with its own CA: the browser talks plain HTTP to 127.0.0.1, each connection goes on
    as TLS to `target`, verified with the CA the CLI already trusts (never a browser warning to
    click through, never an unverified hop off the machine)."""

    def __init__(self, target: tuple[str, int], tls: ssl.SSLContext, server_name: str, local_port: int = 0) -> None:
        self._target = target
        super().__init__(local_port, tls, server_name)

    def _remote(self) -> Any:
        return socket.create_connection(self._target, timeout=DEFAULT_TIMEOUT_S)

    def __str__(self) -> str:
        return hostport(*self._target)


def ca_context(ca: str | Path | None, ca_pem: bytes | None) -> ssl.SSLContext:
    """A client TLS context trusting the controller's CA (PEM bytes, else the file)."""
    try:
        return (ssl.create_default_context(cadata=ca_pem.decode()) if ca_pem is not None
                else ssl.create_default_context(cafile=str(ca)))
    except OSError as exc:
        raise CliError(f"cannot read the controller's CA {ca}: {exc.strerror}") from None


def speaks_tls(target: tuple[str, int], tls: ssl.SSLContext, server_name: str) -> bool:
    """Does `target` answer a TLS handshake (verified with `tls`)? False when it answers in plain
    HTTP (a ClientHello gets a 400: a sandbox whose controller serves gRPC over TLS and the web
    port without) or cannot be reached (the URL is printed as is; the browser says why). A TLS
    server whose certificate `tls` does not verify is an error, never a reason to drop to HTTP."""
    try:
        with socket.create_connection(target, timeout=DEFAULT_TIMEOUT_S) as raw, \
                tls.wrap_socket(raw, server_hostname=server_name):
            return True
    except ssl.SSLCertVerificationError as exc:
        raise CliError(f"the dashboard at {hostport(*target)} presents a certificate the controller's CA does not "
                       f"verify: {exc.verify_message}") from None
    except (ssl.SSLError, OSError):
        return False


class KubePortForward(LocalForward):
    """A local TCP listener on 127.0.0.1 whose connections are tunnelled to the controller pod's
    gRPC port through the Kubernetes API (what `kubectl port-forward` does), so grpc can dial it."""

    def __init__(self, context: KubeContext, remote_port: int = CONTROLLER_GRPC_PORT, local_port: int = 0,
                 originate_tls: bool = False) -> None:
        """`originate_tls` (the dashboard): the local side stays plain HTTP for the browser, and each
        tunnelled connection speaks TLS to the pod, verified with the published CA under the
        Service's name (nothing changes when the install has no controller TLS)."""
        try:
            from kubernetes import client, config  # heavy import: only on this path
        except ImportError as exc:  # pragma: no cover - kubernetes is a hard dependency
            raise CliError(f"kubernetes client unavailable: {exc}") from None
        self.context = context
        try:
            # The context by name: the client's loader must not pick its own current-context.
            api = config.new_client_from_config(config_file=context.config_file, context=context.name)
        except Exception as exc:  # noqa: BLE001 - any kubeconfig problem is one user-facing line
            raise CliError(f"kube context {context.name}: cannot use it ({_one_line(exc)})") from None
        self._core = client.CoreV1Api(api)
        self._remote_port = remote_port
        self.pod = self._find_pod()
        tls: ssl.SSLContext | None = None
        if originate_tls and (pem := self.controller_ca()) is not None:
            tls = ssl.create_default_context(cadata=pem.decode())
        super().__init__(local_port, tls, CONTROLLER_SERVICE_NAME)

    def _find_pod(self) -> str:
        where = f"kube context {self.context.name} ({self.context.server})"
        try:
            pods = self._core.list_namespaced_pod(CONTROLLER_NAMESPACE, label_selector=CONTROLLER_LABEL,
                                                  _request_timeout=DEFAULT_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - API errors become one line
            raise CliError(f"cannot list controller pods in namespace {CONTROLLER_NAMESPACE} of {where}: "
                           f"{_one_line(exc)}") from None
        for pod in pods.items:
            if pod.status and pod.status.phase == "Running" and pod.metadata:
                return str(pod.metadata.name)
        raise CliError(
            f"no running controller pod ({CONTROLLER_LABEL}) in namespace {CONTROLLER_NAMESPACE} of {where}: "
            "is nodemesh installed there? (nodemesh install | kubectl apply -f -; for the local sandbox: --sandbox)"
        )

    def controller_ca(self) -> bytes | None:
        """The controller's CA certificate from the ConfigMap it publishes (servingtls.py); None
        when the install runs without TLS (no ConfigMap). Published but still empty (the controller
        has not started yet) or unreadable: one line saying so."""
        return published_controller_ca(self._core, f"kube context {self.context.name}")

    def _remote(self) -> Any:
        from kubernetes.stream import portforward

        forward = portforward(
            self._core.connect_get_namespaced_pod_portforward, self.pod, CONTROLLER_NAMESPACE,
            ports=str(self._remote_port),
        )
        return forward.socket(self._remote_port)

    def __str__(self) -> str:
        return f"pod {CONTROLLER_NAMESPACE}/{self.pod}:{self._remote_port}"


def published_controller_ca(core: Any, where: str) -> bytes | None:
    """`ca.crt` of ConfigMap nodemesh-controller-ca through `core` (a CoreV1Api); see
    KubePortForward.controller_ca."""
    from kubernetes.client import ApiException

    name = f"configmap {CONTROLLER_NAMESPACE}/{CONTROLLER_CA_CONFIGMAP}"
    try:
        cm = core.read_namespaced_config_map(CONTROLLER_CA_CONFIGMAP, CONTROLLER_NAMESPACE,
                                             _request_timeout=DEFAULT_TIMEOUT_S)
    except ApiException as exc:
        if exc.status == 404:
            return None  # installed with controllerTls=false: plaintext, as before
        raise CliError(f"cannot read the controller's CA ({name} of {where}): {_one_line(exc)} "
                       "(or set NODEMESH_CONTROLLER_CA to its file)") from None
    except Exception as exc:  # noqa: BLE001 - any transport error is one line
        raise CliError(f"cannot read the controller's CA ({name} of {where}): {_one_line(exc)}") from None
    pem = (cm.data or {}).get("ca.crt", "")
    if "BEGIN CERTIFICATE" not in pem:
        raise CliError(f"the controller has not published its CA yet ({name} of {where} has no ca.crt): "
                       "is the controller running? (kubectl -n nodemesh logs deploy/nodemesh-controller)")
    return str(pem).encode()


def _one_line(exc: BaseException) -> str:
    """An exception from the kubernetes client as one short line (ApiException's str has headers)."""
    status, reason = getattr(exc, "status", None), getattr(exc, "reason", None)
    if status and reason:
        return f"{status} {reason}"
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _splice(a: Any, b: Any) -> None:
    """Copy bytes both ways until either side closes. A TLS side (the dashboard's forward) is read
    without blocking: a readable TLS socket may carry only TLS housekeeping (TLS 1.3 session tickets),
    and a blocking read would then wait for data while the other direction stalls behind it."""
    peers = {a: b, b: a}
    while True:
        # A TLS side may hold decrypted bytes its socket no longer signals: read those first.
        readable = [s for s in peers if isinstance(s, ssl.SSLSocket) and s.pending()]
        if not readable:
            readable, _, _ = select.select(list(peers), [], [], 1.0)
        for sock in readable:
            try:
                data = _recv(sock)
                if data is None:
                    continue
                if not data:
                    return
                peers[sock].sendall(data)
            except OSError:  # a reset on either side ends the tunnel; grpc reconnects if it must
                return


def _recv(sock: Any) -> bytes | None:
    """What `sock` has (b"": closed); None: a TLS socket had no application data yet."""
    if not isinstance(sock, ssl.SSLSocket):
        return bytes(sock.recv(65536))
    sock.setblocking(False)
    try:
        return sock.recv(65536)
    except ssl.SSLWantReadError:
        return None
    finally:
        sock.setblocking(True)  # sendall to it blocks as a plain socket's does


# ---------------------------------------------------------------------------- the connection


def controller_channel(address: str, ca: str | Path | None, server_name: str | None = None,
                       roots: bytes | None = None) -> grpc.Channel:
    """api/channel.py's channel, an unreadable CA one user-facing line."""
    try:
        return channel.controller_channel(address, ca, server_name, roots)
    except OSError as exc:
        raise CliError(f"cannot read the controller's CA {ca}: {exc.strerror}") from None


class Controller:
    """An open connection to the controller's gRPC API with the caller's credentials."""

    def __init__(self, target: Target, config: ClientConfig, forward: KubePortForward | None = None) -> None:
        self.target = target
        self.config = config
        self._forward = forward
        assert target.address is not None, "a kube target is connected through its port-forward first"
        # NODEMESH_CONTROLLER_CA wins over the CA the sandbox or the cluster publishes.
        self.channel = controller_channel(target.address, config.ca_file or target.ca, target.server_name,
                                          None if config.ca_file else target.ca_pem)
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
            if self.target.kube is not None and not (self.config.token or self.target.token):
                hint = (" (get a token: export NODEMESH_TOKEN=$(kubectl -n nodemesh create token nodemesh-cli "
                        "--audience nodemesh-controller))")
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
    if target.kube is not None:
        forward = KubePortForward(target.kube)
        # TLS through the tunnel too, verified under the Service's name (the certificate does not
        # name 127.0.0.1); the CA from the cluster unless NODEMESH_CONTROLLER_CA names one.
        try:
            ca_pem = None if config.ca_file else forward.controller_ca()
        except CliError:
            forward.close()
            raise
        target = replace(target, address=forward.address, ca_pem=ca_pem,
                         server_name=CONTROLLER_SERVICE_NAME if (ca_pem or config.ca_file) else None,
                         origin=f"port-forward to pod {CONTROLLER_NAMESPACE}/{forward.pod}, "
                                f"kube context {target.kube.name}")
    controller = Controller(target, config, forward)
    try:
        yield controller
    finally:
        controller.close()
