"""`nodemesh routes`: success rate, request rate and latency per route of one workload or service.

Semantics as Linkerd's `viz routes`, without a ServiceProfile: a workload's rows are its inbound
view (what its callers got, per route); `--to Y` is the workload's outbound view of its calls to
Y. Routes come from the agents with no configuration (gRPC methods, templated HTTP paths), and
from HTTPRoutes/GRPCRoutes or the sandbox's `nodemesh.io/routes` annotation where given.
"""

from __future__ import annotations

import click
from nodemesh.cli import render
from nodemesh.cli.client import ClientConfig, CliError, backend_option, connect, controller_options
from nodemesh.cli.query import DEFAULT_NAMESPACE, DEFAULT_WINDOW, build_routes_request
from nodemesh.cli.stat import OUTPUTS, check_output


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("resource", metavar="TYPE/NAME")
@click.option("-n", "--namespace", default=DEFAULT_NAMESPACE, show_default=True, help="Namespace of the resource.")
@click.option("--to", metavar="TYPE/NAME", help="Only calls to this resource (the resource's outbound view).")
@click.option("--to-namespace", metavar="NS", help="Namespace of --to (default: --namespace).")
@click.option("-t", "--time-window", default=DEFAULT_WINDOW, show_default=True,
              help="Window of the statistics, 10s to 1h (e.g. 10s, 1m, 90s, 1h).")
@click.option("-o", "--output", default="table", show_default=True, help="table, wide or json.")
@backend_option
@controller_options
def routes(resource: str, namespace: str, to: str | None, to_namespace: str | None, time_window: str,
           output: str, backend: str | None, client: ClientConfig) -> None:
    """Per-route traffic of a workload (deploy, sts, ds, job) or a service: no configuration needed.

    \b
    Routes: gRPC methods as they are (/pkg.Service/Method); HTTP paths templated
    (GET /api/users/{id}); [DEFAULT]: requests with no path; [other]: past 100 routes.
    \b
    Examples:
      nodemesh routes deploy/voting -n emojivoto
      nodemesh routes deploy/web -n emojivoto --to deploy/voting -t 10m
    """
    output = check_output(output, OUTPUTS)
    request = build_routes_request(resource, namespace=namespace, to=to, to_namespace=to_namespace,
                                   window=time_window)
    request.backend = backend or ""
    with connect(client) as ctl:
        response = ctl.unary("Routes", request)
    if response.error:
        raise CliError(response.error)
    if response.warning:
        click.echo(f"warning: {response.warning}", err=True)
    rows = list(response.rows)
    if output == "json":
        click.echo(render.routes_json(rows), nl=False)
    elif not rows:
        click.echo("No traffic found.", err=True)
    else:
        click.echo(render.routes_table(rows, wide=output == "wide"), nl=False)
