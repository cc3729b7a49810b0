"""`nodemesh version`: the client's version, and the controller's and agents' from Check."""

from __future__ import annotations

import click
from nodemesh import __version__
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.cli.client import ClientConfig, connect, controller_options


def version_lines(resp: pb.CheckResponse) -> list[str]:
    lines = [f"Controller version: {resp.controller_version or 'unknown'}"]
    by_version: dict[str, list[str]] = {}
    for n in sorted(resp.nodes, key=lambda n: n.node):
        if n.agent_connected:
            by_version.setdefault(n.agent_version or "unknown", []).append(n.node)
    if not by_version:
        lines.append("Agent version: unavailable (no agent connected)")
    for version, nodes in sorted(by_version.items()):
        lines.append(f"Agent version: {version} ({', '.join(nodes)})")
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--client", "client_only", is_flag=True, help="Print the client version only.")
@controller_options
def version(client_only: bool, client: ClientConfig) -> None:
    """Print the client, controller and agent versions."""
    click.echo(f"Client version: {__version__}")
    if client_only:
        return
    with connect(client) as ctl:
        resp = ctl.unary("Check", pb.CheckRequest())
    for line in version_lines(resp):
        click.echo(line)
