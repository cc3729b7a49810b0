"""`nodemesh sandbox ...`: a local cluster made of network namespaces (see docs/sandbox.md)."""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

name_option = click.option("--name", "name", default="nodemesh", show_default=True, envvar="NODEMESH_SANDBOX",
                           help="Sandbox cluster name (1-12 lowercase letters/digits).")


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _sandbox(name: str) -> Any:
    from nodemesh.sandbox.cluster import Sandbox
    from nodemesh.sandbox.naming import NameError_

    try:
        return Sandbox(name)
    except NameError_ as exc:
        _fail(str(exc))


def handles_errors(fn: Callable[..., None]) -> Callable[..., None]:
    """One clear line on stderr and exit 1 for every error the user can cause."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        from nodemesh.sandbox.cluster import SandboxError
        from nodemesh.sandbox.manifests import ManifestError

        if os.geteuid() != 0:
            _fail("the sandbox needs root (it creates network namespaces)")
        try:
            fn(*args, **kwargs)
        except (ManifestError, SandboxError, TimeoutError) as exc:
            _fail(str(exc))

    return wrapper


@click.group()
def sandbox() -> None:
    """A local cluster of network namespaces that runs Kubernetes manifests."""


@sandbox.command()
@click.option("--nodes", default=2, show_default=True, type=click.IntRange(1, 16))
@click.option("--cni", type=click.Choice(["bridge", "routed"]), default="bridge", show_default=True,
              help="bridge: pods on a Linux bridge (flannel cni0); routed: /32 routes + proxy ARP (Calico).")
@click.option("--iptables", "iptables", default=None, metavar="nft|legacy|NODE=BACKEND,...",
              help="each node's iptables backend, where its kube-proxy rules live (default: what `iptables` "
                   "on this machine is); e.g. node2=legacy")
@name_option
@handles_errors
def up(nodes: int, cni: str, iptables: str | None, name: str) -> None:
    """Create the sandbox (nothing happens if it is already up)."""
    sb = _sandbox(name)
    backends: str | dict[str, str] | None = iptables
    if iptables and "=" in iptables:
        backends = dict(item.split("=", 1) for item in iptables.split(",") if item)
    if sb.up(nodes=nodes, cni=cni, iptables=backends):
        click.echo(f"sandbox {name} up: {nodes} nodes, cni {cni}, host link {sb.host_link} {sb.host_ip}")
    else:
        st = sb.status()
        click.echo(f"sandbox {name} is already up ({len(st['nodes'])} nodes, cni {st['cni']})")


@sandbox.command()
@name_option
@handles_errors
def down(name: str) -> None:
    """Remove every namespace, link, process and file of the sandbox."""
    _sandbox(name).down()
    click.echo(f"sandbox {name} down")


@sandbox.command()
@name_option
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@handles_errors
def status(name: str, output: str) -> None:
    """Nodes, pods and supervisor of the sandbox."""
    st = _sandbox(name).status()
    if output == "json":
        click.echo(json.dumps(st, indent=2))
        return
    if st["phase"] == "absent":
        click.echo(f"sandbox {name}: not up")
        sys.exit(1)
    click.echo(f"sandbox {name}: {'up' if st['up'] else 'DEGRADED (' + st['phase'] + ')'}  cni={st['cni']}  "
               f"kubelet pid={st['kubelet_pid'] or '-'}  state={st['state_dir']}")
    click.echo(f"host link {st['host_link']} {st['host_ip']}")
    rows: list[tuple[str, ...]] = [("NODE", "NETNS", "INTERNAL-IP", "POD-CIDR", "BRIDGE")]
    rows += [(n["name"], n["netns"], n["ip"], n["pod_cidr"], n["bridge"] or "<none>") for n in st["nodes"]]
    _table(rows)
    click.echo(f"pods: {st['pods_ready']}/{st['pods']} ready")
    for pname, p in st["node_processes"].items():
        click.echo(f"node process {pname} on {p['node']}: pid={p['pid'] or '-'} restarts={p['restarts']}")


@sandbox.command()
@click.option("-f", "--filename", "path", required=True, help="Kubernetes YAML (multi-document).")
@name_option
@handles_errors
def apply(path: str, name: str) -> None:
    """Create or update the objects of a manifest file."""
    for line in _sandbox(name).apply(path):
        click.echo(line)


@sandbox.command()
@click.option("-f", "--filename", "path", required=True)
@click.option("--ignore-not-found", is_flag=True)
@name_option
@handles_errors
def delete(path: str, ignore_not_found: bool, name: str) -> None:
    """Delete the objects of a manifest file."""
    for line in _sandbox(name).delete(path, ignore_not_found=ignore_not_found):
        click.echo(line)


@sandbox.group()
def get() -> None:
    """Show recorded objects."""


@get.command("pods")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("-A", "--all-namespaces", "all_ns", is_flag=True)
@click.option("-o", "--output", type=click.Choice(["wide", "json"]), default=None)
@name_option
@handles_errors
def get_pods(namespace: str, all_ns: bool, output: str | None, name: str) -> None:
    """List pods like kubectl get pods."""
    sb = _sandbox(name)
    if not sb.exists():
        _fail(f"sandbox {name} is not up")
    pods = sb.pods(None if all_ns else namespace)
    if output == "json":
        click.echo(json.dumps({"apiVersion": "v1", "kind": "List", "items": pods,
                               "metadata": {"resourceVersion": ""}}, indent=4))
        return
    if not pods:
        click.echo("No resources found" + ("" if all_ns else f" in {namespace} namespace") + ".", err=True)
        return
    click.echo(render_pod_table(pods, wide=output == "wide", all_namespaces=all_ns))


def render_pod_table(pods: list[dict[str, Any]], wide: bool, all_namespaces: bool,
                     now: _dt.datetime | None = None) -> str:
    header = ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    if all_namespaces:
        header.insert(0, "NAMESPACE")
    if wide:
        header += ["IP", "NODE", "NOMINATED NODE", "READINESS GATES"]
    rows = [header]
    for p in pods:
        cs = p["status"].get("containerStatuses", [])
        row = [p["metadata"]["name"], f"{sum(1 for c in cs if c.get('ready'))}/{len(cs)}", pod_status_text(p),
               str(sum(c.get("restartCount", 0) for c in cs)),
               age(p["metadata"].get("creationTimestamp", ""), now)]
        if all_namespaces:
            row.insert(0, p["metadata"]["namespace"])
        if wide:
            row += [p["status"].get("podIP") or "<none>", p["spec"].get("nodeName") or "<none>", "<none>", "<none>"]
        rows.append(row)
    return _format(rows)


def pod_status_text(pod: dict[str, Any]) -> str:
    for c in pod["status"].get("containerStatuses", []):
        waiting = c.get("state", {}).get("waiting")
        if waiting and waiting.get("reason"):
            return str(waiting["reason"])
    return str(pod["status"].get("phase", "Unknown"))


def age(timestamp: str, now: _dt.datetime | None = None) -> str:
    try:
        created = _dt.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.UTC)
    except ValueError:
        return "<unknown>"
    secs = int(((now or _dt.datetime.now(_dt.UTC)) - created).total_seconds())
    secs = max(secs, 0)
    if secs < 120:
        return f"{secs}s"
    if secs < 600:
        return f"{secs // 60}m{secs % 60}s" if secs % 60 else f"{secs // 60}m"
    if secs < 3 * 3600:
        return f"{secs // 60}m"
    if secs < 48 * 3600:
        return f"{secs // 3600}h"
    return f"{secs // 86400}d"


def _format(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _table(rows: list[tuple[str, ...]]) -> None:
    click.echo(_format([list(r) for r in rows]))


@sandbox.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-n", "--namespace", default="default", show_default=True)
@name_option
@click.argument("pod")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
@handles_errors
def exec(namespace: str, name: str, pod: str, command: tuple[str, ...]) -> None:
    """Run a command inside a pod's network namespace: exec POD -- CMD..."""
    argv = list(command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        _fail("no command given (exec POD -- CMD...)")
    pns = _sandbox(name).pod_netns(namespace, pod)
    sys.stdout.flush()
    os.execvp("ip", ["ip", "netns", "exec", pns, *argv])


@sandbox.command()
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("-c", "--container", default=None)
@name_option
@click.argument("pod")
@handles_errors
def logs(namespace: str, container: str | None, name: str, pod: str) -> None:
    """Print a pod's container log."""
    click.echo(_sandbox(name).logs(namespace, pod, container), nl=False)
