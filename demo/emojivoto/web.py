"""web: the emojivoto front end, HTTP/1.1 on WEB_PORT (8080), a gRPC client of emoji-svc and voting-svc.

Routes and JSON shapes are upstream's (`emojivoto-web/web/web.go`):
  GET /, /leaderboard      a small self-contained page (no external assets)
  GET /api/list            [{"shortcode": ":joy:", "unicode": "😂"}, ...]          EmojiService/ListAll
  GET /api/vote?choice=C   200 empty body; 400 {"error"} for a missing/unknown choice;
                           500 {"error"} when a gRPC call fails   EmojiService/FindByShortcode, then
                                                                  VotingService/Vote<Name>
  GET /api/leaderboard     [{"votes": "3", "unicode": ..., "shortcode": ...}, ...]  Results + FindByShortcode

One gRPC channel per backend for the life of the process (HTTP/2, keep-alive), as upstream's grpc.Dial.

Run: python -m nodemesh.demo.emojivoto.web
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web

from . import emojis, page
from .gen import Emoji_pb2, Emoji_pb2_grpc, Voting_pb2, Voting_pb2_grpc
from .runtime import ConfigError, Logger, env_duration, env_int, stop_event_on_signals

DEFAULT_EMOJISVC_HOST = "emoji-svc.emojivoto:8080"
DEFAULT_VOTINGSVC_HOST = "voting-svc.emojivoto:8080"


@dataclass(frozen=True, slots=True)
class WebConfig:
    port: int = 8080
    bind_host: str = "0.0.0.0"
    emojisvc_host: str = DEFAULT_EMOJISVC_HOST
    votingsvc_host: str = DEFAULT_VOTINGSVC_HOST
    message_of_the_day: str = ""
    # Upstream sets no deadline; a generous one keeps a wedged backend from piling up requests.
    rpc_timeout: float = 10.0
    backend_wait: float = 10.0  # seconds to wait for the backends at start-up; 0 = don't
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WebConfig:
        return cls(
            port=env_int(env, "WEB_PORT", 8080),
            bind_host=env.get("BIND_HOST", "") or "0.0.0.0",
            emojisvc_host=env.get("EMOJISVC_HOST", "") or DEFAULT_EMOJISVC_HOST,
            votingsvc_host=env.get("VOTINGSVC_HOST", "") or DEFAULT_VOTINGSVC_HOST,
            message_of_the_day=env.get("MESSAGE_OF_THE_DAY", ""),
            rpc_timeout=env_duration(env, "RPC_TIMEOUT", 10.0),
            backend_wait=env_duration(env, "BACKEND_WAIT", 10.0),
            log_level=env.get("LOG_LEVEL", "info") or "info",
        )


class Backends:
    """The two gRPC clients web talks to, each over one long-lived channel."""

    def __init__(self, emojisvc_host: str, votingsvc_host: str, timeout: float) -> None:
        self.emoji_channel = grpc.aio.insecure_channel(emojisvc_host)
        self.voting_channel = grpc.aio.insecure_channel(votingsvc_host)
        self.emoji = Emoji_pb2_grpc.EmojiServiceStub(self.emoji_channel)
        self.voting = Voting_pb2_grpc.VotingServiceStub(self.voting_channel)
        self.timeout = timeout

    async def list_all(self) -> list[Emoji_pb2.Emoji]:
        response = await self.emoji.ListAll(Emoji_pb2.ListAllEmojiRequest(), timeout=self.timeout)
        return list(response.list)

    async def find_by_shortcode(self, shortcode: str) -> Emoji_pb2.Emoji | None:
        response = await self.emoji.FindByShortcode(
            Emoji_pb2.FindByShortcodeRequest(Shortcode=shortcode), timeout=self.timeout)
        return response.Emoji if response.HasField("Emoji") else None

    async def vote(self, shortcode: str) -> None:
        method = getattr(self.voting, emojis.vote_method(shortcode), None)
        if method is None:
            # Upstream's switch has no case for it and records nothing; say so instead of pretending.
            raise LookupError(f"no VotingService method for {shortcode}")
        await method(Voting_pb2.VoteRequest(), timeout=self.timeout)

    async def results(self) -> list[Voting_pb2.VotingResult]:
        response = await self.voting.Results(Voting_pb2.ResultsRequest(), timeout=self.timeout)
        return list(response.results)

    async def wait_connected(self, timeout: float, log: Logger) -> None:
        """Connect both channels before serving, for at most `timeout` seconds.

        Pods start together; without this the first votes could race emoji-svc's start and fail with
        UNAVAILABLE, failures the demo would then have to explain. Past the timeout web serves anyway
        (and answers 500 while a backend is down), as upstream's non-blocking grpc.Dial does.
        """
        for name, channel in (("emoji", self.emoji_channel), ("voting", self.voting_channel)):
            try:
                await asyncio.wait_for(channel.channel_ready(), timeout)
            except TimeoutError:
                log.warning("backend_not_ready", backend=name, waited=timeout)

    async def close(self) -> None:
        await self.emoji_channel.close()
        await self.voting_channel.close()


def grpc_error_text(exc: grpc.aio.AioRpcError) -> str:
    """The error as Go's grpc client prints it, so our JSON errors read like upstream's."""
    code = "".join(word.capitalize() for word in exc.code().name.split("_"))
    return f"rpc error: code = {code} desc = {exc.details() or ''}"


def _json(body: Any, status: int = 200) -> web.Response:
    # Upstream writes with json.Encoder: non-ASCII kept as is, trailing newline.
    return web.Response(status=status, text=json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "\n",
                        content_type="application/json", charset="utf-8")


def _error(message: str, status: int) -> web.Response:
    return _json({"error": message}, status)


BACKENDS = web.AppKey("backends", Backends)
LOG = web.AppKey("log", Logger)
CONFIG = web.AppKey("config", WebConfig)


async def index(request: web.Request) -> web.Response:
    motd = request.app[CONFIG].message_of_the_day
    return web.Response(text=page.render(motd), content_type="text/html", charset="utf-8")


async def api_list(request: web.Request) -> web.Response:
    try:
        found = await request.app[BACKENDS].list_all()
    except grpc.aio.AioRpcError as exc:
        return _rpc_failed(request, exc)
    return _json([{"shortcode": e.shortcode, "unicode": e.unicode} for e in found])


async def api_vote(request: web.Request) -> web.Response:
    choice = request.query.get("choice", "")
    if not choice and request.method == "POST":
        choice = str((await request.post()).get("choice", ""))
    if not choice:
        return _error(f"Emoji choice [{choice}] is mandatory", 400)
    backends = request.app[BACKENDS]
    try:
        found = await backends.find_by_shortcode(choice)
        if found is None:
            return _error(f"Choosen emoji shortcode [{choice}] doesnt exist", 400)
        await backends.vote(choice)
    except grpc.aio.AioRpcError as exc:
        return _rpc_failed(request, exc)
    except LookupError as exc:
        return _error(str(exc), 400)
    return web.Response(status=200)


async def api_leaderboard(request: web.Request) -> web.Response:
    backends = request.app[BACKENDS]
    try:
        results = await backends.results()
        # Upstream asks one FindByShortcode per result; same calls here, just concurrently.
        found = await asyncio.gather(*(backends.find_by_shortcode(r.Shortcode) for r in results))
    except grpc.aio.AioRpcError as exc:
        return _rpc_failed(request, exc)
    board = []
    for result, emoji in zip(results, found, strict=True):
        board.append({"votes": str(result.Votes), "unicode": emoji.unicode if emoji else "",
                      "shortcode": emoji.shortcode if emoji else result.Shortcode})
    return _json(board)


def _rpc_failed(request: web.Request, exc: grpc.aio.AioRpcError) -> web.Response:
    text = grpc_error_text(exc)
    # Debug, not info: the doughnut fails on purpose many times a second and logs stay quiet by default.
    request.app[LOG].debug("rpc_failed", path=request.path, query=request.query_string, error=text)
    return _error(text, 500)


def make_app(backends: Backends, cfg: WebConfig, log: Logger) -> web.Application:
    app = web.Application()
    app[BACKENDS] = backends
    app[LOG] = log
    app[CONFIG] = cfg
    app.router.add_get("/", index)
    app.router.add_get("/leaderboard", index)
    app.router.add_get("/api/list", api_list)
    app.router.add_route("*", "/api/vote", api_vote)
    app.router.add_get("/api/leaderboard", api_leaderboard)
    return app


async def start(cfg: WebConfig, log: Logger) -> tuple[web.AppRunner, Backends, int]:
    """Start serving; returns the runner, the backends and the port really bound (WEB_PORT=0 works)."""
    backends = Backends(cfg.emojisvc_host, cfg.votingsvc_host, cfg.rpc_timeout)
    if cfg.backend_wait > 0:
        await backends.wait_connected(cfg.backend_wait, log)
    runner = web.AppRunner(make_app(backends, cfg, log), access_log=None, handle_signals=False,
                           shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, cfg.bind_host, cfg.port, reuse_address=True)
    await site.start()
    port = runner.addresses[0][1]
    log.info("listening", addr=cfg.bind_host, port=port, emojisvc_host=cfg.emojisvc_host,
             votingsvc_host=cfg.votingsvc_host)
    return runner, backends, port


async def run(cfg: WebConfig, log: Logger) -> None:
    stop = stop_event_on_signals(asyncio.get_running_loop())
    runner, backends, _ = await start(cfg, log)
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()
        await backends.close()
    log.info("stopped")


def main() -> int:
    try:
        cfg = WebConfig.from_env(os.environ)
    except ConfigError as exc:
        print(f"web: {exc}", file=sys.stderr)
        return 2
    asyncio.run(run(cfg, Logger("web", cfg.log_level)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
