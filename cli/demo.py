"""`nodemesh demo`: the emojivoto debugging session of the Conduit talks, on this machine.

Brings up a sandbox cluster, deploys emojivoto, waits until it serves, installs the mesh while
vote-bot keeps voting (no restart, no pod spec change), waits until stats flow, then prints what
to try next. Every step prints its time; a failed step names itself and the log to read.
`nodemesh demo down` removes everything.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.cli.client import ClientConfig, CliError, connect
from nodemesh.manifests.sandboxfiles import TOKEN_FILE, first_token, sandbox_ca

DEMO_CLUSTER = "nodemesh"
DEMO_NAMESPACE = "emojivoto"
MANIFEST = Path(__file__).resolve().parent.parent / "demo" / "emojivoto.yml"

NEXT_STEPS = """\
The mesh is watching emojivoto. Try:

  nodemesh stat deploy -n emojivoto                     # which workloads fail?
  nodemesh stat deploy -n emojivoto --from deploy/web   # web's calls, per destination
  nodemesh routes deploy/voting -n emojivoto            # per method: which one fails?
  nodemesh tap deploy/voting -n emojivoto               # live requests of it
  nodemesh edges deploy -n emojivoto                    # who talks to whom
  nodemesh dashboard                                    # the same, in a browser

  nodemesh sandbox get pods -n emojivoto -o wide        # the pods, unchanged
  nodemesh demo down                                    # remove it all
"""


class DemoError(click.ClickException):
    pass


def manifest_text(rate: float | None) -> str:
    """emojivoto.yml, with vote-bot's REQUEST_RATE set when asked."""
    docs = list(yaml.safe_load_all(MANIFEST.read_text()))
    if rate is not None:
        for doc in docs:
            if doc and doc.get("kind") == "Deployment" and doc["metadata"]["name"] == "vote-bot":
                for container in doc["spec"]["template"]["spec"]["containers"]:
                    env = [e for e in container.get("env", []) if e["name"] != "REQUEST_RATE"]
                    env.append({"name": "REQUEST_RATE", "value": f"{rate:g}"})
                    container["env"] = env
    return yaml.safe_dump_all([d for d in docs if d], sort_keys=False)


@contextmanager
def step(title: str, log_hint: Callable[[], str] | None = None,
         times: dict[str, tuple[float, float]] | None = None, key: str = "") -> Iterator[None]:
    """One line per step with its time; a failure names the step and where to look. With `times`,
    the step's wall-clock (start, end) is recorded under `key`, so a test can line vote-bot's history
    (time.time() stamps) up with what the demo was doing."""
    click.echo(f"• {title} ...", nl=False, err=True)
    start, wall = time.monotonic(), time.time()
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear message
        click.echo(" failed", err=True)
        hint = f"\n  see: {log_hint()}" if log_hint else ""
        detail = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
        raise DemoError(f"step '{title}' failed: {detail}{hint}") from None
    if times is not None:
        times[key or title] = (wall, time.time())
    click.echo(f" done ({time.monotonic() - start:.1f}s)", err=True)


@dataclass(slots=True)
class DemoRun:
    """What `run_demo` brought up."""

    name: str
    controller: str                                   # host:port of the controller's gRPC API
    steps: dict[str, tuple[float, float]] = field(default_factory=dict)  # key -> wall (start, end)
    elapsed: float = 0.0                              # seconds, until stats flow


def run_demo(name: str = DEMO_CLUSTER, nodes: int = 2, rate: float | None = None, cni: str = "bridge",
             before_install: Callable[[Any], None] | None = None, stats_timeout: float = 60.0) -> DemoRun:
    """The demo's steps on sandbox `name`. Step keys in the result: sandbox, deploy, serve, install, stats.

    `before_install(sandbox)` runs once the app serves and before the mesh is installed (the
    end-to-end test checks there that the app works and fails as designed without the mesh).
    """
    from nodemesh.manifests.sandbox_install import agent_process, install_sandbox
    from nodemesh.sandbox.cluster import Sandbox

    sb = Sandbox(name)
    times: dict[str, tuple[float, float]] = {}
    total = time.monotonic()
    with step(f"Creating a {nodes}-node sandbox cluster {name!r} ({cni} CNI)", lambda: str(sb.state_dir),
              times, "sandbox"):
        if sb.is_up() and len(sb.nodes()) != nodes:
            down_cmd = "nodemesh demo down" + ("" if name == DEMO_CLUSTER else f" --name {name}")
            raise DemoError(f"sandbox {name!r} is up with {len(sb.nodes())} nodes: run `{down_cmd}` first")
        sb.up(nodes=nodes, cni=cni)
    with step("Deploying emojivoto (web, emoji, voting, vote-bot)", lambda: f"{sb.state_dir}/kubelet.log",
              times, "deploy"):
        sb.apply(text=manifest_text(rate))
    with step("Waiting for emojivoto to serve", lambda: "nodemesh sandbox logs -n emojivoto POD", times, "serve"):
        sb.wait_ready(namespace=DEMO_NAMESPACE, timeout=60)
    if before_install is not None:
        before_install(sb)
    with step("Installing nodemesh while the app runs (controller, agent + redirector per node)",
              lambda: str(sb.node_process_log(sb.nodes()[0].name, agent_process(sb.nodes()[0].name))),
              times, "install"):
        controller = install_sandbox(name, progress=lambda msg: None)
    with step("Waiting for stats to flow", lambda: f"{sb.state_dir} (controller and agent logs)", times, "stats"):
        token = first_token((Path(sb.state_dir) / TOKEN_FILE).read_text())
        wait_for_stats(controller, token, timeout=stats_timeout, state_dir=Path(sb.state_dir))
    return DemoRun(name=name, controller=controller, steps=times, elapsed=time.monotonic() - total)


