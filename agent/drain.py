"""Graceful shutdown of one worker: stop accepting, let connections end, then cut the rest.

Each relay mode knows its safe point (HTTP/1: the server closes after the next request, which
carries `Connection: close`, or the connection was idle; HTTP/2: two-step GOAWAY; opaque TCP:
none, it runs until the grace ends). A newer agent bound to the same ports (SO_REUSEPORT)
takes the new connections meanwhile; `sockets.enable_request_migration` moves the ones still
queued on our closed listener to it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nodemesh.agent.relay import WorkerContext

log = logging.getLogger("nodemesh.agent.drain")


async def drain(servers: list[asyncio.Server], contexts: list[WorkerContext], grace_s: float) -> int:
    """Returns how many connections were still open when the grace ran out (and were aborted)."""
    started = time.monotonic()
    for server in servers:
        server.close()
    live = [c for ctx in contexts for c in ctx.live]
    log.info("event=drain_start connections=%d grace_s=%s", len(live), grace_s)
    for ctx in contexts:
        ctx.draining = True
        for conn in list(ctx.live):
            conn.drain()
    deadline = started + grace_s
    while any(ctx.live for ctx in contexts) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    left = [c for ctx in contexts for c in ctx.live]
    for conn in left:
        conn.abort_both()
    if left:
        await asyncio.sleep(0.01)  # let connection_lost callbacks report the aborted ones
    log.info("event=drain_done aborted=%d seconds=%.2f", len(left), time.monotonic() - started)
    return len(left)
