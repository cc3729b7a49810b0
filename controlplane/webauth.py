"""The token check of the web port (8084): the dashboard's page and `/api/*` are as protected as
the gRPC API, with the same Authenticator and the same policy (tap is `Tap`, the rest `StatSummary`).

A browser can't add an Authorization header to a page load or an EventSource, so `nodemesh
dashboard` opens `/login?token=...` once: the token is checked, stored in an HttpOnly,
SameSite=Strict cookie, and the browser is sent on to the page (its #fragment kept). Scripts use
`Authorization: Bearer <token>`. `/live`, `/ready` and `/metrics` stay open for probes and
Prometheus; the static assets carry no data and stay open too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from nodemesh.controlplane.auth import MISSING_TOKEN, Authenticator, AuthError

COOKIE = "nodemesh_token"
AUTHENTICATOR_KEY: web.AppKey[Authenticator] = web.AppKey("nodemesh_authenticator", Authenticator)
OPEN_PATHS = ("/live", "/ready", "/metrics", "/static/")
LOGIN_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>nodemesh: sign in</title></head>
<body style="font-family: sans-serif; margin: 3em">
<h1>nodemesh dashboard</h1>
<p>{message}</p>
<p>Open the dashboard with <code>nodemesh dashboard</code>: it signs this browser in with your token
(<code>NODEMESH_TOKEN</code> or <code>--token-file</code>; in a sandbox, found automatically).</p>
</body></html>
"""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _method_of(path: str) -> str:
    return "Tap" if path.startswith("/api/tap") else "StatSummary"


def token_of(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.cookies.get(COOKIE) or None


def _refuse(request: web.Request, message: str) -> web.Response:
    if request.path.startswith("/api"):
        return web.json_response({"error": message}, status=401)
    return web.Response(status=401, content_type="text/html", text=LOGIN_PAGE.format(message=message))


def install(app: web.Application, authenticator: Authenticator) -> None:
    """Put the web port behind `authenticator`, and add `/login`."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/login" or request.path.startswith(OPEN_PATHS):
            return await handler(request)
        token = token_of(request)
        if token is None:
            return _refuse(request, MISSING_TOKEN)
        try:
            await authenticator.authenticate(token, _method_of(request.path))
        except AuthError as exc:
            return _refuse(request, exc.message)
        return await handler(request)

    async def login(request: web.Request) -> web.StreamResponse:
        token = request.query.get("token", "").strip()
        if not token:
            return _refuse(request, MISSING_TOKEN)
        try:
            await authenticator.authenticate(token, "StatSummary")
        except AuthError as exc:
            return _refuse(request, exc.message)
        response = web.Response(status=303, headers={"Location": "/"})
        response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")
        return response

    app[AUTHENTICATOR_KEY] = authenticator
    app.middlewares.append(check)
    app.router.add_get("/login", login)
