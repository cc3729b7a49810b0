"""The agent's parent process: node telemetry (admin :4191, controller link) and N workers.

Spawns the workers, hands each one its telemetry channel, restarts a worker that dies, and on
SIGTERM drains: the admin listener closes at once (a newer agent's admin answers the probes),
every worker drains within the grace, then the parent exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time

from nodemesh.agent import workerlink
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.sockets import enable_request_migration
from nodemesh.agent.worker import config_to_json

log = logging.getLogger("nodemesh.agent.supervisor")

RESTART_BACKOFF_S = 0.5
READY_TIMEOUT_S = 30.0


class Supervisor:
    def __init__(self, config: AgentConfig, event_log: str | None = None) -> None:
        self.config = config
        self.event_log = event_log
        self.node: object | None = None
        self.workers: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = False
        self.restarts = 0

    async def run(self) -> int:
        from nodemesh.agent.node import NodeTelemetry

        if not enable_request_migration():
            log.warning("event=tcp_migrate_req_unavailable effect=queued_connections_may_reset_on_restart")
        node = NodeTelemetry(self.config)
        self.node = node
        await node.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        n = max(1, self.config.workers)
        await asyncio.gather(*(self._spawn(i) for i in range(n)))
        node.set_ready(True)
        log.info("event=agent_ready node=%s workers=%d", self.config.node, n)
        watchers = [loop.create_task(self._watch(i)) for i in range(n)]
        await stop.wait()
        await self._shutdown(node, watchers)
        return 0

    async def _spawn(self, index: int) -> None:
        parent_end, child_end = workerlink.make_channel()
        fd = child_end.fileno()
        argv = [sys.executable, "-m", "nodemesh.agent.worker", "--index", str(index),
                "--channel-fd", str(fd), "--config", config_to_json(self.config)]
        if self.event_log:
            argv += ["--event-log", self.event_log]
        proc = await asyncio.create_subprocess_exec(*argv, pass_fds=(fd,), stdout=asyncio.subprocess.PIPE)
        child_end.close()
        self.node.attach_worker(index, parent_end)  # type: ignore[union-attr]
        self.workers[index] = proc
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            log.error("event=worker_not_ready index=%d pid=%d", index, proc.pid)
        else:
            log.info("event=worker_started index=%d pid=%d", index, proc.pid)

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
