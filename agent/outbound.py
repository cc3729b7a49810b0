"""The outbound path (:4140): traffic caught leaving a local pod, from accept to the upstream.

1. Capture: the redirector DNATs a connection whose source is in this node's pod CIDR to
   node_ip:4140 (redirector/plan.py); a worker accepts it (SO_REUSEPORT, `serve_outbound`).
2. relay.Connection.connection_made: the original destination (SO_ORIGINAL_DST); a dial of the
   agent's own ports is refused; an address of this node's pods the identity does not name yet
   holds the connection (bounded) until it does (`identity_gate`, telemetry.py).
3. Admission (admission.py, fairness.py): shed, held or taken.
4. The endpoint (`EndpointPicker` over the pod index): a ClusterIP the index knows becomes a ready
   endpoint picked by the agent (least loaded of two random choices), so it knows which pod served
   the request; anything else is dialled as is, and conntrack names the pod kube-proxy chose
   (`learn_endpoint`). An endpoint that refuses is retried once elsewhere (`count_retry`).
5. The upstream socket (sockets.upstream_socket: transparent, bound to the pod's address), started
   at once while detection waits for the client's first bytes; then the mode (seam.py) relays and
   the observer counts it with direction="outbound" (both ends resolved: telemetry.py).
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

DIRECTION = "outbound"


def outbound_context(config: AgentConfig, tele: WorkerTelemetry, observer: Observer,
                     admission: Admission) -> WorkerContext:
    """What the outbound connections of a worker share: endpoint choice over the pod index, the
    identity gate, conntrack for addresses dialled as is, the retry count."""
    ctx = WorkerContext(config, observer, EndpointPicker(tele.index), make_mode, admission)
    ctx.identity_gate = tele.identity_gate
    ctx.learn_endpoint = tele.learn_endpoint
    ctx.count_retry = tele.count_endpoint_retry
    ctx.count_splice = tele.count_splice
    return ctx


async def serve_outbound(ctx: WorkerContext, sock: socket.socket) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    # backlog: create_server listens again on `sock`, with 100 unless told (sockets.LISTEN_BACKLOG).
    return await loop.create_server(lambda: Connection(ctx, DIRECTION), sock=sock, backlog=LISTEN_BACKLOG)
