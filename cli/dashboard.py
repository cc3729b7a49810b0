"""`nodemesh dashboard`: open the controller's web dashboard (port 8084), or print its URL.

Where the dashboard is: the controller every verb would talk to (cli/client.py: `--controller`,
`--sandbox`, `--context`, NODEMESH_CONTROLLER, NODEMESH_SANDBOX, the current kube context, else the
running sandbox), on the web port 8084 — or, in a sandbox, the `dashboard.addr` file beside
`controller.addr` when the installer wrote one. Through a kube context it port-forwards a local
port to the controller pod's 8084 through the Kubernetes API, and keeps forwarding until Ctrl-C.
A controller reached directly whose web port speaks TLS (a CA is known for it: the sandbox's
`controller-ca.crt`, NODEMESH_CONTROLLER_CA) gets the same local forward, originating TLS verified
with that CA: the browser always talks plain HTTP to 127.0.0.1 and never meets a certificate it
cannot verify.
"""

from __future__ import annotations

import time
import webbrowser
from urllib.parse import quote

import click
from nodemesh.api.model import CONTROLLER_WEB_PORT, SelectorError, parse_selector
from nodemesh.cli.client import (
    CONTROLLER_NAMESPACE,
    ClientConfig,
    CliError,
    KubePortForward,
    LocalForward,
    Target,
    TlsForward,
    ca_context,
    controller_options,
    hostport,
    parse_hostport,
    resolve_target,
    speaks_tls,
)
from nodemesh.manifests.sandboxfiles import DASHBOARD_ADDR_FILE

DEFAULT_LOCAL_PORT = 50750  # Linkerd's `viz dashboard` port: a stable URL across runs


def _url(host: str, port: int, fragment: str, token: str | None = None) -> str:
    """The page's URL; with a token, through /login, which checks it and keeps it in an HttpOnly
    cookie for the page and its API calls (controlplane/webauth.py). The #fragment survives the
    redirect."""
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if token:
        return f"http://{netloc}/login?token={quote(token, safe='')}{fragment}"
    return f"http://{netloc}/{fragment}"


def web_address(target: Target) -> tuple[str, int, str]:
    """(host, port, where it came from) of the web port of a controller reached directly (not
    through a kube context)."""
    assert target.address is not None
    if target.sandbox_dir is not None:
        side = target.sandbox_dir / DASHBOARD_ADDR_FILE
        if side.is_file():
            host, port = parse_hostport(side.read_text(), str(side))
            return host, port, f"sandbox state {side}"
    host, _ = parse_hostport(target.address, target.origin)
    return host, CONTROLLER_WEB_PORT, target.origin


def dashboard_url(target: Target, config: ClientConfig, fragment: str = "") -> tuple[str, str]:
    """(URL, where it came from) of a controller reached directly whose web port is plain HTTP."""
    host, port, origin = web_address(target)
    return _url(host, port, fragment, config.token or target.token), origin


def workload_fragment(resource: str | None, namespace: str) -> str:
    if not resource:
        return ""
    try:
        sel = parse_selector(resource)
    except SelectorError as exc:
        raise CliError(str(exc)) from None
    if not sel.name or sel.type in ("all", "namespace"):
        raise CliError(f"dashboard takes a workload TYPE/NAME (e.g. deploy/web), got {resource!r}")
    return "#/workload/" + "/".join(quote(p, safe="") for p in (namespace, sel.type, sel.name))


@click.command("dashboard")
@click.argument("resource", required=False, metavar="[TYPE/NAME]")
@click.option("-n", "--namespace", default="default", show_default=True, help="Namespace of TYPE/NAME.")
@click.option("--show", type=click.Choice(["browser", "url"]), default="browser", show_default=True,
              help="Open the dashboard in a browser, or only print its URL.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_LOCAL_PORT, show_default=True,
              help="Local port of the port-forward (Kubernetes only; 0 picks a free one).")
@controller_options
def dashboard(resource: str | None, namespace: str, show: str, port: int, client: ClientConfig) -> None:
    """Open the nodemesh web dashboard (optionally at a workload's page: deploy/web -n emojivoto).

    In a sandbox or with --controller the dashboard is reached directly; in a cluster the command
    port-forwards to the controller pod's port 8084 and keeps running until Ctrl-C.
    """
    fragment = workload_fragment(resource, namespace)
    target = resolve_target(client)
    forward: LocalForward
    ca = client.ca_file or target.ca
    try:
        if target.kube is not None:
            # The pod's web port speaks TLS (its own CA, the ConfigMap): the forward originates it,
            # so the browser talks plain HTTP to 127.0.0.1 only.
            forward = KubePortForward(target.kube, remote_port=CONTROLLER_WEB_PORT, local_port=port,
                                      originate_tls=True)
            where = f"pod {CONTROLLER_NAMESPACE}/{forward.pod}:{CONTROLLER_WEB_PORT} (kube context {target.kube.name})"
        else:
            host, web_port, _ = web_address(target)
            tls = ca_context(ca, None if client.ca_file else target.ca_pem) \
                if ca is not None or target.ca_pem is not None else None
            name = target.server_name or host
            if tls is None or not speaks_tls((host, web_port), tls, name):
                # No CA known, or the CA is the gRPC port's only (a node-process sandbox serves
                # the web port in plain HTTP): the URL as it is.
                _present(dashboard_url(target, client, fragment)[0], show)
                return
            # The web port speaks TLS with the controller's own CA (a sandbox installed with
            # controllerTls=true, NODEMESH_CONTROLLER_CA): the same local forward as a cluster's,
            # so no browser is shown a certificate it cannot verify.
            forward = TlsForward((host, web_port), tls, name, local_port=port)
            where = f"{hostport(host, web_port)} over TLS verified with {ca or 'the published CA'}"
    except OSError as exc:
        raise CliError(f"cannot listen on 127.0.0.1:{port} for the port-forward: {exc.strerror} "
                       "(choose another with --port)") from None
    host, local = parse_hostport(forward.address, "port-forward")
    try:
        _present(_url(host, local, fragment, client.token or target.token), show)
        click.echo(f"Forwarding to {where}; press Ctrl-C to stop.", err=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        forward.close()


def _present(url: str, show: str) -> None:
    if show == "url":
        click.echo(url)
        return
    click.echo(f"nodemesh dashboard available at:\n{url}", err=True)
    if not webbrowser.open(url):
        click.echo("no browser could be started: open the URL above yourself", err=True)
