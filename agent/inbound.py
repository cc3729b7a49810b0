"""The inbound path (:4143): traffic arriving for a local pod from elsewhere.

The destination is already a pod (chosen by the caller's agent or by kube-proxy), so no
endpoint is picked here: the context's picker has no service index.
"""

from __future__ import annotations

import asyncio
import socket

from nodemesh.agent.relay import Connection, WorkerContext
from nodemesh.agent.sockets import LISTEN_BACKLOG

DIRECTION = "inbound"


async def serve_inbound(ctx: WorkerContext, sock: socket.socket) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    # backlog: create_server listens again on `sock`, with 100 unless told (sockets.LISTEN_BACKLOG).
    return await loop.create_server(lambda: Connection(ctx, DIRECTION), sock=sock, backlog=LISTEN_BACKLOG)
