"""The outbound path (:4140): traffic caught leaving a local pod.

The caller dialled a pod IP or a Service ClusterIP; for a ClusterIP the agent picks a ready
endpoint itself (endpoints.EndpointPicker) so it knows which pod served the request.
"""

from __future__ import annotations

import asyncio
import socket

from nodemesh.agent.relay import Connection, WorkerContext
from nodemesh.agent.sockets import LISTEN_BACKLOG

DIRECTION = "outbound"


async def serve_outbound(ctx: WorkerContext, sock: socket.socket) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    # backlog: create_server listens again on `sock`, with 100 unless told (sockets.LISTEN_BACKLOG).
    return await loop.create_server(lambda: Connection(ctx, DIRECTION), sock=sock, backlog=LISTEN_BACKLOG)
