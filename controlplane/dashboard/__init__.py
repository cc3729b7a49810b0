"""The web dashboard on the controller's port 8084: a page (plain ES modules, no CDN) and the
JSON/SSE API under `/api/` it is built on. `add_routes(app, controller)` hooks it into the
controller's aiohttp app; see docs/dashboard.md."""

from nodemesh.controlplane.dashboard.routes import Dashboard, add_routes

__all__ = ["Dashboard", "add_routes"]
