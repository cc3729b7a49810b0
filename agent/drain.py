"""Graceful shutdown of one worker: stop accepting, let connections end, then cut the rest.

Each relay mode knows its safe point (HTTP/1: the server closes after the next request, which
carries `Connection: close`, or the connection was idle; HTTP/2: two-step GOAWAY; opaque TCP:
none, it runs until the grace ends). A newer agent bound to the same ports (SO_REUSEPORT)
takes the new connections meanwhile; `sockets.enable_request_migration` moves the ones still
queued on our closed listener to it. With a `Handover` to that agent, opaque TCP connections
and HTTP/1 ones between requests are given to it instead, live (agent/handover.py): what
moves is never cut.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nodemesh.agent.handover import Handover
from nodemesh.agent.relay import WorkerContext

log = logging.getLogger("nodemesh.agent.drain")

# With a successor, how long an HTTP connection may wait to be handed over before it is drained
# after all (HTTP/2: GOAWAY; HTTP/1: `Connection: close` next, idle ones closed): far more than a
# hand-over takes (~1 ms a connection, in batches), far less than the grace.
HANDOVER_DEFER_S = 3.0
HANDOVER_DEFER_PER_CONNECTION_S = 0.002


async def drain(servers: list[asyncio.Server], contexts: list[WorkerContext], grace_s: float,
                handover: Handover | None = None) -> int:
    """Returns how many connections were still open when the grace ran out (and were aborted)."""
    started = time.monotonic()
    for server in servers:
        server.close()
    live = [c for ctx in contexts for c in ctx.live]
    log.info("event=drain_start connections=%d grace_s=%s handover=%s", len(live), grace_s,
             f"@{handover.successor.name}" if handover else "none")
    for ctx in contexts:
        ctx.draining = True
    if handover is not None:
        handover.begin()  # before drain(): an idle HTTP/1 connection moves instead of being closed
    deferred = []
    defer_s = min(HANDOVER_DEFER_S + HANDOVER_DEFER_PER_CONNECTION_S * len(live), grace_s / 2)
    for ctx in contexts:
        for conn in list(ctx.live):
            if handover is not None and handover.defers(conn):
                deferred.append(conn)
            else:
                conn.drain()  # what does not move ends at its safe point, as without a successor
    deadline = started + grace_s
    while any(ctx.live for ctx in contexts) and time.monotonic() < deadline:
        if handover is not None:
            handover.sweep()
            for conn in handover.take_not_moved():
                conn.drain()
            if deferred and (handover.broken or time.monotonic() - started > defer_s):
                for conn in deferred:
                    if not conn.finished:
                        conn.drain()
                deferred = []
            if handover.broken and not handover.freezing:
                log.info("event=handover_done %s", _fields(handover.finish()))
                handover = None
        await asyncio.sleep(0.005 if handover is not None and handover.freezing else 0.05)
    if handover is not None:
        log.info("event=handover_done %s", _fields(handover.finish()))
    left = [c for ctx in contexts for c in ctx.live]
    for conn in left:
        conn.abort_both()
    if left:
        await asyncio.sleep(0.01)  # let connection_lost callbacks report the aborted ones
    log.info("event=drain_done aborted=%d seconds=%.2f", len(left), time.monotonic() - started)
    return len(left)


def _fields(stats: dict[str, object]) -> str:
    return " ".join(f"{k}={v}" for k, v in stats.items())
