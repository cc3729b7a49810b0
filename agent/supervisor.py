"""The agent's parent process: node telemetry (admin :4191, controller link) and N workers.

Starts the workers, hands each one its telemetry channel, restarts a worker that dies, and on
SIGTERM drains: the admin listener closes at once (a newer agent's admin answers the probes),
every worker drains within the grace, then the parent exits.

Memory: the first workers are *forked* (`fork_workers`, called by `__main__` before any event loop
or thread exists) while the parent has imported only the data path (`nodemesh.agent.worker`:
asyncio, uvloop, httptools, hpack, protobuf messages). Those pages stay shared copy-on-write
(`gc.freeze()` first, so no collector pass dirties them); the parent imports its own heavy modules
(prometheus-client, the controller's grpc) only after the fork. A worker that dies is restarted by
*exec* (`python -m nodemesh.agent.worker`) through posix_spawn, never fork(): by then the parent runs
grpc's threads, and a fork() there runs grpc's atfork handlers (agent/spawn.py; asyncio's own
subprocesses fork under uvloop). A restarted worker costs its own memory, nothing else changes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

from nodemesh.agent import workerlink
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.sockets import enable_request_migration, listen_socket
from nodemesh.agent.spawn import Child, spawn
from nodemesh.agent.worker import config_to_json, run_forked

log = logging.getLogger("nodemesh.agent.supervisor")

RESTART_BACKOFF_S = 0.5
READY_TIMEOUT_S = 30.0
# On SIGTERM, how long to keep accepting while capture still points here and no other agent
# listens: longer than the redirector's fail-open grace (2 s) plus its poll.
HANDOFF_MAX_S = 3.5


Listeners = tuple[socket.socket, socket.socket]  # (outbound, inbound) of one worker


def open_listeners(config: AgentConfig) -> Listeners:
    """One worker's listening sockets, opened by the parent, which keeps them for as long as it
    lives: when the worker crashes, its share of new connections waits in the backlog for the
    restarted worker instead of being refused (a worker's own sockets died with it: kill -9 of
    the only worker refused connections for ~0.65 s; issue 11 item 8)."""
    return (listen_socket(config.listen_host, config.outbound_port),
            listen_socket(config.listen_host, config.inbound_port))


@dataclass
class Forked:
    """A worker forked before the parent's event loop started: its pid and the parent's ends."""

    index: int
    pid: int
    parent_end: workerlink.ChannelEnd
    ready_fd: int
    listeners: Listeners | None = None


def fork_workers(config: AgentConfig, event_log: str | None, n: int) -> list[Forked]:
    """Fork `n` workers now. Call from the main thread, before any event loop or thread exists."""
    gc.collect()
    gc.freeze()  # imported modules' objects: never scanned again, so their pages stay shared
    sys.stdout.flush()
    sys.stderr.flush()
    forked: list[Forked] = []
    parent_pid = os.getpid()
    for index in range(n):
        listeners = open_listeners(config)
        parent_end, child_end = workerlink.make_channel()
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's code
            code = 1
            try:
                for other in forked:  # siblings' ends would keep their channels open past their death
                    other.parent_end.close()
                    os.close(other.ready_fd)
                parent_end.close()
                os.close(ready_r)
                for other in forked:
                    for sock in other.listeners or ():
                        sock.close()
                code = run_forked(config, index, child_end, ready_w, event_log, parent_pid, listeners)
            except BaseException:  # noqa: BLE001 - a child must reach os._exit, whatever happened
                traceback.print_exc()
            finally:
                os._exit(code)
        child_end.close()
        os.close(ready_w)
        forked.append(Forked(index, pid, parent_end, ready_r, listeners))
    return forked


def listeners_on(port: int) -> int:
    """TCP sockets listening on `port` in this network namespace (each worker holds one)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    # local_address is ADDR:PORT in hex; state 0A is LISTEN
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        count += 1
        except OSError:
            continue
    return count


async def _read_ready(fd: int) -> bytes:
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: None if readable.done() else readable.set_result(None))
    try:
        await asyncio.wait_for(readable, READY_TIMEOUT_S)
        return os.read(fd, 64)  # b"" (EOF) if the worker died before it was ready
    except TimeoutError:
        return b""
    finally:
        loop.remove_reader(fd)
        os.close(fd)


