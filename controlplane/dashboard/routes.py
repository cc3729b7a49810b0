"""The dashboard's aiohttp routes: the page and its assets at `/`, the JSON API under `/api/`.

Streams are Server-Sent Events. A stream notices a browser that went away by the write that
fails (a comment line every `HEARTBEAT_S` when nothing else is sent), and a tap stream then
closes its tap, which closes it on every agent it was opened on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.rows import stat_row_json
from nodemesh.controlplane import promstore, webauth
from nodemesh.controlplane.auth import AuthError
from nodemesh.controlplane.controller import Controller, TapLimitError
from nodemesh.controlplane.dashboard import views
from nodemesh.controlplane.dashboard.params import (
    DEFAULT_NAMESPACE,
    OVERVIEW_TYPES,
    ApiError,
    check_keys,
    parse_bool,
    parse_int,
    parse_name,
    parse_peer,
    parse_tap_filter,
    parse_type,
    parse_types,
    parse_window,
)
from nodemesh.controlplane.stat import StatError
from nodemesh.controlplane.tap import tap_scope

log = logging.getLogger("nodemesh.controlplane.dashboard")

HEARTBEAT_S = 1.0
STREAM_INTERVAL_S = 2.0
STATIC_DIR = Path(str(resources.files("nodemesh.controlplane.dashboard") / "static"))
# The page builds its DOM with textContent only; this policy is the second wall: no inline
# script, no foreign origin, even if a future change slipped traffic data into markup.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
STAT_KEYS = ("type", "name", "namespace", "all_namespaces", "window", "from", "from_namespace", "to",
             "to_namespace", "label_selector")
TAP_KEYS = ("namespace", "type", "name", "to", "to_namespace", "method", "path", "authority", "scheme",
            "max_rps")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, ensure_ascii=False),
                             headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


def _api(handler: Handler) -> Handler:
    """ApiError (and the controller's StatError) -> 4xx with `{"error": message}`."""
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return _json({"error": exc.message}, exc.status)
        except StatError as exc:
            msg = str(exc)
            return _json({"error": msg}, 404 if "not found" in msg else 400)
    return wrapped


def stat_requests(query: dict[str, str]) -> list[pb.StatRequest]:
    """/api/stat's parameters -> one StatRequest per type, as `nodemesh stat deploy sts ...`."""
    check_keys(query, STAT_KEYS)
    types = parse_types(query.get("type"))
    window = parse_window(query.get("window"))
    namespace = (query.get("namespace") or DEFAULT_NAMESPACE).strip()
    all_ns = parse_bool(query.get("all_namespaces"), "all_namespaces")
    name = (query.get("name") or "").strip()
    if name and len(types) > 1:
        raise ApiError("name needs exactly one type")
    src = parse_peer(query.get("from"), query.get("from_namespace"), namespace, "from")
    dst = parse_peer(query.get("to"), query.get("to_namespace"), namespace, "to")
    out = []
    for t in types:
        req = pb.StatRequest(selector=pb.Resource(namespace=namespace, type=t, name=name), all_namespaces=all_ns,
                             window_seconds=window, label_selector=query.get("label_selector") or "")
        if src is not None:
            getattr(req, "from").CopyFrom(src)
        if dst is not None:
            req.to.CopyFrom(dst)
        out.append(req)
    return out


async def _stat_payload(controller: Controller, reqs: list[pb.StatRequest]) -> dict[str, object]:
    """Rows from the controller's default backend (`--stat-backend`), as `nodemesh stat` gets them;
    `warning`: what that backend says about their completeness ("" when nothing)."""
    store, at = await controller.store_for("", promstore.PEER, reqs[0].window_seconds)
    now = time.time() if at is None else at
    rows = views.stat_rows(controller, reqs, now, store)
    return {"time_ms": int(now * 1000), "window_s": reqs[0].window_seconds,
            "rows": [stat_row_json(r) for r in rows], "warning": controller.store_warning(store)}


def _sse(event: str, data: Any) -> bytes:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    # json.dumps never emits a raw newline, so one `data:` line always holds the whole event.
    return f"event: {event}\ndata: {body}\n\n".encode()


async def _open_stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                       "X-Accel-Buffering": "no", "X-Content-Type-Options": "nosniff"})
    await resp.prepare(request)
    await resp.write(b"retry: 2000\n\n")
    return resp