def next_steps(name: str, kube_context: str | None = None) -> str:
    """What to try next; with a non-default cluster, or a kube context that the CLI would talk to
    instead of the sandbox (cli/client.py), how to point the CLI at the sandbox (every verb listed,
    `sandbox` and `demo down` included, reads NODEMESH_SANDBOX)."""
    if name == DEMO_CLUSTER and kube_context is None:
        return NEXT_STEPS
    why = f"; without it the CLI talks to your kube context {kube_context!r}" if kube_context else ""
    return NEXT_STEPS.replace("Try:\n", f"Try (after `export NODEMESH_SANDBOX={name}`{why}):\n", 1)


def current_kube_context() -> str | None:
    """The kube context the CLI would use without NODEMESH_SANDBOX (a broken kubeconfig counts)."""
    from nodemesh.cli.kubecontext import KubeConfigError, current_context

    try:
        context = current_context(None, None, os.environ)
    except KubeConfigError:
        return "(unreadable kubeconfig)"
    return context.name if context is not None else None


def wait_for_stats(controller: str, token: str, timeout: float, state_dir: Path) -> list[Any]:
    """Until the controller reports traffic for emojivoto's web deployment."""
    deadline = time.monotonic() + timeout
    request = pb.StatRequest(selector=pb.Resource(namespace=DEMO_NAMESPACE, type="deployment"),
                             window_seconds=60)
    ca = sandbox_ca(state_dir)
    with connect(ClientConfig(controller=controller, token=token, timeout_s=3.0,
                              ca_file=str(ca) if ca else None)) as api:
        while True:
            try:
                resp = api.unary("StatSummary", request)
                flowing = [r for r in resp.rows if r.has_traffic]
                if {r.resource.name for r in flowing} >= {"web", "voting", "emoji"}:
                    return list(resp.rows)
            except CliError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no stats for web, emoji and voting after {timeout:.0f}s")
            time.sleep(0.5)


def _check_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A bad cluster name is a usage error (one line), not a traceback from deep in the sandbox."""
    from nodemesh.sandbox.naming import NameError_, check_cluster_name

    if value is not None:
        try:
            check_cluster_name(value)
        except NameError_ as exc:
            raise click.BadParameter(str(exc)) from None
    return value


name_option = click.option("--name", default=DEMO_CLUSTER, show_default=True, envvar="NODEMESH_SANDBOX",
                           callback=_check_name, help="Sandbox cluster name (1-12 lowercase letters/digits).")


@click.group(invoke_without_command=True)
@click.option("--nodes", default=2, show_default=True, type=click.IntRange(1, 8), help="Sandbox nodes.")
@click.option("--rate", default=None, type=click.FloatRange(0.1, 500), help="vote-bot requests per second.")
@click.option("--cni", default="bridge", show_default=True, type=click.Choice(["bridge", "routed"]))
@name_option
@click.pass_context
def demo(ctx: click.Context, nodes: int, rate: float | None, cni: str, name: str) -> None:
    """Run emojivoto in a local sandbox cluster and mesh it live."""
    ctx.obj = name
    if os.geteuid() != 0:
        raise DemoError("the demo needs root (its sandbox cluster is made of network namespaces)")
    if ctx.invoked_subcommand is not None:
        return
    run = run_demo(name, nodes=nodes, rate=rate, cni=cni)
    click.echo(f"\nemojivoto is meshed ({run.elapsed:.0f}s).\n")
    click.echo(next_steps(name, current_kube_context()), nl=False)


@demo.command()
@click.option("--name", default=None, envvar="NODEMESH_SANDBOX", callback=_check_name,
              help="Sandbox cluster name (default: the demo's, nodemesh).")
@click.pass_context
def down(ctx: click.Context, name: str | None) -> None:
    """Remove the demo: the mesh, emojivoto and the sandbox cluster."""
    from nodemesh.sandbox.cluster import Sandbox

    name = name or ctx.obj or DEMO_CLUSTER
    sb = Sandbox(name)
    with step(f"Removing sandbox {name}"):
        sb.down()
