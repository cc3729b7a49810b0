"""The web port behind the same token as the gRPC API: a real aiohttp server on loopback, real HTTP."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from aiohttp import web
from nodemesh.controlplane.auth import MISSING_TOKEN, StaticTokenAuthenticator
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.controller import Controller
from nodemesh.controlplane.web import build_app
from nodemesh.controlplane.webauth import COOKIE


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_controlplane_webauth_protects_page_and_api_not_probes(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("right-token\n")

    async def main() -> None:
        controller = Controller(ControllerConfig())
        runner = web.AppRunner(build_app(controller, StaticTokenAuthenticator(str(token_file))))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        try:
            await asyncio.to_thread(checks, base)
        finally:
            await runner.cleanup()

    def checks(base: str) -> None:
        # Probes, Prometheus and static assets stay open.
        for path in ("/live", "/metrics", "/static/style.css"):
            assert _get(base + path)[0] == 200, path
        # No token: the API says why in JSON, the page explains how to sign in.
        status, _, body = _get(base + "/api/namespaces")
        assert (status, json.loads(body)) == (401, {"error": MISSING_TOKEN})
        status, _, body = _get(base + "/")
        assert status == 401 and b"nodemesh dashboard" in body
        # A wrong token is refused everywhere, tap included.
        for path in ("/api/namespaces", "/api/tap?resource=deploy/web&namespace=x"):
            status, _, body = _get(base + path, {"Authorization": "Bearer wrong"})
            assert (status, json.loads(body)) == (401, {"error": "invalid token"}), path
        assert _get(base + "/login?token=wrong")[0] == 401
        # Scripts: a bearer header.
        assert _get(base + "/api/namespaces", {"Authorization": "Bearer right-token"})[0] == 200
        # Browsers: /login checks the token, keeps it in an HttpOnly SameSite cookie, sends them on.
        status, headers, _ = _get(base + "/login?token=right-token")
        assert status == 303 and headers["Location"] == "/"
        cookie = headers["Set-Cookie"]
        assert cookie.startswith(f"{COOKIE}=right-token;") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert _get(base + "/", {"Cookie": f"{COOKIE}=right-token"})[0] == 200
        assert _get(base + "/api/namespaces", {"Cookie": f"{COOKIE}=right-token"})[0] == 200
        assert _get(base + "/api/namespaces", {"Cookie": f"{COOKIE}=stale"})[0] == 401

    asyncio.run(main())
