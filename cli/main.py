"""The `nodemesh` command: a click group whose verbs live one module each and load lazily.

Each verb's module is imported only when that verb runs, so `nodemesh stat` does not pay for
the sandbox's pyroute2 import and a broken optional dependency breaks only its own verb.
"""

from __future__ import annotations

import importlib

import click
from nodemesh import __version__

# verb -> "module:attribute" (a click.Command) inside nodemesh.cli
VERBS: dict[str, str] = {
    "sandbox": "sandbox_cmd:sandbox",
    "install": "install:install",
    "uninstall": "install:uninstall",
    "stat": "stat:stat",
    "tap": "tap:tap",
    "top": "top:top",
    "edges": "edges:edges",
    "routes": "routes:routes",
    "check": "check:check",
    "version": "version:version",
    "dashboard": "dashboard:dashboard",
    "demo": "demo:demo",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(VERBS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = VERBS.get(cmd_name)
        if target is None:
            return None
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(f"nodemesh.cli.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"nodemesh.cli.{module_name}":
                raise
            return _unavailable(cmd_name)
        return getattr(module, attr)


def _unavailable(name: str) -> click.Command:
    def run() -> None:
        raise click.ClickException(f"'{name}' is not available in this build")

    return click.Command(name, callback=run, help="(not available in this build)")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="nodemesh", message="%(prog)s %(version)s")
def cli() -> None:
    """nodemesh: a service mesh with one agent per node.

    Success rate, request volume, latency and live requests for every workload and every
    caller->callee edge, without touching the application.
    """


def main() -> None:
    cli(prog_name="nodemesh")


if __name__ == "__main__":
    main()
