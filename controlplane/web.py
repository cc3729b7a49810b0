"""The controller's web app (port 8084): /metrics about itself, /live, /ready, and the dashboard.

`build_app(controller, authenticator)` returns a plain aiohttp Application; the dashboard adds its
routes to it and reaches stats through `app[CONTROLLER_KEY]` (see Controller's public methods).
With an authenticator, everything but the probes, /metrics and static assets needs the same token
as the gRPC API (controlplane/webauth.py).
"""

from __future__ import annotations

from aiohttp import web
from nodemesh.controlplane import webauth
from nodemesh.controlplane.auth import Authenticator
from nodemesh.controlplane.controller import Controller
from nodemesh.controlplane.dashboard import add_routes
from prometheus_client import CONTENT_TYPE_LATEST

CONTROLLER_KEY = web.AppKey("controller", Controller)


def build_app(controller: Controller, authenticator: Authenticator | None = None) -> web.Application:
    app = web.Application()
    if authenticator is not None:
        webauth.install(app, authenticator)
    app[CONTROLLER_KEY] = controller

    async def metrics(request: web.Request) -> web.Response:
        controller.metrics.series_tracked.set(len(controller.aggregator))
        body = controller.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def live(request: web.Request) -> web.Response:
        return web.Response(text="live\n")

    async def ready(request: web.Request) -> web.Response:
        if controller.ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="cluster source not synced\n")

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/live", live)
    app.router.add_get("/ready", ready)
    add_routes(app, controller)  # the dashboard's page and /api/ (docs/dashboard.md)
    return app
