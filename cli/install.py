"""`nodemesh install` / `nodemesh uninstall`: print the manifests for kubectl, or act on the sandbox.

    nodemesh install | kubectl apply -f -
    nodemesh install --set image=registry.example/nodemesh:0.1.0 --set opaquePorts=3306,5432 | kubectl apply -f -
    nodemesh install --addon prometheus | kubectl apply -f -
    nodemesh uninstall | kubectl delete -f -

With `--sandbox` the local network-namespace cluster is changed instead (nodemesh.manifests.sandbox_install).
"""

from __future__ import annotations

import click
from nodemesh.manifests.render import InstallValues, ManifestError, apply_sets, render_daemonset

ADDONS = ("prometheus", "grafana")


def _values(sets: tuple[str, ...]) -> InstallValues:
    try:
        return apply_sets(InstallValues(), sets)
    except ManifestError as exc:
        raise click.BadParameter(str(exc), param_hint="--set") from None


def _render(values: InstallValues, addon: str | None) -> str:
    if addon is None:
        return render_daemonset(values)
    # Imported here: the dashboards are only built when someone asks for them.
    from nodemesh.manifests import observability

    return observability.render_addon(addon, values.namespace, values.controllerTls)


_set_option = click.option(
    "--set", "sets", multiple=True, metavar="KEY=VALUE",
    help="Override a value (repeatable): image, namespace, imagePullPolicy, agentWorkers, logLevel, "
         "capturedNamespaces, excludedNamespaces, skippedPorts, opaquePorts, tapMaxRps, tapMaxTaps, tapRedactHeaders, tapShowHeaders, tapRedactQuery, "
         "drainGraceSeconds, prometheusUrl, statBackend, controllerTls (default true: TLS on the controller's ports), "
         "mtls, mtlsRequiredNamespaces. Lists are comma-separated.",
)
_addon_option = click.option(
    "--addon", type=click.Choice(ADDONS), default=None,
    help="Print an optional add-on instead of the mesh (Prometheus scraping the agents, Grafana dashboards).",
)
_sandbox_option = click.option("--sandbox", is_flag=True, help="Act on the local sandbox cluster instead.")
_name_option = click.option("--name", default=None, help="Sandbox cluster name (with --sandbox).")
_as_pods_option = click.option(
    "--as-pods", is_flag=True,
    help="With --sandbox: apply these manifests to the sandbox and let its kubelet run them (controller "
         "pod, agent DaemonSet, the sandbox's API server), as on Kubernetes, instead of node processes.")

_mtls_option = click.option(
    "--mtls", is_flag=True,
    help="Cross-node pod traffic agent to agent over mTLS with the pods' workload certificates (opt-in; "
         "docs/architecture.md). Same as --set mtls=true; with --sandbox, node processes only.")


@click.command()
@_set_option
@_addon_option
@_sandbox_option
@_name_option
@_as_pods_option
@_mtls_option
@click.option("--capture", type=click.Choice(("iptables", "ebpf")), default="iptables",
              help="Outbound capture: iptables nat rules (default), or eBPF cgroup/connect4 programs "
                   "(bcc; falls back to iptables where the node cannot run them). Same as --set capture=.")
@click.option("--accelerate", type=click.Choice(("none", "sockmap")), default="none",
              help="sockmap: the pod<->agent hop on a node goes socket to socket (sock_ops + sk_msg), "
                   "opt-in: docs/bench.md has the figures, docs/redirector.md the caveats. Same as --set accelerate=.")
def install(sets: tuple[str, ...], addon: str | None, sandbox: bool, name: str | None, as_pods: bool,
            mtls: bool, capture: str, accelerate: str) -> None:
    """Print the Kubernetes manifests that install nodemesh (pipe them to `kubectl apply -f -`)."""
    if capture != "iptables":
        sets = (*sets, f"capture={capture}")
    if accelerate != "none":
        sets = (*sets, f"accelerate={accelerate}")
    values = _values(sets)
    if as_pods and not sandbox:
        raise click.UsageError("--as-pods goes with --sandbox")
    if mtls and as_pods:
        raise click.UsageError("--mtls goes with --sandbox (node processes) in this version, not --as-pods")
    if mtls and not sandbox:
        sets = (*sets, "mtls=true")
        values = _values(sets)
    if sandbox:
        from nodemesh.manifests.sandbox_install import install_sandbox

        address = install_sandbox(name=name, as_pods=as_pods, sets=sets, mtls=mtls, capture=values.capture,
                                  accelerate=values.accelerate)
        click.echo(f"nodemesh installed on the sandbox; controller at {address}")
        return
    click.echo(_render(values, addon), nl=False)


@click.command()
@_set_option
@_addon_option
@_sandbox_option
@_name_option
def uninstall(sets: tuple[str, ...], addon: str | None, sandbox: bool, name: str | None) -> None:
    """Print the manifests to delete (pipe them to `kubectl delete -f -`).

    Deleting the DaemonSet stops every agent; each redirector removes its node's capture rules
    as it stops, so pod traffic flows directly again.
    """
    values = _values(sets)
    if sandbox:
        from nodemesh.manifests.sandbox_install import uninstall_sandbox

        uninstall_sandbox(name=name)
        return
    click.echo(_render(values, addon), nl=False)