class Supervisor:
    def __init__(self, config: AgentConfig, event_log: str | None = None,
                 forked: list[Forked] | None = None) -> None:
        self.config = config
        self.event_log = event_log
        self.node: object | None = None
        self.workers: dict[int, Child] = {}
        self.stopping = False
        self.restarts = 0
        self._forked = {f.index: f for f in forked or ()}
        self._presence: asyncio.AbstractServer | None = None
        self._listeners: dict[int, Listeners] = {f.index: f.listeners for f in forked or () if f.listeners}
        self._heartbeat: asyncio.Task[None] | None = None

    async def run(self) -> int:
        from nodemesh.agent.node import NodeTelemetry

        if not enable_request_migration():
            log.warning("event=tcp_migrate_req_unavailable effect=queued_connections_may_reset_on_restart "
                        "hint=\"set net.ipv4.tcp_migrate_req=1 on the node: python -m nodemesh.redirector "
                        "sysctls, as root with /proc/sys writable (the DaemonSet's node-sysctls init container)\"")
        node = NodeTelemetry(self.config)
        self.node = node
        await node.start()
        await self._announce(node)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        n = max(1, self.config.workers)
        await asyncio.gather(*(self._adopt(self._forked.pop(i)) if i in self._forked else self._spawn(i)
                               for i in range(n)))
        node.set_ready(True)
        log.info("event=agent_ready node=%s workers=%d", self.config.node, n)
        watchers = [loop.create_task(self._watch(i)) for i in range(n)]
        await stop.wait()
        await self._shutdown(node, watchers)
        return 0

    async def _announce(self, node: Any) -> None:
        """Presence on the node and the pod's health file (agent/liveness.py), for as long as we live."""
        from nodemesh.agent.liveness import announce, heartbeat, start_kernel_heartbeat

        self._presence = await announce()
        start_kernel_heartbeat(lambda: node.ready and node.identity_synced())  # not ready from SIGTERM on
        # eBPF capture's liveness: our outbound listeners in the connect4 program's sockmap.
        from nodemesh.agent.capture import EbpfPresence

        EbpfPresence(lambda: node.ready and node.identity_synced(),
                     lambda: {i: pair[0] for i, pair in self._listeners.items()}).start()
        if self.config.health_file:
            self._heartbeat = asyncio.get_running_loop().create_task(heartbeat(
                self.config.health_file, lambda: "ready" if node.ready and node.identity_synced() else "not-ready"))

    async def _handoff(self) -> str:
        """Keep accepting until new connections have somewhere else to go, so that closing our
        listeners refuses none: another agent listens on our port (a rolling update: SO_REUSEPORT
        spreads new connections, queued ones migrate), or the node's capture is gone (the
        redirector took its hook out — on SIGTERM at once, or after its fail-open grace once our
        /ready stopped answering — so pods dial directly). Bounded by HANDOFF_MAX_S."""
        from nodemesh.agent.capture import capture_active

        # Our listening sockets (one pair per worker, held by us: a dead worker's still counts).
        ours = len(self._listeners) or sum(1 for p in self.workers.values() if p.returncode is None)
        deadline = time.monotonic() + HANDOFF_MAX_S
        while time.monotonic() < deadline:
            if listeners_on(self.config.outbound_port) > ours:
                return "another_agent"
            if not await capture_active():
                return "capture_removed"
            await asyncio.sleep(0.1)
        return "timeout"

    async def _adopt(self, f: Forked) -> None:
        """Take over a worker forked before the loop started."""
        self.node.attach_worker(f.index, f.parent_end)  # type: ignore[union-attr]
        self.workers[f.index] = Child(f.pid)
        if (await _read_ready(f.ready_fd)).strip() != b"ready":
            log.error("event=worker_not_ready index=%d pid=%d", f.index, f.pid)
        else:
            log.info("event=worker_started index=%d pid=%d how=fork", f.index, f.pid)

    async def _spawn(self, index: int) -> None:
        parent_end, child_end = workerlink.make_channel()
        fd = child_end.fileno()
        if index not in self._listeners:
            self._listeners[index] = open_listeners(self.config)
        listen_fds = tuple(sock.fileno() for sock in self._listeners[index])
        argv = [sys.executable, "-m", "nodemesh.agent.worker", "--index", str(index),
                "--channel-fd", str(fd), "--config", config_to_json(self.config),
                "--listen-fds", ",".join(map(str, listen_fds))]
        if self.event_log:
            argv += ["--event-log", self.event_log]
        try:
            proc = spawn(argv, pass_fds=(fd, *listen_fds), capture_stdout=True)
        except OSError as exc:
            parent_end.close()
            if index not in self.workers:
                raise                   # at start: the agent cannot run, say so
            # A restart: the dead worker stays in place, so its watcher retries after the backoff.
            log.error("event=worker_spawn_failed index=%d error=%r action=retry", index, exc)
            return
        finally:
            child_end.close()
        self.node.attach_worker(index, parent_end)  # type: ignore[union-attr]
        self.workers[index] = proc
        try:
            line = await asyncio.wait_for(proc.readline(), READY_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            log.error("event=worker_not_ready index=%d pid=%d", index, proc.pid)
        else:
            log.info("event=worker_started index=%d pid=%d how=exec", index, proc.pid)

    async def _watch(self, index: int) -> None:
        while not self.stopping:
            proc = self.workers[index]
            code = await proc.wait()
            if self.stopping:
                return
            self.restarts += 1
            log.warning("event=worker_exited index=%d pid=%d code=%s action=restart", index, proc.pid, code)
            self.node.detach_worker(index)  # type: ignore[union-attr]
            await asyncio.sleep(RESTART_BACKOFF_S)
            if not self.stopping:
                await self._spawn(index)

    async def _shutdown(self, node: object, watchers: list[asyncio.Task[None]]) -> None:
        self.stopping = True
        started = time.monotonic()
        node.close_admin()  # type: ignore[attr-defined]
        reason = await self._handoff()
        log.info("event=handoff reason=%s seconds=%.2f", reason, time.monotonic() - started)
        for pair in self._listeners.values():  # the workers close theirs as they drain
            for sock in pair:
                sock.close()
        for proc in self.workers.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        deadline = self.config.drain_grace_s + 5.0
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in self.workers.values())), deadline)
        except TimeoutError:
            for proc in self.workers.values():
                if proc.returncode is None:
                    proc.kill()
            await asyncio.gather(*(p.wait() for p in self.workers.values()))
        for task in watchers:
            task.cancel()
        await node.stop()  # type: ignore[attr-defined]
        log.info("event=agent_stopped seconds=%.2f", time.monotonic() - started)
