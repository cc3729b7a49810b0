"""Run a controller: cluster source, gRPC API and web app, started and stopped as one."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass

import grpc
from aiohttp import web
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.controller import Controller
from nodemesh.controlplane.server import start_grpc_server
from nodemesh.controlplane.sources import ClusterSource
from nodemesh.controlplane.web import build_app

log = logging.getLogger("nodemesh.controlplane")


def build_source(config: ControllerConfig) -> ClusterSource:
    if config.source == "sandbox":
        from nodemesh.controlplane.sources.sandbox import SandboxSource

        if not config.state_dir:
            raise ValueError("--source sandbox needs --state-dir")
        return SandboxSource(config.state_dir, poll_s=config.sandbox_poll_s)
    if config.source == "kubernetes":
        from nodemesh.controlplane.sources.kubernetes import KubernetesSource, load_configuration

        return KubernetesSource(load_configuration(config.kubeconfig))
    raise ValueError(f"unknown source {config.source!r}: expected sandbox or kubernetes")


@dataclass
class RunningController:
    controller: Controller
    grpc_server: grpc.aio.Server
    grpc_port: int
    web_runner: web.AppRunner
    web_port: int

    async def stop(self) -> None:
        await self.grpc_server.stop(grace=1.0)
        await self.web_runner.cleanup()
        await self.controller.stop()


async def start(config: ControllerConfig, source: ClusterSource | None = None) -> RunningController:
    """Start everything; ports 0 in `config` pick free ports (see RunningController)."""
    controller = Controller(config, source if source is not None else build_source(config))
    await controller.start()
    grpc_server, grpc_port = await start_grpc_server(controller, config.listen, config.grpc_port)
    runner = web.AppRunner(build_app(controller), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.listen, config.web_port)
    await site.start()
    web_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    log.info("event=controller_started grpc_port=%d web_port=%d source=%s", grpc_port, web_port, config.source)
    return RunningController(controller, grpc_server, grpc_port, runner, web_port)


def parse_args(argv: list[str] | None = None) -> ControllerConfig:
    p = argparse.ArgumentParser(prog="python -m nodemesh.controlplane",
                                description="nodemesh controller: cluster source, agent streams, stat/tap API")
    p.add_argument("--source", choices=("sandbox", "kubernetes"), default="sandbox")
    p.add_argument("--state-dir", default="", help="sandbox: directory of objects.json")
    p.add_argument("--kubeconfig", default="", help="kubernetes: kubeconfig path (default: in-cluster)")
    p.add_argument("--in-cluster", action="store_true", help="kubernetes: use the pod's service account")
    p.add_argument("--listen", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=ControllerConfig.grpc_port)
    p.add_argument("--web-port", type=int, default=ControllerConfig.web_port)
    p.add_argument("--excluded-namespaces", default=",".join(ControllerConfig.excluded_namespaces))
    p.add_argument("--opaque-ports", default=",".join(map(str, ControllerConfig.opaque_ports)))
    p.add_argument("--skip-ports", default="")
    p.add_argument("--tap-max-rps", type=float, default=ControllerConfig.tap_max_rps)
    p.add_argument("--log-level", default="warning")
    a = p.parse_args(argv)
    if a.source == "sandbox" and not a.state_dir:
        p.error("--source sandbox needs --state-dir")
    return ControllerConfig(
        source=a.source, state_dir=a.state_dir, kubeconfig="" if a.in_cluster else a.kubeconfig,
        listen=a.listen, grpc_port=a.grpc_port, web_port=a.web_port,
        excluded_namespaces=tuple(n for n in a.excluded_namespaces.split(",") if n),
        opaque_ports=tuple(int(x) for x in a.opaque_ports.split(",") if x),
        skip_ports=tuple(int(x) for x in a.skip_ports.split(",") if x),
        tap_max_rps=a.tap_max_rps, log_level=a.log_level,
    )


async def run(config: ControllerConfig) -> None:
    running = await start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop()


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    logging.basicConfig(level=config.log_level.upper(),
                        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    try:
        asyncio.run(run(config))
    except Exception as exc:
        # Startup errors a user can fix (bad kubeconfig, port taken) are one line, not a traceback.
        if not isinstance(exc, (ValueError, OSError)) and type(exc).__name__ != "ConfigException":
            raise
        raise SystemExit(f"nodemesh controller: {exc}") from None
