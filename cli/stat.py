"""`nodemesh stat`: success rate, request rate, latency and TCP connections per resource.

Semantics as Linkerd's `viz stat`: a resource's own row is its inbound view; `--from X` shows X's
outbound view of each selected destination; `--to Y` shows the selected callers' outbound view of Y.
"""

from __future__ import annotations

import click
from nodemesh.cli import render
from nodemesh.cli.client import ClientConfig, CliError, backend_option, connect, controller_options
from nodemesh.cli.query import DEFAULT_NAMESPACE, DEFAULT_WINDOW, build_stat_requests

OUTPUTS = ("table", "wide", "json")


def check_output(value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise CliError(f"invalid output format {value!r}: expected one of {', '.join(allowed)}")
    return value


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("resources", nargs=-1, metavar="(TYPE [NAME...] | TYPE/NAME...)")
@click.option("-n", "--namespace", default=DEFAULT_NAMESPACE, show_default=True, help="Namespace of the resources.")
@click.option("-A", "--all-namespaces", is_flag=True, help="Resources in every namespace.")
@click.option("--from", "from_", metavar="TYPE/NAME", help="Only traffic sent by this resource (its outbound view).")
@click.option("--from-namespace", metavar="NS", help="Namespace of --from (default: --namespace).")
@click.option("--to", metavar="TYPE/NAME", help="Only traffic sent to this resource (the callers' view).")
@click.option("--to-namespace", metavar="NS", help="Namespace of --to (default: --namespace).")
@click.option("-t", "--time-window", default=DEFAULT_WINDOW, show_default=True,
              help="Window of the statistics, 10s to 1h (e.g. 10s, 1m, 90s, 1h).")
@click.option("-l", "--selector", "label_selector", default="", help="Label selector (kubectl syntax).")
@click.option("-o", "--output", default="table", show_default=True, help="table, wide or json.")
@backend_option
@controller_options
def stat(
    resources: tuple[str, ...], namespace: str, all_namespaces: bool, from_: str | None,
    from_namespace: str | None, to: str | None, to_namespace: str | None, time_window: str,
    label_selector: str, output: str, backend: str | None, client: ClientConfig,
) -> None:
    """Traffic statistics of resources: deploy, sts, ds, job, rs, po, svc, ns, or all.

    \b
    Examples:
      nodemesh stat deploy -n emojivoto
      nodemesh stat deploy/web --to deploy/emoji -t 10m
      nodemesh stat po -A -o wide
    """
    output = check_output(output, OUTPUTS)
    requests = build_stat_requests(
        resources, namespace=namespace, all_namespaces=all_namespaces, from_=from_,
        from_namespace=from_namespace, to=to, to_namespace=to_namespace, window=time_window,
        label_selector=label_selector,
    )
    rows = []
    warnings: list[str] = []
    with connect(client) as ctl:
        for request in requests:
            request.backend = backend or ""
            response = ctl.unary("StatSummary", request)
            if response.error:
                raise CliError(response.error)
            if response.warning and response.warning not in warnings:
                warnings.append(response.warning)
                click.echo(f"warning: {response.warning}", err=True)
            rows.extend(response.rows)

    if output == "json":
        click.echo(render.stat_json(rows), nl=False)
    elif not rows:
        click.echo("No traffic found.", err=True)
    else:
        click.echo(render.stat_table(rows, all_namespaces=all_namespaces, wide=output == "wide"), nl=False)
