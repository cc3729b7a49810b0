"""The inbound path (:4143): traffic arriving for a local pod from elsewhere, from accept to the pod.

1. Capture: the redirector DNATs a connection whose destination is a local pod and whose source
   is not (another node's pod, through its agent; a node; anything outside) to node_ip:4143
   (redirector/plan.py); a worker accepts it (SO_REUSEPORT, `serve_inbound`). A request between
   two pods of one node never comes here: the outbound path saw it and counted both directions.
2. relay.Connection.connection_made: the original destination (SO_ORIGINAL_DST), the pod; a dial
   of the agent's own ports is refused; a local pod the identity does not name yet holds the
   connection (bounded) until it does (`identity_gate`, telemetry.py).
3. Admission (admission.py, fairness.py): shed, held or taken.
4. No endpoint choice: the destination is already a pod (chosen by the caller's agent, or by
   kube-proxy), so the picker has no pod index and the pod is dialled as it was addressed.
5. The upstream socket (sockets.upstream_socket: transparent, bound to the caller's address, so the
   pod sees who called), started at once while detection waits for the client's first bytes; then
   the mode (seam.py) relays and the observer counts it with direction="inbound".
"""

from __future__ import annotations

import asyncio
import socket

from nodemesh.agent.admission import Admission
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.endpoints import EndpointPicker
from nodemesh.agent.modes import make_mode
from nodemesh.agent.observe import Observer
from nodemesh.agent.relay import Connection, WorkerContext
from nodemesh.agent.sockets import LISTEN_BACKLOG
from nodemesh.agent.telemetry import WorkerTelemetry

DIRECTION = "inbound"


def inbound_context(config: AgentConfig, tele: WorkerTelemetry, observer: Observer,
                    admission: Admission) -> WorkerContext:
    """What the inbound connections of a worker share: no endpoint choice, the identity gate."""
    ctx = WorkerContext(config, observer, EndpointPicker(None), make_mode, admission)
    ctx.identity_gate = tele.identity_gate
    ctx.count_splice = tele.count_splice
    return ctx


async def serve_inbound(ctx: WorkerContext, sock: socket.socket) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    # backlog: create_server listens again on `sock`, with 100 unless told (sockets.LISTEN_BACKLOG).
    return await loop.create_server(lambda: Connection(ctx, DIRECTION), sock=sock, backlog=LISTEN_BACKLOG)
