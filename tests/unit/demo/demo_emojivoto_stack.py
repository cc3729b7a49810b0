"""Test helper: emoji-svc, voting-svc and web running in this process on 127.0.0.1 ephemeral ports.

Real grpc.aio servers and a real aiohttp server on loopback sockets, torn down even when a test fails.
"""

from __future__ import annotations

import contextlib
import io
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from nodemesh.demo.emojivoto import emoji, voting, web
from nodemesh.demo.emojivoto.runtime import Logger


@dataclass
class Stack:
    web_url: str
    emoji_addr: str
    voting_addr: str
    poll: voting.Poll
    log: io.StringIO


async def start_grpc(register: object) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    register(server)  # type: ignore[operator]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@contextlib.asynccontextmanager
async def running_stack(failure_rate: float = 1.0, seed: int = 1,
                        with_emoji: bool = True) -> AsyncIterator[Stack]:
    """The app; with_emoji=False points web at a port where nobody listens."""
    out = io.StringIO()
    log = Logger("test", "debug", stream=out)
    poll = voting.Poll()
    service = voting.VotingService(poll, failure_rate, 0.0, log, rng=random.Random(seed))
    servers: list[grpc.aio.Server] = []
    runner = backends = None
    try:
        voting_server, voting_port = await start_grpc(lambda s: voting.register(s, service))
        servers.append(voting_server)
        if with_emoji:
            emoji_server, emoji_port = await start_grpc(lambda s: emoji.register(s, log))
            servers.append(emoji_server)
        else:
            emoji_port = 1  # tcpmux: nothing listens on loopback, connections are refused at once
        cfg = web.WebConfig(port=0, bind_host="127.0.0.1", emojisvc_host=f"127.0.0.1:{emoji_port}",
                            votingsvc_host=f"127.0.0.1:{voting_port}", rpc_timeout=5.0,
                            message_of_the_day="<b>hi</b>",
                            backend_wait=5.0 if with_emoji else 0.3)
        runner, backends, web_port = await web.start(cfg, log)
        yield Stack(f"http://127.0.0.1:{web_port}", f"127.0.0.1:{emoji_port}", f"127.0.0.1:{voting_port}",
                    poll, out)
    finally:
        if runner is not None:
            await runner.cleanup()
        if backends is not None:
            await backends.close()
        for server in servers:
            await server.stop(grace=None)
