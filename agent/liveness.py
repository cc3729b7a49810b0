"""The agent's liveness, as its node and its pod see it.

Presence (redirector/presence.py): an abstract unix socket, `@nodemesh/agent/<pid>`.

The redirector connects to it and holds the connection: when this process dies — crash, `kill -9`,
OOM — the kernel closes the socket and the redirector sees an EOF at once, instead of noticing a
missed `/ready` poll seconds later. Nothing is ever read or written on it. Also how a redirector
tells a rolling update (two agents on the node) from an uninstall (one). It lives as long as the
parent does, drain included: the parent is alive for as long as it still carries connections.

Health file (`--health-file`): see `heartbeat`.

Kernel heartbeat (redirector/heartbeat.py): a thread of the parent writes to the capture rules'
xt_recent list every 50 ms while the agent is ready with its identity (not from SIGTERM on: a
rolling update's new agent beats by then). The rules capture only while someone beats: killed, hung
(SIGSTOP) or gone with its redirector, the node fails open 0.7 s after the last beat with nobody
left to act, and is captured again 0.7 s after the beats resume.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from nodemesh.redirector import presence
from nodemesh.redirector.heartbeat import Heartbeat

log = logging.getLogger("nodemesh.agent.liveness")


class _Held(asyncio.Protocol):
    """A redirector's connection: kept open until it goes, ignoring anything it sends."""

    def data_received(self, data: bytes) -> None:
        pass


async def announce() -> asyncio.AbstractServer | None:
    try:
        sock = presence.register(presence.AGENT)
    except OSError as exc:  # the redirector falls back to polling /ready
        log.warning("event=presence_unavailable error=%r", exc)
        return None
    server = await asyncio.get_running_loop().create_unix_server(_Held, sock=sock)
    log.info("event=presence address=@%s", presence.address(presence.AGENT))
    return server


def start_kernel_heartbeat(alive: Callable[[], bool]) -> Heartbeat:
    """Beat the capture rules' list while `alive()` (a daemon thread: it stops with the process)."""
    return Heartbeat(alive).start()


HEARTBEAT_S = 1.0


def write_health(path: str, state: str) -> None:
    """Replace the health file atomically (its mtime is the heartbeat)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(state + "\n")
    os.replace(tmp, path)


async def heartbeat(path: str, state: Callable[[], str]) -> None:
    """Every second, write `ready` or `not-ready` to `path`: the DaemonSet's probes read this file
    (`exec`), because an HTTP probe of :4191 on the host network reaches whichever agent's admin
    socket the kernel picks — during a rolling update, the old agent's — and so declared a new
    pod Ready before it even listened (its old pod was then stopped at once: a capture gap). A
    stale file (a hung event loop) fails the liveness probe."""
    while True:
        try:
            write_health(path, state())
        except OSError as exc:
            log.warning("event=health_file_failed path=%s error=%r", path, exc)
        await asyncio.sleep(HEARTBEAT_S)
