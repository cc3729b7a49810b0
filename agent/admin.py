"""The agent's admin endpoints on :4191 (aiohttp, SO_REUSEPORT so a new agent can bind while the old drains).

/metrics  Prometheus text from the node's merged counters (custom collector, its own registry)
/ready    200 once the agent serves traffic, 503 otherwise (and from drain start)
/live     200 while the event loop answers
/capture  {"excluded_ips": [...]}: this node's pod IPs the redirector must not capture
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from aiohttp import web
from nodemesh.agent.metrics import Snapshot, SnapshotCollector
from nodemesh.agent.procstats import AgentProcessCollector
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("nodemesh.agent.admin")


class AdminServer:
    def __init__(self, host: str, port: int, *, snapshot: Callable[[], Snapshot],
                 ready: Callable[[], bool], excluded_ips: Callable[[], list[str]],
                 capture_installed: Callable[[], bool] = lambda: False) -> None:
        self.host = host
        self.port = port
        self._ready = ready
        self._excluded_ips = excluded_ips
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(snapshot))
        self.registry.register(AgentProcessCollector(capture_installed))
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/ready", self._ready_handler)
        app.router.add_get("/live", self._live)
        app.router.add_get("/capture", self._capture)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_port=True, reuse_address=True)
        await self._site.start()
        if self.port == 0:  # tests bind an ephemeral port: learn which one
            server = self._site._server  # aiohttp keeps the asyncio.Server here
            if server is not None and server.sockets:
                self.port = server.sockets[0].getsockname()[1]
        log.info("event=admin_listening addr=%s:%d", self.host, self.port)

    def stop_listening(self) -> None:
        """Stop accepting at once (drain start): a new agent's admin takes the port's probes."""
        if self._site is not None and self._site._server is not None:
            self._site._server.close()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _ready_handler(self, request: web.Request) -> web.Response:
        if self._ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def _live(self, request: web.Request) -> web.Response:
        return web.Response(text="live\n")

    async def _capture(self, request: web.Request) -> web.Response:
        return web.Response(text=json.dumps({"excluded_ips": self._excluded_ips()}),
                            content_type="application/json")
