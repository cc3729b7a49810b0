"""`nodemesh check`: is the mesh healthy? One ✓ or × per step, a hint under every ×."""

from __future__ import annotations

import click
from nodemesh import __version__
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.cli.client import ClientConfig, CliError, connect, controller_options
from nodemesh.cli.render import CheckStep, check_report

MAX_CLOCK_SKEW_MS = 2_000   # aggregation uses 1 s buckets: beyond this, windows blur
MAX_REPORT_AGE_MS = 10_000  # agents report every second; silence this long means a stuck agent
TITLE = "nodemesh"


def controller_steps(resp: pb.CheckResponse, client_version: str) -> list[CheckStep]:
    """The steps that follow a successful Check call (pure, unit-tested)."""
    nodes = sorted(resp.nodes, key=lambda n: n.node)
    steps = []

    problems = []
    for n in nodes:
        if not n.agent_connected:
            problems.append(f"{n.node}: no agent connected")
        elif not n.agent_ready:
            problems.append(f"{n.node}: agent not ready")
        elif n.last_report_age_ms > MAX_REPORT_AGE_MS:
            problems.append(f"{n.node}: last report {n.last_report_age_ms / 1000:.0f}s ago")
    if not nodes:
        problems.append("the controller knows no nodes")
    steps.append(CheckStep(
        "one ready agent per node" + (f" ({len(nodes)} nodes)" if nodes else ""), not problems,
        tuple(problems),
        "check the nodemesh-agent DaemonSet pods on those nodes (kubectl -n nodemesh get pods -o wide) "
        "and their logs",
    ))

    # without a connected agent nobody vouches for the node's rules: not a pass
    uncaptured = [
        f"{n.node}: capture not installed" if n.agent_connected else f"{n.node}: unknown (no agent connected)"
        for n in nodes if not (n.agent_connected and n.capture_installed)
    ]
    steps.append(CheckStep(
        "capture installed on each node", not uncaptured and bool(nodes), tuple(uncaptured),
        "the redirector installs the NODEMESH_* rules once its agent is ready, and removes them while the "
        "agent is not (fail-open); see the redirector's and the agent's logs on that node",
    ))

    # Which capture runs on each node and why (issue 14): iptables, or eBPF (cgroup/connect4); a node
    # asked for eBPF that fell back says so here (the redirector's log has the probe's reason).
    for n in nodes:
        if n.agent_connected and n.capture_mode:
            steps.append(CheckStep(f"{n.node}: capture mode {n.capture_mode} ({n.capture_mode_reason})", True))

    # Where `stat` answers from by default (issue 16): memory, or a Prometheus that must answer and
    # hold every agent's metrics for its numbers to be whole. An older controller says nothing here.
    if resp.stat_backend == "prometheus":
        steps.append(CheckStep(
            f"stat backend prometheus ({resp.stat_backend_url}): {resp.stat_backend_detail}", resp.stat_backend_ok,
            () if resp.stat_backend_ok else (resp.stat_backend_detail,),
            "stat, edges, routes and the dashboard answer from this Prometheus: check that it runs, that the "
            "controller reaches it, and that it scrapes every agent's :4191/metrics with its credential "
            "(nodemesh install --addon prometheus ships that scrape config)",
        ))
    elif resp.stat_backend:
        steps.append(CheckStep(f"stat backend {resp.stat_backend}", True))

    versions = []
    if resp.controller_version != client_version:
        versions.append(f"controller {resp.controller_version or '?'} != client {client_version}")
    for n in nodes:
        if n.agent_connected and n.agent_version != resp.controller_version:
            versions.append(f"{n.node}: agent {n.agent_version or '?'} != controller {resp.controller_version}")
    steps.append(CheckStep(
        "versions agree", not versions, tuple(versions),
        "upgrade the CLI, controller and agents to the same release (nodemesh install | kubectl apply -f -)",
    ))

    skewed = [
        f"{n.node}: clock {n.clock_skew_ms:+d}ms from the controller's"
        for n in nodes if n.agent_connected and abs(n.clock_skew_ms) > MAX_CLOCK_SKEW_MS
    ]
    steps.append(CheckStep(
        "clock skew sane", not skewed, tuple(skewed),
        f"keep node clocks within {MAX_CLOCK_SKEW_MS}ms of each other (chrony/NTP)",
    ))
    return steps


def run_checks(config: ClientConfig, client_version: str = __version__) -> list[CheckStep]:
    try:
        with connect(config) as ctl:
            resp = ctl.unary("Check", pb.CheckRequest())
            where = ctl.target.address
    except CliError as exc:
        return [CheckStep(
            "controller reachable", False, (exc.message,),
            "is the controller running? nodemesh finds it through --controller, --sandbox or --context, "
            "else NODEMESH_CONTROLLER, NODEMESH_SANDBOX, the current kube context, and only when there is "
            "no kube context the running sandbox",
        )]
    return [CheckStep(f"controller reachable ({where})", True), *controller_steps(resp, client_version)]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@controller_options
def check(client: ClientConfig) -> None:
    """Check that the controller, the agents and capture work; exit 1 if anything fails."""
    steps = run_checks(client)
    click.echo(check_report(TITLE, steps), nl=False)
    if not all(s.ok for s in steps):
        raise SystemExit(1)