class Dashboard:
    def __init__(self, controller: Controller, grafana_url: str) -> None:
        self.controller = controller
        self.grafana_url = grafana_url
        self.open_streams = 0

    # ------------------------------------------------------------------ page
    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={**PAGE_HEADERS, "Cache-Control": "no-cache"})

    # ------------------------------------------------------------------ JSON
    async def api_index(self, request: web.Request) -> web.StreamResponse:
        return _json({"endpoints": ["/api/namespaces", "/api/stat", "/api/stream", "/api/workload", "/api/tap",
                                    "/api/grafana"]})

    async def get_namespaces(self, request: web.Request) -> web.StreamResponse:
        check_keys(request.query, ())
        return _json({"namespaces": views.namespaces(self.controller)})

    async def get_stat(self, request: web.Request) -> web.StreamResponse:
        reqs = stat_requests(dict(request.query))
        return _json(await _stat_payload(self.controller, reqs))

    async def get_workload(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        check_keys(q, ("namespace", "type", "name", "window", "step"))
        type_ = parse_type(q.get("type"))
        if type_ in ("all", "namespace"):
            raise ApiError(f"type {type_!r} is not a workload: expected deploy, sts, ds, job, po, rs or svc")
        me = pb.Resource(namespace=(q.get("namespace") or DEFAULT_NAMESPACE).strip(), type=type_,
                         name=parse_name(q.get("name")))
        window = parse_window(q.get("window"))
        step = parse_int(q.get("step"), "step", 60, 10, 600)
        if views.SERIES_RANGE_S % step:
            raise ApiError(f"step {step} must divide {views.SERIES_RANGE_S}")
        (peer_store, at), (route_store, _), steps = await asyncio.gather(  # the Prometheus queries at once
            self.controller.store_for("", promstore.PEER, window), self.controller.store_for("", promstore.ROUTE, window),
            self.controller.steps_for("", promstore.PEER, step, views.SERIES_RANGE_S, views.series_matchers(me)))
        return _json(views.workload(self.controller, me, window, step, self.grafana_url, at, peer_store, route_store,
                                    steps))

    async def get_grafana(self, request: web.Request) -> web.StreamResponse:
        check_keys(request.query, ())
        return _json({"url": self.grafana_url or None, "workload_dashboard_uid": views.GRAFANA_WORKLOAD_UID})

    # ------------------------------------------------------------------ streams
    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Overview rows every `interval` seconds (default 2) for `type` (default: workload kinds)."""
        query = dict(request.query)
        interval = parse_int(query.pop("interval", None), "interval", int(STREAM_INTERVAL_S), 1, 60)
        query.setdefault("type", ",".join(OVERVIEW_TYPES))
        reqs = stat_requests(query)
        first = await _stat_payload(self.controller, reqs)  # a bad request is a 4xx, not a broken stream
        resp = await _open_stream(request)
        self.open_streams += 1
        try:
            payload = first
            while True:
                await resp.write(_sse("stat", payload))
                await asyncio.sleep(interval)
                try:
                    payload = await _stat_payload(self.controller, reqs)
                except ApiError as exc:  # e.g. the namespace was deleted meanwhile
                    await resp.write(_sse("error", {"error": exc.message}))
                    break
                except StatError as exc:  # the backend failed this once (Prometheus away): say so, go on
                    await resp.write(_sse("warning", {"error": str(exc)}))
                    continue
        except (ConnectionError, asyncio.CancelledError):
            pass  # the browser went away
        finally:
            self.open_streams -= 1
        return resp

    async def tap(self, request: web.Request) -> web.StreamResponse:
        check_keys(request.query, TAP_KEYS)
        flt = parse_tap_filter(request.query, self.controller.config.tap_max_rps)
        self.controller.validate_tap(flt)  # StatError -> 4xx before anything is opened
        authenticator = request.app.get(webauth.AUTHENTICATOR_KEY)
        if authenticator is not None:  # what this tap shows needs its own permission (auth.authorize_tap)
            try:
                await authenticator.authorize_tap(webauth.token_of(request) or "", *tap_scope(flt))
            except AuthError as exc:
                raise ApiError(exc.message, status=403) from None
        try:
            self.controller.check_tap_capacity()
        except TapLimitError as exc:
            raise ApiError(str(exc), status=429) from None
        resp = await _open_stream(request)
        events: AsyncIterator[pb.TapEvent] = self.controller.tap(flt)
        queue: asyncio.Queue[pb.TapEvent] = asyncio.Queue()

        async def pump() -> None:
            async for ev in events:
                queue.put_nowait(ev)

        # The tap generator runs in its own task: cancelling it runs its `finally`, which
        # closes the tap on the agents.
        pumper = asyncio.create_task(pump(), name="dashboard-tap")
        self.open_streams += 1
        try:
            await resp.write(_sse("open", {"max_rps": flt.max_rps, "target": views._resource_json(flt.target)}))
            while not pumper.done():
                try:
                    ev = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                batch = [ev]
                while not queue.empty() and len(batch) < 200:
                    batch.append(queue.get_nowait())
                await resp.write(b"".join(_sse("tap", views.tap_event_json(e)) for e in batch))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open_streams -= 1
            pumper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pumper
            log.debug("event=dashboard_tap_closed target=%s/%s", flt.target.type, flt.target.name)
        return resp


def add_routes(app: web.Application, controller: Controller, grafana_url: str | None = None) -> Dashboard:
    """Serve the dashboard from `app` (the controller's web app on 8084). The Grafana base URL is
    `grafana_url`, else the controller config's `grafana_url` when it has one."""
    base = grafana_url if grafana_url is not None else str(getattr(controller.config, "grafana_url", "") or "")
    dash = Dashboard(controller, base)
    r = app.router
    r.add_get("/", dash.index)
    r.add_get("/api", _api(dash.api_index))
    r.add_get("/api/", _api(dash.api_index))
    r.add_get("/api/namespaces", _api(dash.get_namespaces))
    r.add_get("/api/stat", _api(dash.get_stat))
    r.add_get("/api/stream", _api(dash.stream))
    r.add_get("/api/workload", _api(dash.get_workload))
    r.add_get("/api/tap", _api(dash.tap))
    r.add_get("/api/grafana", _api(dash.get_grafana))
    r.add_static("/static/", STATIC_DIR, append_version=False)

    async def static_headers(request: web.Request, response: web.StreamResponse) -> None:
        if request.path.startswith("/static/"):
            response.headers.update(PAGE_HEADERS)
    app.on_response_prepare.append(static_headers)
    return dash
