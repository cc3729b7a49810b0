"""`nodemesh edges`: which resources talked to which, from observed traffic."""

from __future__ import annotations

import click
from nodemesh.cli import render
from nodemesh.cli.client import ClientConfig, CliError, backend_option, connect, controller_options
from nodemesh.cli.query import DEFAULT_NAMESPACE, DEFAULT_WINDOW, build_edges_request
from nodemesh.cli.stat import check_output

OUTPUTS = ("table", "wide", "json")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("resource", required=False, default="", metavar="TYPE")
@click.option("-n", "--namespace", default=DEFAULT_NAMESPACE, show_default=True, help="Namespace of the resources.")
@click.option("-A", "--all-namespaces", is_flag=True, help="Edges in every namespace.")
@click.option("-t", "--time-window", default=DEFAULT_WINDOW, show_default=True, help="Window, 10s to 1h.")
@click.option("-o", "--output", default="table", show_default=True, help="table, wide or json.")
@backend_option
@controller_options
def edges(
    resource: str, namespace: str, all_namespaces: bool, time_window: str, output: str,
    backend: str | None, client: ClientConfig,
) -> None:
    """Caller -> callee edges between resources of one type (deploy, po, sts, ...)."""
    output = check_output(output, OUTPUTS)
    if not resource:
        raise CliError("you must specify a resource type (e.g. deploy, po)")
    request = build_edges_request(resource, namespace=namespace, all_namespaces=all_namespaces,
                                  window=time_window)
    request.backend = backend or ""
    with connect(client) as ctl:
        response = ctl.unary("Edges", request)
    if response.error:
        raise CliError(response.error)
    if response.warning:
        click.echo(f"warning: {response.warning}", err=True)
    found = list(response.edges)
    if output == "json":
        click.echo(render.edges_json(found), nl=False)
    elif not found:
        click.echo("No edges found.", err=True)
    else:
        click.echo(render.edges_table(found, wide=output == "wide"), nl=False)
