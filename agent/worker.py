"""One worker process: a full proxy on the shared ports (SO_REUSEPORT), its own telemetry.

Two ways in, same proxy:
  - forked by the agent's parent before it imports anything heavy (`run_forked`): the worker shares
    the parent's already-imported modules copy-on-write; it reports `ready` on a pipe;
  - exec'd as `python -m nodemesh.agent.worker --index I --channel-fd FD --config JSON` (a worker
    restarted after the parent imported grpc/aiohttp-class modules and started threads, where fork
    is unsafe); prints `ready` on stdout.
Either way it drains on SIGTERM, handing its live connections to a newer agent's worker when one
runs beside it (agent/handover.py; it listens for such hand-overs itself while it serves). This
module imports only the data path: no prometheus-client, no grpc, no web framework (the parent
imports those after the workers are forked).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

import uvloop
from nodemesh.agent import workerlink
from nodemesh.agent.admission import Admission, capacity_for
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.drain import drain
from nodemesh.agent.eventlog import JsonlObserver, TeeObserver
from nodemesh.agent.handover import Handover, Receiver, find_successor
from nodemesh.agent.housekeeping import Housekeeping
from nodemesh.agent.inbound import inbound_context, serve_inbound
from nodemesh.agent.observe import Observer
from nodemesh.agent.outbound import outbound_context, serve_outbound
from nodemesh.agent.sockets import listen_socket, raise_fd_limit
from nodemesh.agent.telemetry import WorkerTelemetry
from nodemesh.api.gen import nodemesh_pb2 as pb

log = logging.getLogger("nodemesh.agent.worker")
PR_SET_PDEATHSIG = 1


def config_to_json(config: AgentConfig) -> str:
    return json.dumps(dataclasses.asdict(config))


def config_from_json(text: str) -> AgentConfig:
    raw = json.loads(text)
    for f in dataclasses.fields(AgentConfig):
        if isinstance(raw.get(f.name), list):
            raw[f.name] = tuple(raw[f.name])
    return AgentConfig(**raw)


async def serve(config: AgentConfig, index: int, channel_fd: int | None, event_log: str | None, *,
                channel: workerlink.ChannelEnd | None = None, on_ready: Callable[[], None] | None = None,
                listeners: tuple[socket.socket, socket.socket] | None = None) -> int:
    """`listeners` (outbound, inbound): the parent's, which it keeps open across our death (a
    crashed worker's connections then wait in the backlog for its replacement instead of being
    refused); without them (a worker run on its own) we open our own."""
    child_end = channel
    if child_end is None and channel_fd is not None:
        child_end = workerlink.ChannelEnd.from_fd(channel_fd)
    tele = WorkerTelemetry(config, child_end, index)
    observer: Observer = tele
    if event_log:
        observer = TeeObserver(tele, JsonlObserver(event_log))
    await tele.start()
    nofile = raise_fd_limit()
    admission = Admission(capacity_for(nofile))
    log.info("event=fd_limit index=%d nofile=%d connections=%d", index, nofile, admission.capacity)
    outbound = outbound_context(config, tele, observer, admission)
    inbound = inbound_context(config, tele, observer, admission)
    if config.mtls:
        from nodemesh.agent.certs import CertReader
        from nodemesh.agent.mux import MUX_ALPN
        from nodemesh.agent.tunnel import Tunnel

        alpn = (MUX_ALPN,) if config.tunnel_mux else ()
        outbound.tunnel = inbound.tunnel = Tunnel(tele.index, CertReader(config.cert_dir, alpn=alpn),
                                                     sink=tele.count_tunnel, mux=config.tunnel_mux)

    def mesh_config(mesh: pb.MeshConfig) -> None:
        # The controller's opaque ports replace the --opaque-ports flag (the same list in a
        # manifest install; a changed ConfigMap reaches every agent without a restart).
        ports = frozenset(mesh.opaque_ports)
        for ctx in (outbound, inbound):
            ctx.opaque_ports = ports

    tele.on_mesh_config.append(mesh_config)
    housekeeping = Housekeeping(admission, (outbound.live, inbound.live))
    housekeeping.start()
    out_sock, in_sock = listeners or (listen_socket(config.listen_host, config.outbound_port),
                                      listen_socket(config.listen_host, config.inbound_port))
    servers = [await serve_outbound(outbound, out_sock), await serve_inbound(inbound, in_sock)]
    # The agent this worker belongs to (its parent; a worker run on its own stands for itself):
    # draining, we hand connections only to another agent's workers, never to a sibling.
    agent_id = os.getppid() if listeners is not None or channel_fd is not None or channel is not None \
        else os.getpid()
    receiver = Receiver({"outbound": outbound, "inbound": inbound}, agent_id, index)
    receiver.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready()
    else:
        print("ready", flush=True)
    log.info("event=worker_listening index=%d outbound=%d inbound=%d", index, config.outbound_port,
             config.inbound_port)
    await stop.wait()
    receiver.close()
    successor = await find_successor(agent_id, index)
    handover = Handover(successor, [outbound, inbound]) if successor is not None else None
    await drain(servers, [outbound, inbound], config.drain_grace_s, handover)
    housekeeping.stop()
    await tele.stop()
    return 0


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def log_format(index: int) -> str:
    return f"%(asctime)s level=%(levelname)s worker={index} %(message)s"


def run_forked(config: AgentConfig, index: int, channel: workerlink.ChannelEnd, ready_fd: int,
               event_log: str | None, parent_pid: int,
               listeners: tuple[socket.socket, socket.socket] | None = None) -> int:
    """The body of a worker forked from the agent's parent (called in the child, which must then
    `os._exit` with the result: it must never return into the parent's code)."""
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr, format=log_format(index), force=True)
    _die_with_parent()
    if os.getppid() != parent_pid:
        return 0  # the parent died before PR_SET_PDEATHSIG was in place: nobody would ever stop us

    def ready() -> None:
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)

    return uvloop.run(serve(config, index, None, event_log, channel=channel, on_ready=ready, listeners=listeners))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nodemesh.agent.worker")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--channel-fd", type=int, default=None)
    parser.add_argument("--config", required=True, help="AgentConfig as JSON")
    parser.add_argument("--event-log", default=None)
    parser.add_argument("--listen-fds", default=None, help="OUT,IN: listening sockets the parent keeps")
    args = parser.parse_args(argv)
    config = config_from_json(args.config)
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr, format=log_format(args.index))
    _die_with_parent()
    listeners = None
    if args.listen_fds:
        out_fd, in_fd = (int(fd) for fd in args.listen_fds.split(","))
        listeners = (socket.socket(fileno=out_fd), socket.socket(fileno=in_fd))
    return uvloop.run(serve(config, args.index, args.channel_fd, args.event_log, listeners=listeners))


if __name__ == "__main__":
    sys.exit(main())
